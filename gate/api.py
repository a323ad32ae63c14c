"""The library's workflows, one function per command: what `gate run`, `gate merge`, `gate check`
and `gate report` do. No printing here: the CLI formats what these return."""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gate
from gate.assemble import RunOutcome
from gate.config import Policy, find_config, load_policy
from gate.errors import EXIT_RUNTIME_FAILURE, ConfigError, GateError
from gate.progress import ProgressFn, no_progress
from gate.results import Results, read_results, version_conflicts
from gate.verdict import Verdict


@dataclass
class Run:
    """What ``gate.run`` and ``gate.merge`` return."""

    results: Results
    """The results.json document written to OUT."""
    verdict: Verdict | None
    """The policy's verdict (OUT/verdict.json); None for a shard, which is gated once merged."""
    outcome: RunOutcome
    """What the run did: computed, reused and skipped pairs, problems, base loads, the rescoring line."""

    @property
    def exit_code(self) -> int:
        """As `gate run` exits: 2 or 3 when a checkpoint was invalid or failed, else the verdict's 0 or 1."""
        return self.outcome.exit_code or (self.verdict.exit_code if self.verdict is not None else 0)


def run(
    checkpoints: str | Path,
    config: str | Path | None = None,
    out: str | Path = "reports",
    *,
    executor: str = "local",
    shard: str | None = None,
    progress: ProgressFn | None = None,
    address: str | None = None,
    workers: int | None = None,
    command: str = "",
    on_results: Callable[[RunOutcome], None] | None = None,
    **settings,
) -> Run:
    """Score the base and every checkpoint below ``checkpoints``; write OUT/results.json, verdict.json, reports.

    ``settings``: base, device, dtype, batch_size, max_length, stride, limit, allow_pickle,
    trust_remote_code, online (they override gate.yaml's). ``executor="ray"`` fans the work out to
    Ray workers; ``shard="I/N"`` scores share I of N only (no verdict: combine shards with
    ``gate.merge``). Only what the results store lacks is computed. ``on_results`` is called with
    what the run did once results.json is written, before the policy is applied (the CLI's table).
    """
    from gate.flow import run as run_locally
    from gate.request import prepare_run

    offline(settings.get("online", False))
    request = prepare_run(checkpoints, config_path=config, out_dir=out, command=command, **settings)
    progress = progress or no_progress
    if executor == "ray":
        if shard:
            raise ConfigError(None, ["--shard and --executor ray do not go together: a Ray run scores every share"])
        from gate.runner.distributed import run_on_ray

        outcome = run_on_ray(request, address=address, progress=progress, workers=workers)
    elif executor == "local":
        outcome = run_locally(request, progress, shard_of=shard)
    else:
        raise ConfigError(None, [f"executor {executor!r}: use local or ray"])
    if on_results is not None:
        on_results(outcome)
    results = outcome.results
    assert results is not None, "a finished run has assembled its results"
    policy = request.policy if request.policy is not None else load_policy(None, results.suites)
    verdict = None if shard else apply_policy(results, policy, out, request.config_path)
    return Run(results, verdict, outcome)


def merge(shards: list[str | Path], out: str | Path = "reports", config: str | Path | None = None) -> Run:
    """Combine `gate run --shard I/N` output folders into one run: results.json, verdict.json, reports.

    Reads each shard's work.json, results.json and gate.sqlite only: no checkpoint, no base, no
    torch. The shards must be shares of one plan (same base, settings, library versions and items).
    ``config``: the gate.yaml holding the policy (default: the one the shards used).
    """
    from gate.assemble import assemble, outcome
    from gate.flow import RESULTS_NAME
    from gate.results import write_results
    from gate.store import STORE_NAME, ResultsStore
    from gate.work import WORK_NAME, Failure, read_work, write_work

    if not shards:
        raise GateError("gate merge: no shard given; pass --from DIR for each `gate run --shard I/N` output folder")
    out_dir, folders = Path(out), [Path(s) for s in shards]
    failures = []
    for shard in folders:
        # A shard's results.json is written last: without it the shard did not finish.
        recorded = read_results(shard / RESULTS_NAME)
        failures += [
            Failure(c.name, c.reason or "", c.error_code or EXIT_RUNTIME_FAILURE) for c in recorded.checkpoints if c.status == "error"
        ]
        if not (shard / STORE_NAME).is_file():
            raise GateError(f"{shard / STORE_NAME}: not found; pass the output folders of `gate run --shard I/N`")
    works = [read_work(s / WORK_NAME) for s in folders]
    _check_one_plan(folders, works)
    work = works[0]
    policy_path = Path(config) if config else (Path(work.config) if work.config else find_config(None, None))
    if work.config and not config and not Path(work.config).is_file():
        raise ConfigError(work.config, ["the shards' gate.yaml is gone; pass the policy with --config"])
    policy = load_policy(policy_path, work.suites)  # only its policy keys: no suite file is opened
    with ResultsStore(out_dir / STORE_NAME) as store:
        for shard in folders:
            with ResultsStore(shard / STORE_NAME) as source:
                store.import_rows(source.export(source.keys()))
        write_work(out_dir / WORK_NAME, work)
        results = assemble(work, store, _first_each(failures))
    write_results(out_dir / RESULTS_NAME, results)
    done = outcome(work, results, out_dir / RESULTS_NAME)
    verdict = apply_policy(results, policy, out_dir, str(policy_path) if policy_path else None)
    return Run(results, verdict, done)


def _first_each(failures: list) -> list:
    """One failure per checkpoint (a checkpoint is scored in one shard; the first record wins)."""
    seen, out = set(), []
    for f in failures:
        if f.model not in seen:
            seen.add(f.model)
            out.append(f)
    return out


def _check_one_plan(shards: list[Path], works: list) -> None:
    """Shards are shares of one plan: same base, settings, library versions and items; else exit 2 naming them."""
    first = works[0]
    if any(work.versions != first.versions for work in works):
        listing = "\n".join(
            f"  - {shard}: {', '.join(f'{k} {v}' for k, v in work.versions.items())}"
            for shard, work in zip(shards, works)
            if work is first or work.versions != first.versions
        )
        raise GateError(
            f"the shards scored under different library versions, which gate never compares:\n{listing}\nre-run them in one environment"
        )

    def differs(work) -> str | None:
        if work.base_hash != first.base_hash:
            return "another base model (weights hash)"
        keyed = ("dtype", "max_length", "stride", "scoring", "tokenizer_hash", "lm_eval")
        changed = [k for k in keyed if getattr(work.settings, k) != getattr(first.settings, k)]
        if changed:
            return "other settings (" + ", ".join(f"{k} {getattr(work.settings, k)} vs {getattr(first.settings, k)}" for k in changed) + ")"
        if [(i.model, i.suite, i.key) for i in work.items] != [(i.model, i.suite, i.key) for i in first.items]:
            return "other checkpoints or suites"
        return None

    problems = [(shard, why) for shard, work in zip(shards, works) if (why := differs(work))]
    if problems:
        listing = "\n".join(f"  - {shard}: {why} than {shards[0]}" for shard, why in problems)
        raise ConfigError(
            None, [f"the shards are not shares of one run:\n{listing}\nre-run them with one gate.yaml, one base and one environment"]
        )


def offline(online: bool = False) -> None:
    """Offline unless asked: nothing reaches the network by default (set before transformers loads)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notices are not the user's business
    # gate shows its own progress; lm-eval's and datasets' bars would flood the terminal.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def apply_policy(results: Results, policy: Policy, out: str | Path, config_path: str | None = None) -> Verdict:
    """Pure policy on the results -> OUT/verdict.json and the reports; returns the verdict."""
    import numpy as np

    from gate import policy as policy_engine
    from gate.release import read_release
    from gate.verdict import write_verdict

    out = Path(out)
    problems = policy_engine.validate(policy, results)
    if problems:
        raise ConfigError(config_path, problems)
    release = read_release(out) if policy.reference == "release" else None
    mixed = version_conflicts(results, release.model if release is not None else None)
    if mixed:
        listing = "\n".join(f"  - {line}" for line in mixed)
        raise GateError(
            f"{out / 'results.json'}: scores computed under other library versions would be compared:\n{listing}\n"
            "gate never compares them: re-run `gate run` to score everything under the installed versions"
        )
    verdict = policy_engine.evaluate(policy, results, np.random.default_rng(policy.seed), release)
    verdict.provenance = {
        "results": str(out / "results.json"),
        "results_created_at": results.created_at,
        "config": config_path,
        "gate_version": gate.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_verdict(out / "verdict.json", verdict)
    report(out, results=results, verdict=verdict)
    return verdict


def check(out: str | Path, config: str | Path | None = None) -> tuple[Results, Verdict]:
    """Re-apply a (possibly edited) policy to OUT/results.json: rewrites OUT/verdict.json and the reports.

    Needs only the output folder: no suite or training file, checkpoint, base model or GPU stack.
    The policy comes from ``config`` (a gate.yaml; only its policy keys are read), else from the
    gate.yaml the run used, else, when that file is gone (a CI job holding only OUT), from the
    policy the previous OUT/verdict.json recorded. Its gates are checked against the suites
    results.json holds. Returns the results and the new verdict.
    """
    out = Path(out)
    results = read_results(out / "results.json")
    policy, source = _policy_for(out, results, config)
    verdict = apply_policy(results, policy, out, source)
    return results, verdict


def _policy_for(out: Path, results: Results, config: str | Path | None) -> tuple[Policy, str | None]:
    """The policy to re-apply, and where it came from (a gate.yaml, or OUT/verdict.json)."""
    if config is not None:
        return load_policy(config, results.suites), str(config)
    if results.config and not Path(results.config).is_file():
        return _recorded_policy(out, results.config), str(out / "verdict.json")
    path = Path(results.config) if results.config else find_config(None, None)
    return load_policy(path, results.suites), str(path) if path else None


def _recorded_policy(out: Path, config: str) -> Policy:
    """The policy the previous verdict applied (verdict.json's ``policy_spec``)."""
    from gate.verdict import read_verdict

    path = out / "verdict.json"
    if not path.is_file():
        raise ConfigError(
            config, [f"the run's gate.yaml is gone and {path} does not exist to re-apply its policy; pass the policy with --config"]
        )
    try:
        spec = read_verdict(path).policy_spec
    except GateError as err:
        raise ConfigError(
            config, [f"the run's gate.yaml is gone, and the policy cannot be taken from {err}; or pass the policy with --config"]
        ) from None
    try:
        return Policy.from_json(spec)
    except (KeyError, TypeError, ValueError) as err:
        raise GateError(f"{path}: its recorded policy is malformed ({err!r}); pass the policy with --config") from None


def report(out: str | Path, *, results: Results | None = None, verdict: Verdict | None = None) -> dict[str, Path]:
    """(Re)write OUT/report.html, summary.md and junit.xml from results.json + verdict.json (no GPU).
    Returns the paths written, by kind (html, markdown, junit)."""
    from gate.reports import write_reports
    from gate.verdict import read_verdict

    out = Path(out)
    results = results if results is not None else read_results(out / "results.json")
    verdict = verdict if verdict is not None else read_verdict(out / "verdict.json")
    return write_reports(results, verdict, out)
