"""gate.yaml -> typed configuration. Every problem is reported at once, with the file and field.

base: HuggingFaceTB/SmolLM2-135M     # optional: a local folder or a hub id
suites:
  - name: known-good                 # name only: a built-in suite (suites/builtin.yaml)
  - name: style
    type: perplexity                 # the default
    path: data/style.jsonl           # relative to this file
    chat_template: true              # prompt/completion through the chat template
    limit: 500                       # optional: the first N documents
    drift: true                      # KL to the base and top-1 agreement (exact; drift_k: 32: top-k, lighter)
  - name: arith
    type: lm_eval
    task: tasks/arith.yaml           # a registered lm-eval task, a task YAML or a folder
    num_fewshot: 0                   # default: the task's own
    limit: null
    metric: acc                      # default: the task's first metric
    gen_kwargs: {max_gen_toks: 64}   # generation tasks: passed to lm-eval and recorded
    system_instruction: null         # passed to lm-eval and recorded
  - name: probes
    type: generate                   # greedy generation + per-item checks (gate.probes)
    path: data/probes.jsonl
    max_new_tokens: 128
    system: null                     # optional system prompt
detectors: {abstains: [...], refuses: [...]}   # replace the English phrase lists
funnel: {top_k: 3, by: known-good.perplexity}   # lm_eval suites only on the 3 best
gates:                               # the policy (default: known-good must not regress > 5%)
  - {suite: known-good, metric: perplexity, max_increase: 2%}   # guardrail, relative
  - {suite: arith, metric: acc, max_drop: 0.02}                 # guardrail, absolute
  - {suite: style, metric: perplexity, min_decrease: 10%}       # objective
  - {suite: arith, metric: acc, min: 0.6}                       # absolute floor
  - {suite: style, metric: kl, max: 0.05}                       # drift floors (drift on for the suite)
  - {suite: french, metric: perplexity, max_increase: 5%, informational: true}
select: style.perplexity             # ranks the passing checkpoints
contamination:                       # do the suites repeat the training data? (gate.overlap)
  training_data: [data/train.jsonl]  # relative to this file
  suites: [known-good]               # default: every perplexity suite
  n: 8                               # words per n-gram
reference: release                   # also gate against the blessed release (or a checkpoint name)
drift: true                          # drift on every perplexity suite (a suite's `drift: false` wins)
alpha: 0.05
confirm: 0.5                         # select on half the items, certify on the other half
device: auto                         # auto | cpu | cuda | cuda:N | mps
dtype: auto                          # auto | float32 | bfloat16 | float16
batch_size: 8
max_length: null                     # context used for scoring; default: the model's
stride: null                         # sliding-window step for long documents
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from gate.errors import ConfigError
from gate.kinds import Bound, SuiteType
from gate.overlap import DEFAULT_N
from gate.probes import DEFAULT_DETECTORS, DEFAULT_MAX_NEW_TOKENS, GENERATE_METRICS
from gate.suites import builtin_entries, builtin_suites_dir

CONFIG_NAME = "gate.yaml"
DEVICES_HELP = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")
SUITE_TYPES = ("perplexity", "lm_eval", "generate")
TOP_KEYS = {
    "base",
    "suites",
    "device",
    "dtype",
    "batch_size",
    "max_length",
    "stride",
    "funnel",
    "gates",
    "select",
    "alpha",
    "confirm",
    "seed",
    "bootstrap_iterations",
    "reference",
    "contamination",
    "detectors",
    "drift",
    "drift_k",
}
GATE_BOUNDS = {
    # bound: (kind, which direction is harm for it: the metric must be lower-is-better or not)
    "max_increase": ("guardrail", True),
    "max_drop": ("guardrail", False),
    "min_decrease": ("objective", True),
    "min_gain": ("objective", False),
    "min": ("floor", None),
    "max": ("floor", None),
}
LOWER_IS_BETTER = {"perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity", "words", "repetition", "kl"}
"""Perplexity-suite metrics (always lower is better), lm-eval's rolling perplexities, the generate suites' length and repetition, and drift's KL."""
HIGHER_IS_BETTER = {"acc", "acc_norm", "exact_match", "f1", "mcc", "acc_mutual_info"}
"""lm-eval metrics whose direction is known when a results.json predates recorded higher_is_better."""
GATE_KEYS = {"suite", "metric", "informational", "higher_is_better", "cluster", "min_items"}
DRIFT_METRICS = ("kl", "top1")  # of perplexity suites with drift on; gated as floors (min/max) only
DEFAULT_DRIFT_K = 0  # drift: true alone: the exact method (gate.runner.perplexity.DRIFT_EXACT); drift_k: N: top-N
DEFAULT_MAX_INCREASE = 0.05
SUITE_KEYS = {
    "name",
    "type",
    "path",
    "task",
    "num_fewshot",
    "limit",
    "metric",
    "chat_template",
    "max_new_tokens",
    "system",
    "gen_kwargs",
    "system_instruction",
    "drift",
    "drift_k",
}
ONLY_FOR = {
    "path": ("perplexity", "generate"),
    "task": ("lm_eval",),
    "num_fewshot": ("lm_eval",),
    "gen_kwargs": ("lm_eval",),
    "system_instruction": ("lm_eval",),
    "max_new_tokens": ("generate",),
    "system": ("generate",),
    "drift": ("perplexity",),
    "drift_k": ("perplexity",),
}
PERPLEXITY_METRICS = ("perplexity", "bits_per_byte")
SUITE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
DEFAULT_SUITES = ("known-good",)
_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


class NamedSuite(Protocol):
    """What the policy needs to know of a suite: gate.yaml's SuiteSpec, or results.json's SuiteInfo."""

    name: str
    type: SuiteType
    metric: str | None
    drift_k: int | None


@dataclass
class SuiteSpec:
    """One suite entry of gate.yaml."""

    name: str
    """Unique name; results and policy refer to the suite by it."""
    type: SuiteType = "perplexity"
    """``perplexity`` (JSONL documents scored by gate) or ``lm_eval`` (an lm-evaluation-harness task)."""
    path: str = ""
    """perplexity: absolute path of the JSONL file (resolved against gate.yaml's folder)."""
    task: str = ""
    """lm_eval: a registered task name, or the absolute path of a task YAML or a folder of them."""
    num_fewshot: int | None = None
    """lm_eval: few-shot examples per prompt; None keeps the task's own setting."""
    limit: int | None = None
    """Score only the first N documents (quick runs; results are marked partial)."""
    metric: str | None = None
    """Headline metric: perplexity|bits_per_byte, or an lm-eval metric (default: the task's first)."""
    chat_template: bool | None = None
    """Apply the tokenizer's chat template (default: on for perplexity and generate prompts, off for lm_eval)."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    """generate: tokens generated at most per prompt."""
    system: str | None = None
    """generate: system prompt put before every prompt."""
    gen_kwargs: dict | str | None = None
    """lm_eval: generation settings passed to lm-eval (``{temperature: 0, max_gen_toks: 64}`` or "k=v,...")."""
    system_instruction: str | None = None
    """lm_eval: system instruction lm-eval puts before every prompt."""
    line: int | None = None
    """Line of this entry in gate.yaml (for messages); None for defaults."""
    drift_k: int | None = None
    """perplexity: measure drift from the base (KL, top-1 agreement). None: off; 0: the exact method
    (``drift: true`` here or at the top of gate.yaml); k >= 1 (``drift_k: k``): the top-k method."""

    @property
    def use_chat_template(self) -> bool:
        return self.chat_template if self.chat_template is not None else self.type in ("perplexity", "generate")


@dataclass
class Contamination:
    """Check that suites do not repeat the training data (word n-gram overlap; see gate.overlap)."""

    training_data: list[str]
    """Training files (absolute paths; relative ones in gate.yaml are resolved against it)."""
    suites: list[str]
    """Perplexity suites to check."""
    n: int = DEFAULT_N
    """Words per n-gram."""


@dataclass
class Funnel:
    """Run the lm_eval suites only on the best checkpoints by a perplexity suite (lower is better)."""

    top_k: int
    """How many checkpoints (besides the base) get the lm_eval suites."""
    suite: str
    """The perplexity suite that ranks them."""
    metric: str
    """``perplexity`` or ``bits_per_byte``."""


@dataclass
class Gate:
    """One check of the policy: a guardrail, an objective or an absolute floor on one suite's metric."""

    suite: str
    """Suite name."""
    metric: str
    """Metric of that suite (perplexity, bits_per_byte, acc, ...)."""
    bound: Bound
    """max_increase | max_drop (guardrails), min_decrease | min_gain (objectives), min | max (floors)."""
    margin: float
    """The margin (>= 0) or, for floors, the limit value."""
    relative: bool = False
    """Margin given in percent of the base's value ("2%")."""
    informational: bool = False
    """Reported but never decides a verdict."""
    higher_is_better: bool | None = None
    """The metric's direction when set in the gate; None: the suite type's, else lm-eval's ``higher_is_better``."""
    cluster: str | None = None
    """Item field that groups items (passage id, subject): resample and estimate variance by cluster."""
    min_items: int | None = None
    """Fewer items (clusters) than this make the check inconclusive; None: gate.policy's default."""

    @property
    def kind(self) -> str:
        return GATE_BOUNDS[self.bound][0]

    @property
    def lower_is_better(self) -> bool:
        """The direction known without results (the gate's own, or a metric's known one); else higher."""
        known = known_direction(self.metric) if self.higher_is_better is None else not self.higher_is_better
        return bool(known)

    def describe(self) -> str:
        margin = f"{self.margin * 100:g}%" if self.relative else f"{self.margin:g}"
        tail = " (informational)" if self.informational else ""
        return f"{self.suite}.{self.metric} {self.bound.replace('_', ' ')} {margin}{tail}"


def known_direction(metric: str) -> bool | None:
    """True (lower is better) or False for metrics whose direction is fixed; None when only the task knows.

    lm-eval task metrics take their direction from the task (``higher_is_better``, recorded in
    results.json); a per-item ``perplexity`` of an lm-eval task is a log-likelihood, so the name alone
    decides nothing for it in lm-eval suites (gate.policy asks the suite first).
    """
    if metric in LOWER_IS_BETTER:
        return True
    if metric.split(",")[0] in HIGHER_IS_BETTER:
        return False
    return None


@dataclass
class Policy:
    """What a checkpoint must satisfy to ship, and how the passing ones are ranked."""

    gates: list[Gate]
    """Every check, in gate.yaml order."""
    select: tuple[str, str] | None = None
    """(suite, metric) that ranks the passing checkpoints; None: the first objective's, else the first gate's."""
    alpha: float = 0.05
    """P(a checkpoint that violates any gate passes) <= alpha: intersection-union within, Holm across checkpoints."""
    confirm: float | None = None
    """Fraction of items used to select; the candidate is certified on the rest. None: no split."""
    seed: int = 0
    """Seed of the bootstrap's random numbers."""
    bootstrap_iterations: int = 10_000
    """Bootstrap replicates per comparison (at least; raised to 20 K / alpha for K checkpoints)."""
    reference: str | None = None
    """Also gate against this: ``release`` (the blessed release) or a checkpoint's name. None: the base only."""

    def to_json(self) -> dict:
        """Field by field: verdict.json records the policy it applied, and ``from_json`` reads it back exactly."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Policy:
        select = tuple(obj["select"]) if obj.get("select") else None
        return cls(**{**obj, "gates": [Gate(**g) for g in obj["gates"]], "select": select})

    @property
    def ranking(self) -> tuple[str, str]:
        if self.select:
            return self.select
        objectives = [g for g in self.gates if g.kind == "objective"]
        first = (objectives or self.gates)[0]
        return first.suite, first.metric


@dataclass(frozen=True)
class RunOptions:
    """How models are loaded and scored, declared once: gate.yaml's top-level keys (the first five),
    `gate run`'s options and ``gate.run``'s keywords are these fields (tests/test_config.py checks
    that they stay so), and the run request carries them."""

    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """Weights dtype: auto is bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    batch_size: int = 8
    """Sequences per forward pass (halved automatically on CUDA out-of-memory)."""
    max_length: int | None = None
    """Tokens per scored window; None: the model's context size, capped at 2048."""
    stride: int | None = None
    """Sliding-window step for documents longer than max_length; None: max_length // 2."""
    limit: int | None = None
    """Only the first N documents of every suite: a quick run, marked partial (not in gate.yaml)."""
    allow_pickle: bool = False
    """Accept pickled (.bin/.pt) weights, which can run code when loaded (not in gate.yaml)."""
    trust_remote_code: bool = False
    """Run model code shipped with the base (not in gate.yaml)."""
    online: bool = False
    """Allow contacting the Hugging Face hub to resolve a hub id (not in gate.yaml)."""


YAML_OPTIONS = ("device", "dtype", "batch_size", "max_length", "stride")
"""The run options gate.yaml may set (the others are choices of one invocation, or of its machine)."""


@dataclass
class GateConfig:
    """The whole configuration of a run."""

    path: str | None = None
    """The gate.yaml it came from; None when defaults are used."""
    base: str | None = None
    """Base model: a local folder or a hub id; None takes the base the adapters name."""
    suites: list[SuiteSpec] = field(default_factory=list)
    """Suites to score every model on."""
    options: RunOptions = field(default_factory=RunOptions)
    """gate.yaml's run options (``YAML_OPTIONS``); the others keep their defaults here."""
    funnel: Funnel | None = None
    """Cheap checks on every checkpoint, lm_eval suites on the top k only."""
    contamination: Contamination | None = None
    """Overlap check between suites and the training data (None: not checked)."""
    policy: Policy | None = None
    """The release policy (gates, select, alpha); default: no perplexity suite may rise > 5%."""
    detectors: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_DETECTORS))
    """generate suites: ``abstains`` / ``refuses`` -> the phrases that detect them (gate.probes)."""

    @property
    def perplexity_suites(self) -> list[SuiteSpec]:
        return [s for s in self.suites if s.type == "perplexity"]

    @property
    def lm_eval_suites(self) -> list[SuiteSpec]:
        return [s for s in self.suites if s.type == "lm_eval"]

    @property
    def generate_suites(self) -> list[SuiteSpec]:
        return [s for s in self.suites if s.type == "generate"]


def find_config(explicit: str | None, checkpoints_dir: str | None) -> Path | None:
    """--config, else DIR/gate.yaml, else ./gate.yaml, else None (defaults)."""
    if explicit:
        return Path(explicit)
    for folder in (checkpoints_dir, "."):
        if folder is not None and (Path(folder) / CONFIG_NAME).is_file():
            return Path(folder) / CONFIG_NAME
    return None


def load_config(path: str | Path | None) -> GateConfig:
    """Read gate.yaml (or return the defaults when ``path`` is None). Raises ConfigError."""
    if path is None:
        suites = [builtin_spec(n) for n in DEFAULT_SUITES]
        return GateConfig(suites=suites, policy=default_policy(suites))
    path = Path(path)
    raw = _read_yaml(path)
    problems: list[str] = []
    config = GateConfig(path=str(path))
    _unknown_keys(raw, TOP_KEYS, "", problems)
    config.base = _typed(raw, "base", str, None, "", problems)
    dtype = _typed(raw, "dtype", str, "auto", "", problems)
    if dtype not in DTYPES:
        problems.append(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    config.options = RunOptions(
        device=_typed(raw, "device", str, "auto", "", problems),
        dtype=dtype,
        batch_size=_positive_int(raw, "batch_size", 8, "", problems),
        max_length=_positive_int(raw, "max_length", None, "", problems),
        stride=_positive_int(raw, "stride", None, "", problems),
    )
    config.suites = _suites(raw.get("suites"), path.parent.resolve(), problems)
    _drift(raw, config.suites, problems)
    config.funnel = _funnel(raw.get("funnel"), config.suites, problems)
    config.contamination = _contamination(raw.get("contamination"), config.suites, path.parent.resolve(), problems)
    config.policy = _policy(raw, config.suites, problems)
    config.detectors = _detectors(raw.get("detectors"), problems)
    _add_lines(path, config.suites, problems)
    if problems:
        raise ConfigError(str(path), problems)
    return config


def load_policy(path: str | Path | None, suites: Sequence[NamedSuite] | None = None) -> Policy:
    """Only the policy of gate.yaml (gates, select, alpha, confirm, seed, reference...); reads no data file.

    The gates are checked against ``suites`` (anything with ``name``, ``type`` and ``drift_k``:
    results.json's suites, which say what was scored) or, when None, against the suites gate.yaml
    names (their types and drift settings as written there; no suite, task or training file is
    opened). Without ``gates:``, the default policy of the suites gate.yaml names. ``path`` None:
    the default policy of ``suites`` (of the built-in ones when None too).
    Raises ConfigError listing every problem of the policy.
    """
    if path is None:
        return default_policy(suites if suites is not None else [builtin_spec(n) for n in DEFAULT_SUITES])
    path = Path(path)
    raw = _read_yaml(path)
    problems: list[str] = []
    _unknown_keys(raw, TOP_KEYS, "", problems)
    scope = "in results.json" if suites is not None else "configured"
    declared = _suites(raw.get("suites"), path.parent.resolve(), problems, files=False)
    _drift(raw, declared, problems)
    _add_lines(path, declared, problems)
    # Without `gates:`, the default policy is that of the suites as gate.yaml declares them (their metric).
    policy = _policy(raw, declared if suites is None else suites, problems, scope, defaults=declared)
    if problems:
        raise ConfigError(str(path), problems)
    return policy


def _read_yaml(path: Path) -> dict:
    """gate.yaml's top-level mapping, or a ConfigError naming the file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found; pass an existing gate.yaml with --config"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), [f"cannot be read ({err})"]) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["must be a mapping of keys (base, suites, ...)"])
    return raw


def _suites(value: object, folder: Path, problems: list[str], files: bool = True) -> list[SuiteSpec]:
    if value is None:
        return [builtin_spec(n) for n in DEFAULT_SUITES]
    if not isinstance(value, list) or not value:
        problems.append("suites: must be a non-empty list of {name, type, path|task} entries")
        return []
    specs = []
    seen = set()
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            problems.append(f"suites[{i}]: must be a mapping with at least a name")
            continue
        name = entry.get("name")
        if isinstance(name, str) and name in seen:
            problems.append(f"suites[{i}] ({name}).name: {name!r} is used twice; suite names must be unique")
        seen.add(name)
        spec = _suite(entry, i, folder, problems, files)
        if spec is not None:
            specs.append(spec)
    return specs


def _suite(entry: dict, i: int, folder: Path, problems: list[str], files: bool = True) -> SuiteSpec | None:
    """One suite entry; ``files`` False: its path / task is taken as written, never looked up on disk."""
    _unknown_keys(entry, SUITE_KEYS, f"suites[{i}].", problems)
    name = _typed(entry, "name", str, None, f"suites[{i}].", problems)
    if not name:
        problems.append(f"suites[{i}].name: missing; give each suite a unique name")
        return None
    if not SUITE_NAME.fullmatch(name):
        # Names become folder names under the output folder: nothing may point outside it.
        problems.append(f"suites[{i}].name: {name!r} may only use letters, digits, '.', '_' and '-' (and not start with '.')")
        return None
    where = f"suites[{i}] ({name})."
    builtin = builtin_entries().get(name)
    if "path" not in entry and "task" not in entry and builtin is not None:
        # A built-in suite by name; the entry may still override num_fewshot, limit, metric...
        entry, folder = {**builtin, **entry}, builtin_suites_dir()
    kind = _typed(entry, "type", str, "perplexity", where, problems)
    if kind not in SUITE_TYPES:
        problems.append(f"{where}type: {kind!r} is not one of {', '.join(SUITE_TYPES)}")
        return None
    for key, only in ONLY_FOR.items():
        if key in entry and kind not in only:
            problems.append(f"{where}{key}: only for type {' and '.join(only)} suites")
    drift = _typed(entry, "drift", bool, None, where, problems)
    drift_k = _typed(entry, "drift_k", int, None, where, problems)
    spec = SuiteSpec(
        name=name,
        type=kind,
        num_fewshot=_typed(entry, "num_fewshot", int, None, where, problems),
        limit=_positive_int(entry, "limit", None, where, problems),
        metric=_typed(entry, "metric", str, None, where, problems),
        chat_template=_typed(entry, "chat_template", bool, None, where, problems),
    )
    if kind == "perplexity":
        spec.drift_k = _drift_k(drift, drift_k, where, problems)
    if spec.num_fewshot is not None and spec.num_fewshot < 0:
        problems.append(f"{where}num_fewshot: must be 0 or more, not {spec.num_fewshot}")
    if kind == "perplexity":
        if spec.metric is not None and spec.metric not in PERPLEXITY_METRICS:
            problems.append(f"{where}metric: {spec.metric!r} is not one of {', '.join(PERPLEXITY_METRICS)}")
        spec.path = _file(entry, "path", name, where, folder, problems, "the path of a JSONL file", files)
    elif kind == "generate":
        if spec.metric is not None and spec.metric not in GENERATE_METRICS:
            problems.append(f"{where}metric: {spec.metric!r} is not one of {', '.join(GENERATE_METRICS)}")
        spec.path = _file(entry, "path", name, where, folder, problems, "the path of a JSONL file of prompts", files)
        spec.system = _typed(entry, "system", str, None, where, problems)
        tokens = _typed(entry, "max_new_tokens", int, DEFAULT_MAX_NEW_TOKENS, where, problems)
        if tokens <= 0:
            problems.append(f"{where}max_new_tokens: must be a positive integer (tokens generated per prompt), not {tokens}; e.g. 128")
            tokens = DEFAULT_MAX_NEW_TOKENS
        spec.max_new_tokens = tokens
    else:
        spec.system_instruction = _typed(entry, "system_instruction", str, None, where, problems)
        spec.gen_kwargs = _gen_kwargs(entry.get("gen_kwargs"), where, problems)
        spec.task = _task(entry, where, folder, problems, files)
    return spec


def _drift_k(drift: bool | None, k: int | None, where: str, problems: list[str]) -> int | None:
    """A suite's drift setting: None (off), 0 (exact), or the top-k size; drift_k alone turns drift on."""
    if k is not None and k < 1:
        problems.append(f"{where}drift_k: must be at least 1 (the size of the base's top-k reference), not {k}")
        return None
    if drift is False:
        return None
    return k if k is not None else (DEFAULT_DRIFT_K if drift else None)


def _drift(raw: dict, suites: list[SuiteSpec], problems: list[str]) -> None:
    """Top-level ``drift: true`` / ``drift_k``: the default for every perplexity suite that sets neither."""
    drift = _typed(raw, "drift", bool, None, "", problems)
    k = _typed(raw, "drift_k", int, None, "", problems)
    if k is not None and k < 1:
        problems.append(f"drift_k: must be at least 1 (the size of the base's top-k reference), not {k}")
        return
    if drift is False or (drift is None and k is None):
        return
    entries = raw.get("suites") if isinstance(raw.get("suites"), list) else []
    off = {e.get("name") for e in entries if isinstance(e, dict) and e.get("drift") is False}
    for spec in suites:
        if spec.type == "perplexity" and spec.drift_k is None and spec.name not in off:
            spec.drift_k = k if k is not None else DEFAULT_DRIFT_K


def _file(entry: dict, key: str, name: str, where: str, folder: Path, problems: list[str], what: str, files: bool = True) -> str:
    value = _typed(entry, key, str, None, where, problems)
    if value is None:
        known = ", ".join(sorted(builtin_entries()))
        problems.append(f"{where}{key}: missing, and there is no built-in suite {name!r} (built-in: {known}); give {what}")
        return ""
    resolved = (folder / value).resolve()
    if files and not resolved.is_file():
        problems.append(f"{where}{key}: {resolved} does not exist; fix the path (relative to gate.yaml)")
    return str(resolved)


def _task(entry: dict, where: str, folder: Path, problems: list[str], files: bool = True) -> str:
    value = _typed(entry, "task", str, None, where, problems)
    if value is None:
        problems.append(f"{where}task: missing; name a registered lm-eval task, or a task YAML or folder")
        return ""
    candidate = (folder / value).resolve()
    if not files:
        return value
    if candidate.exists():
        return str(candidate)
    if value.endswith((".yaml", ".yml")) or "/" in value or value.startswith("."):
        problems.append(f"{where}task: {candidate} does not exist; fix the path (relative to gate.yaml)")
    return value  # a registered task name; lm-eval checks it when the run starts


def _funnel(value: object, suites: list[SuiteSpec], problems: list[str]) -> Funnel | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append("funnel: must be a mapping {top_k: N, by: suite.metric}")
        return None
    _unknown_keys(value, {"top_k", "by"}, "funnel.", problems)
    top_k = _positive_int(value, "top_k", None, "funnel.", problems)
    by = _typed(value, "by", str, None, "funnel.", problems)
    if top_k is None or by is None:
        problems.append("funnel: needs top_k (a positive integer) and by (suite.metric, e.g. known-good.perplexity)")
        return None
    suite, _, metric = by.rpartition(".")
    kinds = {s.name: s.type for s in suites}
    if kinds.get(suite) != "perplexity" or metric not in PERPLEXITY_METRICS:
        ranked = ", ".join(f"{s.name}.perplexity" for s in suites if s.type == "perplexity") or "none configured"
        problems.append(f"funnel.by: {by!r} must name a perplexity suite and perplexity|bits_per_byte (choices: {ranked})")
        return None
    return Funnel(top_k=top_k, suite=suite, metric=metric)


def _contamination(value: object, suites: list[SuiteSpec], folder: Path, problems: list[str]) -> Contamination | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(f"contamination: must be a mapping {{training_data: [files], suites: [names], n: {DEFAULT_N}}}")
        return None
    _unknown_keys(value, {"training_data", "suites", "n"}, "contamination.", problems)
    files = value.get("training_data")
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        problems.append("contamination.training_data: must list the training files (paths relative to gate.yaml)")
        return None
    resolved = []
    for f in files:
        path = (folder / f).resolve()
        if not path.is_file():
            problems.append(f"contamination.training_data: {f}: file not found (looked at {path})")
        resolved.append(str(path))
    perplexity = [s.name for s in suites if s.type == "perplexity"]
    names = value.get("suites", perplexity)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append("contamination.suites: must list perplexity suite names")
        names = []
    for name in names:
        if name not in perplexity:
            problems.append(
                f"contamination.suites: {name!r} is not a perplexity suite of this config (choices: {', '.join(perplexity) or 'none'})"
            )
    n = _positive_int(value, "n", DEFAULT_N, "contamination.", problems)
    return Contamination(training_data=resolved, suites=[name for name in names if name in perplexity], n=n)


def default_policy(suites: Sequence[NamedSuite]) -> Policy:
    """Without `gates:`: every perplexity suite is a guardrail that may not rise more than 5%."""
    gates = [
        Gate(suite=s.name, metric=s.metric or "perplexity", bound="max_increase", margin=DEFAULT_MAX_INCREASE, relative=True)
        for s in suites
        if s.type == "perplexity"
    ]
    return Policy(gates=gates)


def _policy(
    raw: dict, suites: Sequence[NamedSuite], problems: list[str], scope: str = "configured", defaults: Sequence[NamedSuite] | None = None
) -> Policy:
    """The policy keys of gate.yaml, checked against ``suites`` (``scope``: where they come from, for
    messages); without ``gates:``, the default policy of ``defaults`` (default: ``suites``)."""
    alpha = raw.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        problems.append(f"alpha: must be a number between 0 and 0.5, not {alpha!r}")
        alpha = 0.05
    confirm = raw.get("confirm")
    if confirm is not None and (isinstance(confirm, bool) or not isinstance(confirm, (int, float)) or not 0 < confirm < 1):
        problems.append(f"confirm: must be a fraction between 0 and 1 (e.g. 0.5), not {confirm!r}")
        confirm = None
    seed = _typed(raw, "seed", int, 0, "", problems)
    iterations = _positive_int(raw, "bootstrap_iterations", 10_000, "", problems)
    if "gates" not in raw:
        policy = default_policy(suites if defaults is None else defaults)
    else:
        policy = Policy(gates=_gates(raw["gates"], suites, problems, scope))
    policy.alpha, policy.confirm, policy.seed, policy.bootstrap_iterations = float(alpha), confirm, seed, iterations
    policy.reference = _typed(raw, "reference", str, None, "", problems)
    select = raw.get("select")
    if select is not None:
        parsed = _suite_metric(select, suites, "select", problems, scope)
        policy.select = parsed
    return policy


def _gates(value: object, suites: Sequence[NamedSuite], problems: list[str], scope: str = "configured") -> list[Gate]:
    if not isinstance(value, list) or not value:
        problems.append("gates: must be a non-empty list of {suite, metric, <bound>: margin} entries")
        return []
    gates = []
    for i, entry in enumerate(value):
        where = f"gates[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping like {{suite: known-good, metric: perplexity, max_increase: 2%}}")
            continue
        _unknown_keys(entry, {*GATE_KEYS, *GATE_BOUNDS}, f"{where}.", problems)
        suite_metric = _suite_metric(f"{entry.get('suite')}.{entry.get('metric')}", suites, where, problems, scope)
        bounds = [b for b in GATE_BOUNDS if b in entry]
        if len(bounds) != 1:
            problems.append(f"{where}: needs exactly one of {', '.join(GATE_BOUNDS)} (found {len(bounds)})")
            continue
        bound = bounds[0]
        margin, relative = _margin(entry[bound], f"{where}.{bound}", problems)
        informational = _typed(entry, "informational", bool, False, f"{where}.", problems)
        direction = _typed(entry, "higher_is_better", bool, None, f"{where}.", problems)
        cluster = _typed(entry, "cluster", str, None, f"{where}.", problems)
        min_items = _positive_int(entry, "min_items", None, f"{where}.", problems)
        if suite_metric is None or margin is None:
            continue
        gate = Gate(suite_metric[0], suite_metric[1], bound, margin, relative, informational, direction, cluster, min_items)
        if gate.metric in DRIFT_METRICS and gate.kind != "floor":
            limit = "max: 0.05" if gate.metric == "kl" else "min: 0.9"
            problems.append(f"{where}.{bound}: {gate.metric} is the checkpoint's drift from the base; gate it as a floor, e.g. {limit}")
            continue
        spec = next(sp for sp in suites if sp.name == gate.suite)
        if spec.type == "perplexity" and gate.metric not in DRIFT_METRICS and direction is False:
            problems.append(f"{where}.higher_is_better: {gate.metric} of a perplexity suite is better when lower; remove the key")
            continue
        if spec.type in ("perplexity", "generate"):
            # Known by gate: perplexities, kl, words and repetition lower; top1 and probe checks higher.
            known = gate.metric in LOWER_IS_BETTER or (spec.type == "perplexity" and gate.metric not in DRIFT_METRICS)
        else:
            known = None if direction is None else not direction
        if known is None and gate.metric in LOWER_IS_BETTER:
            known = True  # lm-eval's rolling perplexities (word_perplexity, bits_per_byte, ...)
        wants_lower = GATE_BOUNDS[bound][1]
        # Unknown here (an lm-eval metric): gate.policy.validate checks it against lm-eval's higher_is_better.
        if wants_lower is not None and known is not None and wants_lower != known:
            better = "lower" if known else "higher"
            fitting = "max_increase / min_decrease" if known else "max_drop / min_gain"
            problems.append(f"{where}.{bound}: {gate.metric} is better when {better}; use {fitting}")
            continue
        if bound in ("min", "max") and relative:
            problems.append(f"{where}.{bound}: a floor is an absolute value, not a percentage")
            continue
        gates.append(gate)
    return gates


def _margin(value: object, where: str, problems: list[str]) -> tuple[float | None, bool]:
    relative = isinstance(value, str) and value.strip().endswith("%")
    try:
        number = float(value.strip().rstrip("%")) / 100 if relative else float(value)
    except (TypeError, ValueError, AttributeError):
        problems.append(f"{where}: must be a number or a percentage like 2%, not {value!r}")
        return None, False
    if isinstance(value, bool) or number < 0 or not math.isfinite(number):
        problems.append(f"{where}: must be 0 or more (a margin, not a direction), not {value!r}")
        return None, False
    return number, relative


def _suite_metric(
    text: object, suites: Sequence[NamedSuite], where: str, problems: list[str], scope: str = "configured"
) -> tuple[str, str] | None:
    if not isinstance(text, str) or "." not in text:
        problems.append(f"{where}: must name suite.metric, not {text!r}")
        return None
    suite, _, metric = text.rpartition(".")
    spec = next((s for s in suites if s.name == suite), None)
    if spec is None:
        names = ", ".join(s.name for s in suites)
        problems.append(f"{where}: suite {suite!r} is not {scope} (suites: {names})")
        return None
    if spec.type == "perplexity" and metric in DRIFT_METRICS and spec.drift_k is None and scope != "configured":
        problems.append(
            f"{where}: suite {suite!r} was scored without drift, so it has no {metric!r}; add `drift: true` to it and re-run `gate run`"
        )
        return None
    if spec.type == "perplexity" and metric in DRIFT_METRICS and spec.drift_k is None:
        problems.append(
            f"{where}: metric {metric!r} is drift from the base, and suite {suite!r} does not measure it; add "
            "`drift: true` to the suite (or at the top of gate.yaml)"
        )
        return None
    if spec.type == "perplexity" and metric not in PERPLEXITY_METRICS + DRIFT_METRICS:
        problems.append(
            f"{where}: metric {metric!r} of perplexity suite {suite!r} must be perplexity or bits_per_byte (or kl / top1 with drift on)"
        )
        return None
    if spec.type == "generate" and metric not in GENERATE_METRICS:
        problems.append(f"{where}: metric {metric!r} of generate suite {suite!r} must be one of {', '.join(GENERATE_METRICS)}")
        return None
    if not metric or metric == "None":
        problems.append(f"{where}: metric missing; name one, e.g. perplexity or acc")
        return None
    return suite, metric


def _gen_kwargs(value: object, where: str, problems: list[str]) -> dict | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    problems.append(f'{where}gen_kwargs: must be a mapping like {{temperature: 0, max_gen_toks: 64}} or a string "k=v,k=v"')
    return None


def _detectors(value: object, problems: list[str]) -> dict[str, tuple[str, ...]]:
    """gate.yaml ``detectors: {abstains: [...], refuses: [...]}``: each list replaces the English default."""
    detectors = dict(DEFAULT_DETECTORS)
    if value is None:
        return detectors
    if not isinstance(value, dict):
        problems.append("detectors: must be a mapping {abstains: [phrases], refuses: [phrases]}")
        return detectors
    _unknown_keys(value, set(DEFAULT_DETECTORS), "detectors.", problems)
    for kind in DEFAULT_DETECTORS:
        if kind not in value:
            continue
        phrases = value[kind]
        if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
            problems.append(f"detectors.{kind}: must be a non-empty list of phrases (strings)")
            continue
        detectors[kind] = tuple(phrases)
    return detectors


def _add_lines(path: Path, suites: list[SuiteSpec], problems: list[str]) -> None:
    """Record each suite entry's line in gate.yaml, and name it in the problems about that suite."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return
    entries, names = {}, {}
    if isinstance(root, yaml.MappingNode):
        for key, node in root.value:
            if key.value == "suites" and isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    entries[i] = item.start_mark.line + 1
                    if isinstance(item, yaml.MappingNode):
                        for k, v in item.value:
                            if k.value == "name" and isinstance(v, yaml.ScalarNode):
                                names[v.value] = item.start_mark.line + 1
    for i, line in entries.items():
        prefix = f"suites[{i}]"
        for k, problem in enumerate(problems):
            if problem.startswith((prefix + ".", prefix + " ", prefix + ":")):
                problems[k] = f"line {line}: {problem}"
    for spec in suites:
        spec.line = names.get(spec.name)


def builtin_spec(name: str) -> SuiteSpec:
    """The SuiteSpec of a built-in suite (suites/builtin.yaml)."""
    problems: list[str] = []
    spec = _suite({"name": name}, 0, builtin_suites_dir(), problems)
    if problems or spec is None:  # a broken install, not a user error
        raise ConfigError(None, [f"built-in suite {name!r} is missing from this installation; reinstall gate"])
    return spec


def _unknown_keys(mapping: dict, allowed: set[str], where: str, problems: list[str]) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(sorted(allowed))}"
            problems.append(f"{where}{key}: unknown key{hint}")


def _typed(mapping: dict, key: str, kind: type, default, where: str, problems: list[str]):
    if key not in mapping or mapping[key] is None:
        return default
    value = mapping[key]
    # bool is an int in Python; a YAML "yes" must not pass for a number or vice versa.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        problems.append(f"{where}{key}: must be {_KIND_NAMES[kind]}, not {value!r}")
        return default
    return value


def _positive_int(mapping: dict, key: str, default, where: str, problems: list[str]):
    value = _typed(mapping, key, int, default, where, problems)
    if value is not None and value is not default and value <= 0:
        problems.append(f"{where}{key}: must be a positive integer, not {value}")
        return default
    return value
