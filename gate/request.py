"""What a run is asked to do, prepared without torch: config + scan + suites -> RunRequest (the run request)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gate.config import Funnel, GateConfig, Policy, RunOptions, SuiteSpec, builtin_spec, find_config, load_config
from gate.errors import BaseModelError, CheckpointError, SuiteError
from gate.overlap import Overlap, index_training_file, overlap, suite_file_segments, suite_segments
from gate.probes import ProbeSuite, load_probe_suite
from gate.scan import ScanReport, looks_like_path, missing_base_message, path_is_missing, scan
from gate.store import STORE_NAME, ResultsStore
from gate.suites import Suite, builtin_entries, load_suite


@dataclass
class RunRequest:
    """Everything the runner needs; built by the CLI (or a library user) before any model loads."""

    scan: ScanReport
    """The checkpoints found (valid ones are scored, invalid ones are reported)."""
    suites: list[Suite]
    """Loaded, validated perplexity suites."""
    task_specs: list[SuiteSpec] = field(default_factory=list)
    """lm_eval suites (their tasks are loaded by the runner, which owns lm-eval)."""
    probe_suites: list[ProbeSuite] = field(default_factory=list)
    """Loaded, validated generate suites (prompts with checks)."""
    funnel: Funnel | None = None
    """Run the lm_eval suites only on the top k checkpoints by a perplexity suite."""
    base: str = ""
    """Base model: a local folder or a hub id."""
    out_dir: Path = Path("reports")
    """Output folder: results.json and the results store live here."""
    options: RunOptions = field(default_factory=RunOptions)
    """How models are loaded and scored: gate.yaml's options, overridden by the caller's."""
    command: str = ""
    """Command line recorded in results.json."""
    config_path: str | None = None
    """The gate.yaml used (None: defaults)."""
    policy: Policy | None = None
    """The release policy to apply to the results (pure, after the run)."""
    overlaps: list[Overlap] = field(default_factory=list)
    """The contamination check's findings (gate.yaml ``contamination:``)."""
    warnings: list[str] = field(default_factory=list)
    """Warnings gathered while preparing the run."""


def choose_base(flag: str | None, config: GateConfig, scan: ScanReport) -> str:
    """--base, else gate.yaml's base, else the base that the valid adapters name."""
    if flag:
        return flag
    if config.base:
        return config.base
    named = Counter(c.base_model for c in scan.valid if c.kind == "lora" and c.base_model)
    if len(named) == 1:
        name = next(iter(named))
        if looks_like_path(name) and path_is_missing(name):
            raise BaseModelError(missing_base_message(name))
        return name
    if not named:
        raise BaseModelError("no base model: the checkpoints name none; pass --base MODEL or set `base:` in gate.yaml")
    listing = ", ".join(f"{b!r} ({n})" for b, n in named.most_common())
    raise BaseModelError(f"adapters name different bases ({listing}); pass --base MODEL to choose one")


def load_suites(config: GateConfig) -> list[Suite]:
    """Load every perplexity suite of the config; report all broken suites at once."""
    suites, problems = [], []
    for spec in config.perplexity_suites:
        try:
            suites.append(load_suite(spec.name, spec.path, chat_template=spec.use_chat_template, limit=spec.limit, drift_k=spec.drift_k))
        except SuiteError as err:
            problems.append(str(err))
    if problems:
        raise SuiteError("\n".join(problems))
    return suites


def load_probe_suites(config: GateConfig) -> list[ProbeSuite]:
    """Load every generate suite of the config; report all broken suites at once."""
    suites, problems = [], []
    for spec in config.generate_suites:
        try:
            suite = load_probe_suite(
                spec.name,
                spec.path,
                max_new_tokens=spec.max_new_tokens,
                system=spec.system,
                chat_template=spec.use_chat_template,
                detectors=config.detectors,
                limit=spec.limit,
            )
        except SuiteError as err:
            problems.append(str(err))
            continue
        suite.metric, suite.config_line = spec.metric, spec.line
        suites.append(suite)
    if problems:
        raise SuiteError("\n".join(problems))
    return suites


def prepare_run(
    directory: str | Path,
    *,
    config_path: str | Path | None = None,
    base: str | None = None,
    out_dir: str | Path = "reports",
    command: str = "",
    **options,
) -> RunRequest:
    """Config + scan + suites -> RunRequest; ``options`` (``RunOptions`` fields) override gate.yaml's.

    ``limit`` caps every suite at its first N documents (a quick, partial run). An option given
    as None (or False) is not given.

    Raises ConfigError, SuiteError, CheckpointError or BaseModelError before any model loads.
    """
    directory, out_dir = Path(directory), Path(out_dir)
    found = find_config(str(config_path) if config_path else None, str(directory))
    config = load_config(found)
    run_options = merge_options(config.options, options)
    if run_options.limit is not None:
        config.suites = [dataclasses.replace(spec, limit=run_options.limit) for spec in config.suites]
    suites = load_suites(config)
    probe_suites = load_probe_suites(config)
    overlaps = check_contamination(config, suites)
    with ResultsStore(out_dir / STORE_NAME) as store:
        report = scan(directory, allow_pickle=run_options.allow_pickle, base=base or config.base, hash_cache=store.hash_cache)
    if not report.checkpoints:
        raise CheckpointError(no_checkpoints_message(directory))
    if not report.valid:
        reasons = "\n".join(f"  - {c.reason}" for c in report.invalid)
        raise CheckpointError(f"{directory}: no valid checkpoint to score:\n{reasons}")
    return RunRequest(
        scan=report,
        suites=suites,
        task_specs=config.lm_eval_suites,
        probe_suites=probe_suites,
        funnel=config.funnel,
        base=choose_base(base, config, report),
        out_dir=out_dir,
        options=run_options,
        command=command,
        config_path=str(Path(found).resolve()) if found else None,
        policy=config.policy,
        overlaps=overlaps,
        warnings=[o.summary() + ": the suite does not measure what the model has not seen" for o in overlaps if not o.clean],
    )


def merge_options(defaults: RunOptions, given: dict) -> RunOptions:
    """``defaults`` (gate.yaml's) with the options given (None or False: not given); an unknown name is a TypeError."""
    known = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"unknown run option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}")
    return dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None and v is not False})


def overlap_documents(ref: str, config_path: str | Path | None = None) -> tuple[str, dict[str, list[str]]]:
    """`gate overlap`'s SUITE: a JSONL file, else a perplexity suite of gate.yaml, else a built-in one."""
    if Path(ref).is_file():
        return Path(ref).stem, suite_file_segments(ref)
    config = load_config(find_config(str(config_path) if config_path else None, None))
    specs = {s.name: s for s in config.suites}
    spec = specs.get(ref) or (builtin_spec(ref) if ref in builtin_entries() else None)
    if spec is None:
        known = sorted(set(specs) | set(builtin_entries()))
        raise SuiteError(
            f"{ref}: neither a file nor a suite of gate.yaml or the built-ins ({', '.join(known)}); give a JSONL file or a suite name"
        )
    if spec.type != "perplexity":
        raise SuiteError(f"{ref}: an lm-eval suite; give its data file instead (a JSONL file, e.g. the task's test split)")
    suite = load_suite(spec.name, spec.path, chat_template=spec.use_chat_template, limit=spec.limit)
    return suite.name, suite_segments(suite)


def check_contamination(config: GateConfig, suites: list[Suite]) -> list[Overlap]:
    """The config's contamination check: each listed suite against each training file."""
    check = config.contamination
    if check is None:
        return []
    checked = [suite for suite in suites if suite.name in check.suites]
    out = []
    for path in check.training_data:
        training = index_training_file(path, check.n)
        out += [overlap(suite.name, suite_segments(suite), training) for suite in checked]
    return out


def no_checkpoints_message(directory: Path) -> str:
    return (
        f"{directory}: no checkpoints found; gate looks for folders holding adapter_config.json + "
        "adapter_model.safetensors (LoRA) or config.json + model.safetensors (full weights), "
        "such as the Trainer's checkpoint-N/ folders"
    )
