"""gate.yaml -> typed configuration. Every problem is reported at once, with the file and field.

    base: HuggingFaceTB/SmolLM2-135M     # optional: a local folder or a hub id
    suites:
      - name: known-good                 # no path: a built-in suite of that name
      - name: style
        type: perplexity                 # the default
        path: data/style.jsonl           # relative to this file
        chat_template: true              # prompt/completion through the chat template
        max_documents: 500               # optional cap
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
from gate.suites import builtin_suite_names, builtin_suite_path

CONFIG_NAME = "gate.yaml"
DEVICES_HELP = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")
SUITE_TYPES = ("perplexity",)
TOP_KEYS = {"base", "suites", "device", "dtype", "batch_size", "max_length", "stride"}
SUITE_KEYS = {"name", "type", "path", "chat_template", "max_documents"}
DEFAULT_SUITES = ("known-good",)
_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


@dataclass
class SuiteSpec:
    """One suite entry of gate.yaml."""

    name: str
    """Unique name; results and policy refer to the suite by it."""
    type: str = "perplexity"
    """Suite type; ``perplexity`` (JSONL documents)."""
    path: str = ""
    """Absolute path of the data file (resolved against gate.yaml's folder, or a built-in suite)."""
    chat_template: bool = True
    """Score prompt/completion documents through the tokenizer's chat template."""
    max_documents: int | None = None
    """Use only the first N documents (quick runs)."""


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
    if problems:
        raise ConfigError(str(path), problems)
    return config


def _suites(value: object, folder: Path, problems: list[str]) -> list[SuiteSpec]:
    if value is None:
        return [_builtin_spec(n) for n in DEFAULT_SUITES]
    if not isinstance(value, list) or not value:
        problems.append("suites: must be a non-empty list of {name, type, path} entries")
        return []
    specs = []
    seen = set()
    for i, entry in enumerate(value):
        where = f"suites[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with at least a name")
            continue
        _unknown_keys(entry, SUITE_KEYS, f"{where}.", problems)
        name = _typed(entry, "name", str, None, f"{where}.", problems)
        if not name:
            problems.append(f"{where}.name: missing; give each suite a unique name")
            continue
        where = f"suites[{i}] ({name})"
        if name in seen:
            problems.append(f"{where}.name: {name!r} is used twice; suite names must be unique")
        seen.add(name)
        kind = _typed(entry, "type", str, "perplexity", f"{where}.", problems)
        if kind not in SUITE_TYPES:
            problems.append(f"{where}.type: {kind!r} is not one of {', '.join(SUITE_TYPES)}")
        spec = SuiteSpec(
            name=name,
            type=kind,
            chat_template=_typed(entry, "chat_template", bool, True, f"{where}.", problems),
            max_documents=_positive_int(entry, "max_documents", None, f"{where}.", problems),
        )
        path = _typed(entry, "path", str, None, f"{where}.", problems)
        if path is None:
            builtin = builtin_suite_path(name)
            if builtin is None:
                problems.append(
                    f"{where}.path: missing, and there is no built-in suite {name!r} "
                    f"(built-in: {', '.join(builtin_suite_names())}); give the path of a JSONL file"
                )
                continue
            spec.path = str(builtin)
        else:
            resolved = (folder / path).resolve()
            if not resolved.is_file():
                problems.append(f"{where}.path: {resolved} does not exist; fix the path (relative to gate.yaml)")
            spec.path = str(resolved)
        specs.append(spec)
    return specs


def _builtin_spec(name: str) -> SuiteSpec:
    path = builtin_suite_path(name)
    if path is None:  # a broken install, not a user error
        raise ConfigError(None, [f"built-in suite {name!r} is missing from this installation; reinstall gate"])
    return SuiteSpec(name=name, path=str(path))


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
