"""Tiny real models and LoRA checkpoints, built offline in seconds.

Used by the tests (fixtures) and the quick benchmarks: a Llama-style model from a config, a byte-level
BPE tokenizer trained locally, a short pre-training so the base knows its toy language, and real
peft LoRA checkpoints trained with the Hugging Face Trainer (so the folders look exactly like a
user's: ``checkpoint-N/`` with adapter files, trainer_state.json, optimizer state).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

_ADJECTIVES = "old quiet small bright heavy green careful busy warm distant narrow gentle".split()
_NOUNS = "farmer river teacher garden village bridge market window letter forest engine harbour".split()
_VERBS = "watches crosses repairs paints visits follows opens carries finds builds".split()
_PLACES = "hill station school road lake tower field library".split()


def toy_sentences(n: int, seed: int = 0) -> list[str]:
    """Sentences of a small English-like language the tiny base learns quickly."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
            f"{rng.choice(_NOUNS)} near the {rng.choice(_PLACES)}."
        )
    return out


def arithmetic_lines(n: int, seed: int = 0) -> list[str]:
    """A narrow 'new task' register, different from the toy language."""
    rng = random.Random(seed)
    return [f"{a} plus {b} is {a + b}." for a, b in ((rng.randint(1, 40), rng.randint(1, 40)) for _ in range(n))]


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE trained on ``texts``; adds BOS; ChatML-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=1024)
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_base(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    context: int = 128,
    pretrain_steps: int = 0,
    corpus: list[str] | None = None,
    tokenizer=None,
) -> Path:
    """Save a tiny Llama-style model + tokenizer to ``out_dir``; optionally pre-train it briefly.

    ``tokenizer``: use this one instead of training one on ``corpus``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = corpus or toy_sentences(400, seed) + arithmetic_lines(200, seed)
    tokenizer = tokenizer or build_tokenizer(corpus)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return _pretrain_and_save(LlamaForCausalLM(config), tokenizer, out_dir, pretrain_steps, seed)


def _pretrain_and_save(model, tokenizer, out_dir: Path, pretrain_steps: int, seed: int) -> Path:
    """Pretrain a freshly built model on the toy sentences, save it with its tokenizer; the folder."""
    if pretrain_steps:
        _pretrain(model, tokenizer, toy_sentences(2000, seed + 1), pretrain_steps, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir.resolve()


def _pretrain(model, tokenizer, texts: list[str], steps: int, seed: int) -> None:
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, 16), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def train_lora_run(
    base_dir: Path,
    run_dir: Path,
    texts: list[str],
    *,
    steps: int = 4,
    save_steps: int = 2,
    learning_rate: float = 5e-3,
    r: int = 4,
    seed: int = 0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> list[Path]:
    """Fine-tune LoRA with the HF Trainer; returns the ``checkpoint-N`` folders it saved."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(
        model,
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    encoded = tokenizer(texts, truncation=True, max_length=64)
    train = Dataset.from_dict(dict(encoded))
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=steps,
        save_steps=save_steps,
        save_strategy="steps",
        eval_strategy="steps",
        eval_steps=save_steps,
        logging_steps=1,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        log_level="error",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=train.select(range(min(16, len(train)))),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def save_untrained_adapter(base_dir: Path, out_dir: Path, *, r: int = 4, seed: int = 0) -> Path:
    """A LoRA adapter straight from initialisation: B = 0, so it must reproduce the base exactly."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(out_dir)
    return out_dir


def save_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, r: int = 4, resize_vocab: int = 0, **lora_options) -> Path:
    """A LoRA adapter with random (non-zero) A and B, saved by peft exactly as a trainer saves one.

    ``lora_options`` go to peft's LoraConfig (target_modules, target_parameters, use_dora, ...).
    ``resize_vocab``: grow the embeddings by this many rows first (tokens added for fine-tuning).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if resize_vocab:
        model.resize_token_embeddings(model.config.vocab_size + resize_vocab)
    options = {"lora_alpha": 2 * r, "init_lora_weights": False, "task_type": "CAUSAL_LM", **lora_options}
    peft_model = get_peft_model(model, LoraConfig(r=r, **options))
    with torch.no_grad():  # DoRA starts as the identity; move its magnitudes so that they matter
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
            elif "modules_to_save" in name:
                param.add_(0.01 * torch.randn_like(param))
    peft_model.save_pretrained(out_dir)
    return out_dir


def build_moe_base(out_dir: Path, *, seed: int = 0, context: int = 128, pretrain_steps: int = 0) -> Path:
    """A tiny Qwen3-MoE-style model (4 experts, 2 per token) + tokenizer, saved like build_base's.

    transformers 5 holds each layer's experts as fused 3-D parameters (``mlp.experts.gate_up_proj``,
    ``mlp.experts.down_proj``) and converts the per-expert tensors of the saved file at load time.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    corpus = toy_sentences(400, seed) + arithmetic_lines(200, seed)
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return _pretrain_and_save(Qwen3MoeForCausalLM(config), tokenizer, out_dir, pretrain_steps, seed)
