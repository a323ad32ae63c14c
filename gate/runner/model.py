"""Loading models: the base once, adapters one at a time on top of it, full checkpoints alone."""

from __future__ import annotations

import gc
import json
import re
import warnings
from pathlib import Path

import torch

from gate.errors import BaseModelError, CheckpointError, ConfigError, GateError, RunFailure
from gate.scan import ADAPTER_SAFETENSORS, FULL_PICKLE, FULL_SAFETENSORS, PICKLE_FIX, Checkpoint

# peft asks transformers 5 `is_gradient_checkpointing` on every adapter load, and transformers
# warns that the name is deprecated: a notice for peft's authors, not for someone running gate.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_MAX_LENGTH = 2048  # cap on the default window: logits of B x L x vocab must fit in memory


def resolve_base(base: str, online: bool) -> Path:
    """A local folder as is; a hub id through the local Hugging Face cache (or the hub if online)."""
    local = Path(base).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise BaseModelError(
                f"{local}: no config.json; --base must be a transformers model folder (save_pretrained output) or a hub id"
            )
        return local.resolve()
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base):
        raise BaseModelError(f"base {base!r}: no such folder; fix --base or `base:` in gate.yaml")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, local_files_only=not online))
    except Exception as err:  # noqa: BLE001 - every failure here means "not available"
        hint = "check the id" if online else f"download it first (`hf download {base}`) or pass --online"
        raise BaseModelError(
            f"base {base!r}: not a local folder and not in the Hugging Face cache ({type(err).__name__}); {hint}"
        ) from None


def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """config.json plus the model's weight files (safetensors; pickled only when allowed)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    weights = [n for n in names if FULL_SAFETENSORS.match(n)]
    if not weights:
        pickled = [n for n in names if FULL_PICKLE.match(n)]
        if pickled and not allow_pickle:
            raise BaseModelError(f"{folder / pickled[0]}: pickled weights refused; {PICKLE_FIX}")
        weights = pickled
    if not weights:
        raise BaseModelError(f"{folder}: no model weights (model*.safetensors); is the download complete?")
    return [folder / "config.json", *(folder / w for w in weights)]


def tokenizer_files(folder: Path) -> list[Path]:
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not files:
        raise BaseModelError(f"{folder}: no tokenizer files; save the tokenizer next to the model")
    return files


def read_model_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BaseModelError(f"{folder / 'config.json'}: unreadable ({err})") from None


def context_size(config: dict, tokenizer_config: dict) -> int | None:
    """The model's context from config.json, else the tokenizer's model_max_length (tokenizer_config.json)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    limit = tokenizer_config.get("model_max_length")
    return limit if isinstance(limit, int) and limit < 1_000_000 else None


def read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json as a dict ({} when absent or unreadable: the tokenizer load reports those)."""
    try:
        value = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def choose_window(requested: int | None, stride: int | None, context: int | None) -> tuple[int, int]:
    """max_length (tokens per window) and stride, validated against the model's context."""
    if requested is not None and context is not None and requested > context:
        raise ConfigError(None, [f"max_length {requested} exceeds the model's context of {context} tokens; lower it"])
    max_length = requested or min(context or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if max_length < 2:
        raise ConfigError(None, [f"max_length {max_length} is too small; a window needs at least 2 tokens"])
    stride = stride or max(1, max_length // 2)
    if stride >= max_length:
        raise ConfigError(None, [f"stride {stride} must be smaller than max_length {max_length}"])
    return max_length, stride


def choose_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(None, [f"device {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps"]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(None, ["device cuda was asked for but CUDA is not available; use --device cpu"])
    return device


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU half precision is slow and inexact; float32 is the reference
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype a work list names (``float32``, ``bfloat16``...)."""
    return getattr(torch, name)


def load_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer_config = read_tokenizer_config(folder)
    try:
        if _saved_by_v5(tokenizer_config) and _installed_major("transformers") < 5:
            return _tokenizer_from_json(folder, tokenizer_config)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except GateError:
        raise
    except Exception as err:  # noqa: BLE001 - surfaced as a message naming the folder
        hint = _remote_code_hint(err)
        raise BaseModelError(f"{folder}: the tokenizer cannot be loaded{hint} ({type(err).__name__}: {err})") from None


def _saved_by_v5(tokenizer_config: dict) -> bool:
    """Whether transformers 5 wrote this tokenizer_config.json (its backend class, or its list of extra tokens)."""
    return (
        tokenizer_config.get("tokenizer_class") == "TokenizersBackend"
        or "backend" in tokenizer_config
        or isinstance(tokenizer_config.get("extra_special_tokens"), list)
    )


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _tokenizer_from_json(folder: Path, tokenizer_config: dict):
    """transformers 4.x reading a tokenizer that transformers 5 saved: from its tokenizer.json.

    4.x knows neither the ``TokenizersBackend`` class nor a list of ``extra_special_tokens``; the
    tokenizer itself (vocabulary, merges, normalizer, BOS/EOS post-processing, added tokens) is all
    in tokenizer.json, which both lines read with the same ``tokenizers`` library. The special-token
    roles, the length limit and the chat template come from the files beside it.
    """
    from transformers import PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").is_file():
        raise BaseModelError(
            f"{folder}: the tokenizer was saved by transformers 5 without a tokenizer.json, which transformers "
            f"{_installed('transformers')} cannot read: pip install -U 'transformers>=5'"
        )
    kwargs = {}
    for key in _SPECIAL_TOKENS:
        value = tokenizer_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            kwargs[key] = value
    for key in ("model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces"):
        if key in tokenizer_config:
            kwargs[key] = tokenizer_config[key]
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **kwargs)
    extra = tokenizer_config.get("extra_special_tokens") or tokenizer_config.get("additional_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else extra
    extra = [t.get("content") if isinstance(t, dict) else t for t in extra]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": [t for t in extra if isinstance(t, str)]})
    template = folder / "chat_template.jinja"
    if template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    elif isinstance(tokenizer_config.get("chat_template"), str):
        tokenizer.chat_template = tokenizer_config["chat_template"]
    return tokenizer


def _installed(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _installed_major(package: str) -> int:
    from packaging.version import Version

    return Version(_installed(package)).major


def check_saved_by(folder: Path, config: dict, error=BaseModelError) -> None:
    """Refuse a model that a newer transformers line saved than the one installed.

    An older transformers can read such a config differently without any warning (4.57 ignores
    the ``rope_parameters`` that 5.x writes and falls back to its default RoPE base: a different
    model), or not know its architecture. Patch releases of one line share a format, so the
    line (major.minor) is compared.
    """
    from packaging.version import InvalidVersion, Version

    saved = config.get("transformers_version")
    if not isinstance(saved, str):
        return
    try:
        saved_line, installed_line = Version(saved).release[:2], Version(_installed("transformers")).release[:2]
    except InvalidVersion:
        return
    if saved_line > installed_line:
        need = ".".join(str(n) for n in saved_line)
        raise error(
            f"{folder / 'config.json'}: saved by transformers {saved}, newer than the installed "
            f"{_installed('transformers')}, which may read it as another model (RoPE settings, architecture): "
            f"pip install -U 'transformers>={need}'"
        )


def _remote_code_hint(err: Exception) -> str:
    if "trust_remote_code" in str(err):
        return ": it ships its own code, which gate runs only with --trust-remote-code (pass it if you trust that code)"
    if "does not recognize this architecture" in str(err) or "model type" in str(err):
        return (
            f": its architecture is unknown to transformers {_installed('transformers')}; a newer transformers may "
            "know it: pip install -U transformers"
        )
    return ""


def load_model(folder: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool, error=BaseModelError):
    from transformers import AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() else {}
    check_saved_by(folder, config, error)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - surfaced as a message naming the folder
        raise error(f"{folder}: the model cannot be loaded{_remote_code_hint(err)}: {type(err).__name__}: {err}") from None
    return model.to(device).eval()


def free_memory() -> None:
    """Return freed model memory (call after dropping every reference to a model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class AdapterSlot:
    """Holds at most one adapter on the loaded base: memory stays at base + one adapter.

    Each adapter is injected into the base and removed again with peft's ``unload()``, which
    puts back every module peft replaced (LoRA layers, DoRA, ``modules_to_save`` copies, LoRA on
    parameters). Deleting an adapter from a kept wrapper is not enough: a ``modules_to_save``
    wrapper left behind breaks the next adapter, and adapters with other ``target_parameters``
    cannot share one wrapper. ``unload()`` alone is not enough either (it keeps the adapter's
    ``modules_to_save`` copy), so the adapter is deleted first.
    """

    def __init__(self, base_model):
        self.base_model = base_model
        self.model = None  # the PeftModel while an adapter is attached
        self.active: str | None = None

    def attach(self, ckpt: Checkpoint):
        """Load the checkpoint's adapter and make it the active one; returns the model to score."""
        from peft import PeftConfig, PeftModel

        self.detach()
        check_peft_config(ckpt)
        try:
            config = PeftConfig.from_pretrained(ckpt.path)
            config.inference_mode = True
            # Keep the wrapper as soon as the layers are injected: if loading the weights then
            # fails, the injected layers must be removed, not left in the base for the next one.
            self.model = PeftModel(self.base_model, config, adapter_name="gate")
            loaded = self.model.load_adapter(ckpt.path, adapter_name="gate", is_trainable=False)
            self.model.set_adapter("gate")
            _check_all_loaded(loaded)
        except Exception as err:  # noqa: BLE001 - every load failure is this checkpoint's problem
            self.detach()
            reason = _load_reason(err)
            if ckpt.lora is not None and ckpt.lora.target_parameters and _installed_major("transformers") < 5:
                reason += (
                    f"; it puts LoRA on parameters ({', '.join(sorted(ckpt.lora.target_parameters))}), as on the fused "
                    f"MoE experts of transformers 5, which transformers {_installed('transformers')} does not have: "
                    "pip install -U 'transformers>=5'"
                )
            elif isinstance(err, _PartialLoad) and "no place" in reason:
                reason += "; pass --base with the model it was trained from"
            raise CheckpointError(f"{ckpt.name}: the adapter does not fit the base: {reason}") from None
        self.active = ckpt.name
        self.model.eval()
        return self.model

    def detach(self) -> None:
        if self.model is not None:
            # Delete first: unload() alone would leave the adapter's trained copy of a
            # modules_to_save module in the base (peft returns the active copy on unload).
            if "gate" in self.model.peft_config:
                self.model.delete_adapter("gate")
            self.model.unload()  # the base's own modules back in place
            self.model = None
        self.active = None


# Keys newer peft versions write with these values whatever the adapter (metadata, defaults of
# options that change nothing when off); an older peft that lacks them loads the same adapter.
_INERT_KEYS = {"megatron_core": "megatron.core", "qalora_group_size": 16, "init_lora_weights": True}


def check_peft_config(ckpt: Checkpoint) -> None:
    """Refuse an adapter whose config sets options the installed peft does not know.

    peft itself drops unknown keys with a warning and loads the rest: an adapter trained with a
    newer feature would be scored as a different adapter.
    """
    import dataclasses

    from peft import LoraConfig

    try:
        config = json.loads((Path(ckpt.path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the scanner read it; a file changed since then fails at load with its own message
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(
        k
        for k, v in config.items()
        if k not in known and k != "peft_version" and v not in (None, False, [], {}, "") and not (k in _INERT_KEYS and _INERT_KEYS[k] == v)
    )
    if not unknown:
        return
    saved = str(config.get("peft_version") or "").split("@")[0]
    fix = f"pip install -U 'peft>={saved}'" if saved else "pip install -U peft"
    raise CheckpointError(
        f"{ckpt.name}: adapter_config.json sets {', '.join(unknown)}, which peft {_installed('peft')} does not know "
        f"(the adapter was saved by peft {saved or 'a newer version'}); peft would ignore them and score another "
        f"adapter: {fix}"
    )


class _PartialLoad(Exception):
    """peft loaded an adapter only in part (it warns and goes on; gate would score another adapter)."""


def _check_all_loaded(loaded) -> None:
    unexpected = list(getattr(loaded, "unexpected_keys", None) or [])
    missing = list(getattr(loaded, "missing_keys", None) or [])
    if unexpected:
        raise _PartialLoad(f"{len(unexpected)} of its tensors have no place in this base and would be ignored (first: {unexpected[0]})")
    if missing:
        raise _PartialLoad(
            f"its config targets modules whose weights it lacks ({len(missing)}, first: {missing[0]}); "
            "re-save the adapter with peft's save_pretrained()"
        )


def _load_reason(err: Exception) -> str:
    if isinstance(err, _PartialLoad):
        return str(err)
    text = str(err)
    if "size mismatch" in text:
        first = next((line.strip() for line in text.splitlines() if "size mismatch" in line), text)
        return f"{first[:300]}; it was trained on another base model: pass --base with the model it was trained from"
    if "not found in the base model" in text or "Target modules" in text:
        return f"{text[:300]}; the adapter targets modules this base lacks: pass --base with the model it was trained from"
    return f"{type(err).__name__}: {text[:300]}"


def tokenizer_problem(ckpt: Checkpoint, base_tokenizer, base_vocab_size: int, trust_remote_code: bool) -> str | None:
    """Why per-token numbers of this checkpoint are not comparable with the base's, if they are not."""
    if ckpt.has_tokenizer:
        own = load_tokenizer(Path(ckpt.path), trust_remote_code)
        if own.get_vocab() != base_tokenizer.get_vocab():
            return (
                f"{ckpt.name}: its tokenizer differs from the base's ({len(own)} vs {len(base_tokenizer)} tokens); "
                "per-token perplexity is not comparable. Evaluate it with the base tokenizer, or train without "
                "adding tokens"
            )
    if ckpt.kind == "lora":
        from safetensors import safe_open

        path = Path(ckpt.path) / ADAPTER_SAFETENSORS
        if path.is_file():
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safetensors' handle is no dict
                    if ("embed_tokens" in key or "lm_head" in key) and "lora_" not in key:
                        rows = fh.get_slice(key).get_shape()[0]
                        if rows != base_vocab_size:
                            return (
                                f"{ckpt.name}: {key} has {rows} rows but the base vocabulary has {base_vocab_size}; "
                                "the adapter resized the embeddings (added tokens), so per-token perplexity is "
                                "not comparable with the base"
                            )
    return None


def check_versions() -> None:
    """Fail early, with the pip command that fixes it, on library versions gate was not built for."""
    from importlib.metadata import version

    from packaging.version import Version

    needs = {"torch": "2.4", "transformers": "4.56", "peft": "0.13"}
    for package, minimum in needs.items():
        found = version(package)
        if Version(found) < Version(minimum):
            raise RunFailure(f"{package} {found} is too old; gate needs >= {minimum}: pip install '{package}>={minimum}'")


def score_versions() -> dict[str, str]:
    """Versions of the libraries that compute a score's numbers (part of every store key)."""
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "tokenizers", "peft")}


def library_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        **{p: version(p) for p in ("torch", "transformers", "tokenizers", "peft")},
    }
