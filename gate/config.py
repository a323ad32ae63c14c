"""gate.yaml -> typed configuration. Every problem is reported at once, with the file and field.

    base: HuggingFaceTB/SmolLM2-135M     # optional: a local folder or a hub id
    suites:
      - name: known-good                 # name only: a built-in suite (suites/builtin.yaml)
      - name: style
        type: perplexity                 # the default
        path: data/style.jsonl           # relative to this file
        chat_template: true              # prompt/completion through the chat template
        limit: 500                       # optional: the first N documents
      - name: arith
        type: lm_eval
        task: tasks/arith.yaml           # a registered lm-eval task, a task YAML or a folder
        num_fewshot: 0                   # default: the task's own
        limit: null
        metric: acc                      # default: the task's first metric
    funnel: {top_k: 3, by: known-good.perplexity}   # lm_eval suites only on the 3 best
    device: auto                         # auto | cpu | cuda | cuda:N | mps
    dtype: auto                          # auto | float32 | bfloat16 | float16
    batch_size: 8
    max_length: null                     # context used for scoring; default: the model's
    stride: null                         # sliding-window step for long documents
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gate.errors import ConfigError
from gate.suites import builtin_entries, builtin_suites_dir

CONFIG_NAME = "gate.yaml"
DEVICES_HELP = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")
SUITE_TYPES = ("perplexity", "lm_eval")
TOP_KEYS = {"base", "suites", "device", "dtype", "batch_size", "max_length", "stride", "funnel"}
SUITE_KEYS = {"name", "type", "path", "task", "num_fewshot", "limit", "metric", "chat_template"}
ONLY_FOR = {"path": "perplexity", "task": "lm_eval", "num_fewshot": "lm_eval"}
PERPLEXITY_METRICS = ("perplexity", "bits_per_byte")
DEFAULT_SUITES = ("known-good",)
_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


@dataclass
class SuiteSpec:
    """One suite entry of gate.yaml."""

    name: str
    """Unique name; results and policy refer to the suite by it."""
    type: str = "perplexity"
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
    """Apply the tokenizer's chat template (default: on for perplexity prompts, off for lm_eval)."""

    @property
    def use_chat_template(self) -> bool:
        return self.chat_template if self.chat_template is not None else self.type == "perplexity"


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
class GateConfig:
    """The whole configuration of a run."""

    path: str | None = None
    """The gate.yaml it came from; None when defaults are used."""
    base: str | None = None
    """Base model: a local folder or a hub id; None takes the base the adapters name."""
    suites: list[SuiteSpec] = field(default_factory=list)
    """Suites to score every model on."""
    device: str = "auto"
    """Where to run: auto picks cuda when available, else cpu."""
    dtype: str = "auto"
    """Weights dtype: auto is bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    batch_size: int = 8
    """Sequences per forward pass (halved automatically on CUDA out-of-memory)."""
    max_length: int | None = None
    """Tokens per scored window; None uses the model's context size."""
    stride: int | None = None
    """Sliding-window step for documents longer than max_length; None uses max_length // 2."""
    funnel: Funnel | None = None
    """Cheap checks on every checkpoint, lm_eval suites on the top k only."""

    @property
    def perplexity_suites(self) -> list[SuiteSpec]:
        return [s for s in self.suites if s.type == "perplexity"]

    @property
    def lm_eval_suites(self) -> list[SuiteSpec]:
        return [s for s in self.suites if s.type == "lm_eval"]


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
        return GateConfig(suites=[_builtin_spec(n) for n in DEFAULT_SUITES])
    path = Path(path)
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
    problems: list[str] = []
    config = GateConfig(path=str(path))
    _unknown_keys(raw, TOP_KEYS, "", problems)
    config.base = _typed(raw, "base", str, None, "", problems)
    config.device = _typed(raw, "device", str, "auto", "", problems)
    dtype = _typed(raw, "dtype", str, "auto", "", problems)
    if dtype not in DTYPES:
        problems.append(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    config.dtype = dtype
    config.batch_size = _positive_int(raw, "batch_size", 8, "", problems)
    config.max_length = _positive_int(raw, "max_length", None, "", problems)
    config.stride = _positive_int(raw, "stride", None, "", problems)
    config.suites = _suites(raw.get("suites"), path.parent.resolve(), problems)
    config.funnel = _funnel(raw.get("funnel"), config.suites, problems)
    if problems:
        raise ConfigError(str(path), problems)
    return config


def _suites(value: object, folder: Path, problems: list[str]) -> list[SuiteSpec]:
    if value is None:
        return [_builtin_spec(n) for n in DEFAULT_SUITES]
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
        spec = _suite(entry, i, folder, problems)
        if spec is not None:
            specs.append(spec)
    return specs


def _suite(entry: dict, i: int, folder: Path, problems: list[str]) -> SuiteSpec | None:
    _unknown_keys(entry, SUITE_KEYS, f"suites[{i}].", problems)
    name = _typed(entry, "name", str, None, f"suites[{i}].", problems)
    if not name:
        problems.append(f"suites[{i}].name: missing; give each suite a unique name")
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
        if key in entry and only != kind:
            problems.append(f"{where}{key}: only for type {only} suites")
    spec = SuiteSpec(
        name=name,
        type=kind,
        num_fewshot=_typed(entry, "num_fewshot", int, None, where, problems),
        limit=_positive_int(entry, "limit", None, where, problems),
        metric=_typed(entry, "metric", str, None, where, problems),
        chat_template=_typed(entry, "chat_template", bool, None, where, problems),
    )
    if spec.num_fewshot is not None and spec.num_fewshot < 0:
        problems.append(f"{where}num_fewshot: must be 0 or more, not {spec.num_fewshot}")
    if kind == "perplexity":
        if spec.metric is not None and spec.metric not in PERPLEXITY_METRICS:
            problems.append(f"{where}metric: {spec.metric!r} is not one of {', '.join(PERPLEXITY_METRICS)}")
        spec.path = _file(entry, "path", name, where, folder, problems, "the path of a JSONL file")
    else:
        spec.task = _task(entry, where, folder, problems)
    return spec


def _file(entry: dict, key: str, name: str, where: str, folder: Path, problems: list[str], what: str) -> str:
    value = _typed(entry, key, str, None, where, problems)
    if value is None:
        known = ", ".join(sorted(builtin_entries()))
        problems.append(f"{where}{key}: missing, and there is no built-in suite {name!r} (built-in: {known}); give {what}")
        return ""
    resolved = (folder / value).resolve()
    if not resolved.is_file():
        problems.append(f"{where}{key}: {resolved} does not exist; fix the path (relative to gate.yaml)")
    return str(resolved)


def _task(entry: dict, where: str, folder: Path, problems: list[str]) -> str:
    value = _typed(entry, "task", str, None, where, problems)
    if value is None:
        problems.append(f"{where}task: missing; name a registered lm-eval task, or a task YAML or folder")
        return ""
    candidate = (folder / value).resolve()
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


def _builtin_spec(name: str) -> SuiteSpec:
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
