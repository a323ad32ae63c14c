"""Finds and validates checkpoints below a folder without loading any model (no torch).

A checkpoint is a folder holding either a peft adapter (``adapter_config.json`` plus
``adapter_model.safetensors``) or full weights (``config.json`` plus ``model*.safetensors``).
Hugging Face Trainer folders ``checkpoint-N/`` and torchtune's ``epoch_N/`` are recognised at any
depth, as is a final adapter saved at a run's root. Folder links are followed (a folder of links
to checkpoints on shared storage), each real folder once. Which modules an adapter touches is
read with peft's own rules (`peft_targets`). Broken checkpoints are listed as ``invalid`` with the reason
and the fix; they are never silently skipped.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from gate.errors import CheckpointError
from gate.hashing import HashCache, file_fingerprint, sha256_files
from gate.kinds import CheckpointKind

# The Trainer's checkpoint-N and torchtune's epoch_N: the number is the step (torchtune: the epoch).
CHECKPOINT_DIR = re.compile(r"^(?:checkpoint-|epoch_)(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
FULL_SAFETENSORS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
FULL_PICKLE = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")
SKIP_DIRS = {"__pycache__", "runs", "wandb", "logs"}
PICKLE_FIX = (
    "loading pickled weights can run arbitrary code: convert them to safetensors "
    "(model.save_pretrained(..., safe_serialization=True)) or pass --allow-pickle if you trust them"
)


@dataclass
class LoraInfo:
    """LoRA hyper-parameters read from ``adapter_config.json``."""

    r: int
    """Rank of the low-rank update."""
    alpha: float
    """``lora_alpha``; the update is scaled by alpha / r."""
    target_modules: list[str] | str | None
    """Module names (or a regex) the adapter attaches to; None lets peft infer them."""
    target_parameters: list[str] | None = None
    """Parameters the adapter attaches to (LoRA on MoE expert weights); None: none."""
    use_dora: bool = False
    """DoRA: a learned magnitude per output feature on top of the low-rank update."""
    use_rslora: bool = False
    """rsLoRA: the update is scaled by alpha / sqrt(r) instead of alpha / r."""


@dataclass
class Checkpoint:
    """One checkpoint found by the scanner, valid or not."""

    name: str
    """Path relative to the scanned folder, e.g. ``run-a/checkpoint-200``; stable across machines."""
    path: str
    """Absolute path of the checkpoint folder."""
    kind: CheckpointKind
    """``lora`` (a peft LoRA adapter) or ``full`` (a complete set of model weights)."""
    status: Literal["ok", "invalid"] = "ok"
    """``ok`` or ``invalid``."""
    reason: str | None = None
    """Why it is invalid and how to fix it; None when ok."""
    step: int | None = None
    """Training step: from ``checkpoint-N`` (torchtune: the epoch of ``epoch_N``), else
    trainer_state.json's ``global_step``, else None."""
    base_model: str | None = None
    """The base the adapter names (``base_model_name_or_path``); None for full checkpoints."""
    lora: LoraInfo | None = None
    """LoRA settings for ``lora`` checkpoints."""
    train_loss: float | None = None
    """Training loss trainer_state.json logged at this step, if any."""
    eval_loss: float | None = None
    """Evaluation loss trainer_state.json logged at this step, if any."""
    weights_hash: str | None = None
    """sha256 over the config and weight files: identifies what is scored."""
    weight_files: list[str] = field(default_factory=list)
    """Weight file names inside the folder."""
    has_tokenizer: bool = False
    """Whether the folder carries its own tokenizer files (compared with the base's at run time)."""
    pickled: bool = False
    """Whether the weights are pickled (.bin); only loaded with --allow-pickle."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def invalidate(self, reason: str) -> None:
        self.status = "invalid"
        self.reason = reason

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "step": self.step,
            "kind": self.kind,
            "base_model": self.base_model,
            "status": self.status,
            "reason": self.reason,
            "lora": None if self.lora is None else vars(self.lora),
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "weights_hash": self.weights_hash,
        }


@dataclass
class ScanReport:
    """Everything the scanner found below one folder."""

    root: str
    """The scanned folder (absolute)."""
    checkpoints: list[Checkpoint]
    """All checkpoints, valid and invalid, sorted by run folder then step."""
    warnings: list[str] = field(default_factory=list)
    """Problems that do not invalidate a checkpoint (unreadable sub-folders, odd trainer_state)."""

    @property
    def valid(self) -> list[Checkpoint]:
        return [c for c in self.checkpoints if c.ok]

    @property
    def invalid(self) -> list[Checkpoint]:
        return [c for c in self.checkpoints if not c.ok]


def scan(
    root: str | Path,
    *,
    allow_pickle: bool = False,
    base: str | None = None,
    hash_cache: HashCache | None = None,
) -> ScanReport:
    """Find and validate every checkpoint below ``root``.

    ``base``: when the user named the base explicitly, adapters are not cross-checked by the
    base name they carry (a hub id and a local path can name the same model); loading them
    against the base checks their shapes instead. Without it, adapters naming a base different
    from the majority are invalid.
    """
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise CheckpointError(f"{root}: not a folder; pass the folder that holds your checkpoints")
    warnings: list[str] = []
    found = []
    for folder in _candidate_folders(root_path, warnings):
        ckpt = _inspect(folder, root_path, allow_pickle, hash_cache, warnings)
        if ckpt is not None:
            found.append(ckpt)
    if base is None:
        _check_common_base(found)
        warnings += _missing_base_paths(found)
    found.sort(key=_sort_key)
    return ScanReport(root=str(root_path), checkpoints=found, warnings=warnings)


def _sort_key(c: Checkpoint) -> tuple:
    """Group a run's checkpoint-N folders with the run's own folder, then order by step."""
    return (natural_key(run_of(c.name)), c.step if c.step is not None else float("inf"), natural_key(c.name))


def run_of(name: str) -> str:
    """The run a checkpoint belongs to: the folder holding its checkpoint-N folder, else itself."""
    path = PurePosixPath(name)
    return path.parent.as_posix() if CHECKPOINT_DIR.match(path.name) else name


def natural_key(text: str) -> list:
    """Sort key in which digits compare as numbers: checkpoint-20 before checkpoint-100."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _candidate_folders(root: Path, warnings: list[str]):
    def on_error(err: OSError) -> None:
        warnings.append(f"{err.filename}: cannot be read ({err.strerror}); check its permissions")

    # Folder links are followed (checkpoints linked in from shared storage); each real folder,
    # known by (device, inode), is walked once, so a link loop or a second link to the same
    # checkpoint cannot repeat it.
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as err:
            on_error(err)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        files = set(filenames)
        is_trainer_dir = CHECKPOINT_DIR.match(Path(dirpath).name) is not None
        if ADAPTER_CONFIG in files or _has_full_weights(files) or is_trainer_dir:
            yield Path(dirpath)


def _has_full_weights(files: set[str]) -> bool:
    return "config.json" in files and any(
        FULL_SAFETENSORS.match(f) or FULL_PICKLE.match(f) or f == "model.safetensors.index.json" for f in files
    )


def _inspect(
    folder: Path,
    root: Path,
    allow_pickle: bool,
    cache: HashCache | None,
    warnings: list[str],
) -> Checkpoint | None:
    name = root.name if folder == root else folder.relative_to(root).as_posix()
    files = {p.name for p in folder.iterdir() if p.is_file()}
    kind: CheckpointKind = "lora" if ADAPTER_CONFIG in files else "full"
    ckpt = Checkpoint(name=name, path=str(folder), kind=kind)
    ckpt.has_tokenizer = bool(files & {"tokenizer.json", "tokenizer.model", "vocab.json"})
    _read_trainer_state(folder, ckpt, warnings)
    if kind == "lora":
        weights = _validate_lora(folder, files, ckpt, allow_pickle)
        if _has_full_weights(files):  # torchtune saves both; so do merge-and-save scripts
            warnings.append(
                f"{name}: holds both a LoRA adapter and full (merged) weights; the adapter is scored on the "
                "base, the full weights are not read (move them to their own folder to score them too)"
            )
    elif "config.json" in files:
        weights = _validate_full(folder, files, ckpt, allow_pickle)
    else:
        ckpt.invalidate(
            f"{name}: no {ADAPTER_CONFIG} or config.json with weights; the checkpoint may still be "
            "being written (re-run when training has saved it) or is not a model checkpoint"
        )
        return ckpt
    if ckpt.ok and weights:
        _hash(folder, weights, ckpt, cache)
    return ckpt


def _read_trainer_state(folder: Path, ckpt: Checkpoint, warnings: list[str]) -> None:
    m = CHECKPOINT_DIR.match(folder.name)
    if m:
        ckpt.step = int(m.group(1))
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if ckpt.step is None and isinstance(state.get("global_step"), int):
            ckpt.step = state["global_step"]
        for entry in state.get("log_history") or []:
            if not isinstance(entry, dict) or entry.get("step") != ckpt.step:
                continue
            if isinstance(entry.get("loss"), (int, float)):
                ckpt.train_loss = float(entry["loss"])
            if isinstance(entry.get("eval_loss"), (int, float)):
                ckpt.eval_loss = float(entry["eval_loss"])
    except (OSError, ValueError, AttributeError) as err:
        warnings.append(f"{state_file}: unreadable ({err}); step and losses are not taken from it")


def _validate_lora(folder: Path, files: set[str], ckpt: Checkpoint, allow_pickle: bool) -> list[Path]:
    config_path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as err:
        ckpt.invalidate(f"{config_path}: cannot be read ({err.strerror}); check its permissions")
        return []
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        ckpt.invalidate(f"{config_path}: not valid JSON ({err}); re-save the adapter with save_pretrained()")
        return []
    problem = _lora_config_problem(config)
    if problem:
        ckpt.invalidate(f"{config_path}: {problem}")
        return []
    ckpt.base_model = config.get("base_model_name_or_path")
    ckpt.lora = LoraInfo(
        r=config["r"],
        alpha=config["lora_alpha"],
        target_modules=config.get("target_modules"),
        target_parameters=config.get("target_parameters"),
        use_dora=bool(config.get("use_dora")),
        use_rslora=bool(config.get("use_rslora")),
    )

    if ADAPTER_SAFETENSORS in files:
        weights = folder / ADAPTER_SAFETENSORS
        header = _safetensors_header(weights, ckpt)
        if header is None:
            return []
        problem = _lora_weights_problem(header, config)
        if problem:
            ckpt.invalidate(f"{weights}: {problem}")
            return []
    elif ADAPTER_PICKLE in files:
        ckpt.pickled = True
        if not allow_pickle:
            ckpt.invalidate(f"{folder / ADAPTER_PICKLE}: pickled weights refused; {PICKLE_FIX}")
            return []
        weights = folder / ADAPTER_PICKLE
    else:
        ckpt.invalidate(
            f"{folder}: {ADAPTER_CONFIG} but no {ADAPTER_SAFETENSORS}; the checkpoint may still be "
            "being written (re-run when training has saved it) or the weights were not copied"
        )
        return []
    ckpt.weight_files = [weights.name]
    return [config_path, weights]


def _lora_config_problem(config: object) -> str | None:
    if not isinstance(config, dict):
        return "must hold a JSON object; re-save the adapter with save_pretrained()"
    missing = [k for k in ("peft_type", "r", "lora_alpha") if k not in config]
    if missing:
        return f"misses {', '.join(missing)}; re-save the adapter with peft's save_pretrained()"
    if config["peft_type"] != "LORA":
        return f"peft_type is {config['peft_type']!r}; gate evaluates LORA adapters only"
    if not isinstance(config["r"], int) or isinstance(config["r"], bool) or config["r"] <= 0:
        return f"r must be a positive integer, not {config['r']!r}"
    if not isinstance(config["lora_alpha"], (int, float)) or isinstance(config["lora_alpha"], bool):
        return f"lora_alpha must be a number, not {config['lora_alpha']!r}"
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        return f"target_modules must be a list of module names or a regex, not {targets!r}"
    parameters = config.get("target_parameters")
    if parameters is not None and not isinstance(parameters, list):
        return f"target_parameters must be a list of parameter names, not {parameters!r}"
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        return f"base_model_name_or_path must be a string, not {base!r}"
    return None


def _lora_weights_problem(header: dict, config: dict) -> str | None:
    lora_a = {k: v for k, v in header.items() if k.endswith("lora_A.weight")}
    if not lora_a and not any("lora_" in k for k in header):
        return "holds no LoRA weights (no lora_A/lora_B tensors); it is not a LoRA adapter"
    # rank_pattern / alpha_pattern give some modules other ranks; only check the uniform case.
    # LoRA on parameters (target_parameters, MoE experts) stacks one rank-r update per expert.
    if not config.get("rank_pattern"):
        for key, meta in lora_a.items():
            shape = meta.get("shape") or []
            if shape and shape[0] != config["r"] and not _on_parameters(config, module_path(key)):
                return (
                    f"tensor {key} has rank {shape[0]} but adapter_config.json says r={config['r']}; "
                    "the config does not belong to these weights"
                )
    for key in lora_a:
        module = module_path(key)
        if not peft_targets(config, module):
            return (
                f"tensor {key} is for module {module!r}, which the adapter config does not target "
                f"(target_modules {config.get('target_modules')!r}, target_parameters "
                f"{config.get('target_parameters')!r}, layers_to_transform {config.get('layers_to_transform')!r}); "
                "the config does not belong to these weights"
            )
    return None


def module_path(key: str) -> str:
    """The base model's module path a saved LoRA tensor belongs to, as peft names it.

    peft saves ``base_model.model.<module path>.lora_A.weight`` (``lora_A.<adapter>.weight`` in
    some versions); the path is what its ``target_modules`` rules are matched against.
    """
    path = key.removeprefix("base_model.model.")
    head, sep, _ = path.rpartition(".lora_A")
    path = head if sep else path
    while path.endswith(".base_layer"):  # target_parameters nests one wrapper per parameter
        path = path.removesuffix(".base_layer")
    return path


def _on_parameters(config: dict, module: str) -> bool:
    """Whether ``module`` holds parameters that ``target_parameters`` names (LoRA on MoE experts)."""
    for name in config.get("target_parameters") or []:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner and (module == owner or module.endswith(f".{owner}")):
            return True
    return False


def peft_targets(config: dict, module: str) -> bool:
    """Whether peft would put a LoRA layer on ``module`` under this adapter_config.json.

    peft's own rules (``check_target_module_exists`` in peft/tuners/tuners_utils.py): a string
    ``target_modules`` is a regular expression that must match the whole module path; a list
    names modules by the whole path or by a suffix after a dot (``self_attn.q_proj`` matches
    ``model.layers.0.self_attn.q_proj``); ``all-linear`` is every linear layer but the output
    head; ``layers_to_transform`` (lists only) keeps the layers whose first numbered path part
    (after ``layers_pattern`` when given) is listed; ``exclude_modules`` and ``modules_to_save``
    are never LoRA targets. ``target_parameters`` puts LoRA on parameters (MoE experts) of the
    module that holds them.
    """
    if _named_by(config.get("exclude_modules"), module):
        return False
    for saved in config.get("modules_to_save") or []:
        if re.match(rf"(^|.*\.){re.escape(saved)}($|\..*)", module):
            return False
    if _on_parameters(config, module):
        return True
    targets = config.get("target_modules")
    if targets is None:
        return not config.get("target_parameters")  # None and no parameters: peft infers the targets
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return _fullmatch(targets, module)
    if not _named_by(targets, module):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(module, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _named_by(names, module: str) -> bool:
    if not names:
        return False
    if isinstance(names, str):
        return _fullmatch(names, module)
    return module in names or any(module.endswith(f".{name}") for name in names)


def _fullmatch(pattern: str, module: str) -> bool:
    try:
        return re.fullmatch(pattern, module) is not None
    except re.error:
        return False


def _layer_index(module: str, patterns) -> int | None:
    """The layer number peft reads from a module path (the first numbered part, lazily)."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _validate_full(folder: Path, files: set[str], ckpt: Checkpoint, allow_pickle: bool) -> list[Path]:
    config_path = folder / "config.json"
    try:
        json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        ckpt.invalidate(f"{config_path}: not valid JSON ({err}); re-save the model with save_pretrained()")
        return []
    safetensors = sorted(f for f in files if FULL_SAFETENSORS.match(f))
    pickled = sorted(f for f in files if FULL_PICKLE.match(f))
    if "model.safetensors.index.json" in files:
        index_path = folder / "model.safetensors.index.json"
        try:
            shards = set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            ckpt.invalidate(f"{index_path}: unreadable ({err}); re-save the model with save_pretrained()")
            return []
        missing = sorted(shards - files)
        if missing:
            ckpt.invalidate(
                f"{folder}: shards {', '.join(missing)} are missing; the checkpoint may still be being "
                "written (re-run when training has saved it) or was copied incompletely"
            )
            return []
        safetensors = sorted(shards)
    if safetensors:
        for f in safetensors:
            if _safetensors_header(folder / f, ckpt) is None:
                return []
        weights = [folder / f for f in safetensors]
    elif pickled:
        ckpt.pickled = True
        if not allow_pickle:
            ckpt.invalidate(f"{folder / pickled[0]}: pickled weights refused; {PICKLE_FIX}")
            return []
        weights = [folder / f for f in pickled]
    else:
        ckpt.invalidate(
            f"{folder}: config.json but no model weights; the checkpoint may still be being written (re-run when training has saved it)"
        )
        return []
    ckpt.weight_files = [w.name for w in weights]
    return [config_path, *weights]


def _safetensors_header(path: Path, ckpt: Checkpoint) -> dict | None:
    """Read and check a safetensors header: the file must be as long as its header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ValueError("shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise ValueError(f"header claims {header_len} bytes but the file has {size}")
            header = json.loads(fh.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        end = max((int(m["data_offsets"][1]) for m in header.values()), default=0)
    except OSError as err:
        ckpt.invalidate(f"{path}: cannot be read ({err.strerror}); check its permissions")
        return None
    except (ValueError, KeyError, TypeError, IndexError) as err:
        ckpt.invalidate(f"{path}: corrupt safetensors file ({err}); re-save or re-copy the checkpoint")
        return None
    expected = 8 + header_len + end
    if size < expected:
        ckpt.invalidate(
            f"{path}: truncated ({size} of {expected} bytes); the checkpoint may still be being written "
            "(re-run when training has saved it) or was copied incompletely"
        )
        return None
    return header


def _hash(folder: Path, files: list[Path], ckpt: Checkpoint, cache: HashCache | None) -> None:
    before = file_fingerprint(files)
    digest = sha256_files(files, folder, cache)
    if file_fingerprint(files) != before:
        ckpt.invalidate(
            f"{folder}: files changed while being read; the checkpoint is still being written (re-run when training has saved it)"
        )
        return
    ckpt.weights_hash = digest


def _check_common_base(found: list[Checkpoint]) -> None:
    named = [c for c in found if c.ok and c.kind == "lora" and c.base_model]
    counts = Counter(c.base_model for c in named)
    if len(counts) < 2:
        return
    (top, top_n), (_, second_n) = counts.most_common(2)
    summary = ", ".join(f"{b!r} ({n})" for b, n in counts.most_common())
    for c in named:
        if top_n > second_n and c.base_model == top:
            continue
        c.invalidate(
            f"{c.name}: adapter names base {c.base_model!r} but the adapters here name {summary}; "
            "scan each run's folder separately, or pass --base to check them against one model"
        )


def looks_like_path(name: str) -> bool:
    """Whether a base name is a filesystem path (absolute, ~ or ./), not a hub id."""
    return name.startswith(("/", "~", "./", "../")) or bool(re.match(r"^[A-Za-z]:[\\/]", name))


def path_is_missing(name: str) -> bool:
    """Whether no file or folder is at this path (one that exists but cannot be read is not missing)."""
    try:
        os.stat(os.path.expanduser(name))
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def missing_base_message(name: str) -> str:
    return (
        f"the adapters name base {name!r}, a path that does not exist on this machine (the machine they "
        "were trained on?); pass --base with this machine's copy of that model (a folder or a hub id), "
        "or set `base:` in gate.yaml"
    )


def _missing_base_paths(found: list[Checkpoint]) -> list[str]:
    named = {c.base_model for c in found if c.ok and c.kind == "lora" and c.base_model}
    return [missing_base_message(name) for name in sorted(named) if looks_like_path(name) and path_is_missing(name)]
