"""Shared fixtures: a tiny Llama-style base and real LoRA checkpoints, all built offline.

Offline and isolated: the hub is never contacted and nothing is read from the user's cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="gate-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONTEXT = 128  # the tiny model's context: long documents below exceed it

# The limit for a subprocess a test starts: only a hang reaches it. Each such run takes seconds to
# a minute on a quiet 2-core machine; a loaded one (two suites at once, other builds) is several
# times slower, and speed must never decide a test (pyproject's per-test timeout is the same guard).
HANG_GUARD_S = 1800


@dataclass
class Fixture:
    """The tiny world the tests run in."""

    base: Path
    checkpoints: Path  # run-a/checkpoint-2, run-a/checkpoint-4, untrained/
    suites: Path  # text.jsonl, prompt.jsonl, messages.jsonl, long.jsonl
    config: Path  # gate.yaml naming the base and the four suites


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Fixture:
    from gate.train.tiny import arithmetic_lines, build_base, save_untrained_adapter, toy_sentences, train_lora_run

    root = tmp_path_factory.mktemp("world")
    base = build_base(root / "base", seed=0, context=CONTEXT, pretrain_steps=30)
    checkpoints = root / "checkpoints"
    train_lora_run(base, checkpoints / "run-a", arithmetic_lines(64, 1), steps=4, save_steps=2, learning_rate=2e-2)
    save_untrained_adapter(base, checkpoints / "untrained")

    suites = root / "suites"
    suites.mkdir()
    write_jsonl(suites / "text.jsonl", [{"text": t} for t in toy_sentences(12, 7)] + [{"id": "short", "text": "Hi"}])
    write_jsonl(
        suites / "prompt.jsonl",
        [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}."} for a, b in [(1, 2), (12, 30), (7, 7), (40, 1)]]
        + [{"id": "empty-prompt", "prompt": "", "completion": "The river."}],
    )
    write_jsonl(
        suites / "messages.jsonl",
        [
            {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 plus 3 is 5."}]},
            {
                "id": "two-turns",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Name a place."},
                    {"role": "assistant", "content": "The old station."},
                    {"role": "user", "content": "Another?"},
                    {"role": "assistant", "content": "The quiet lake."},
                ],
            },
        ],
    )
    long_text = " ".join(toy_sentences(40, 3))  # several hundred tokens: > CONTEXT
    write_jsonl(suites / "long.jsonl", [{"id": "long", "text": long_text}, {"id": "short", "text": "The farmer."}])
    config = root / "gate.yaml"
    config.write_text(
        f"base: {base}\n"
        "suites:\n"
        f"  - {{name: text, path: {suites / 'text.jsonl'}}}\n"
        f"  - {{name: prompt, path: {suites / 'prompt.jsonl'}}}\n"
        f"  - {{name: messages, path: {suites / 'messages.jsonl'}}}\n"
        f"  - {{name: long, path: {suites / 'long.jsonl'}}}\n"
    )
    return Fixture(base=base, checkpoints=checkpoints, suites=suites, config=config)


def save_nan_base(base: Path, out: Path) -> Path:
    """A copy of the base whose output layer is NaN: every score it gives is non-finite (exit 3)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(out)
    for f in base.iterdir():
        if "token" in f.name or "chat_template" in f.name:
            shutil.copy(f, out)
    return out


@pytest.fixture
def ckpt_copy(world, tmp_path):
    """A private copy of the checkpoints folder that a test may damage."""
    target = tmp_path / "checkpoints"
    shutil.copytree(world.checkpoints, target)
    return target
