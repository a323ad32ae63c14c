"""Across library lines: what transformers 5 saves is read on the oldest supported line (4.57)
and the newest, and a model or adapter that needs a newer transformers or peft than the one
installed is refused (exit 2, naming the package and version), never scored as another model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from packaging.version import Version

from conftest import write_jsonl
from gate.cli import main
from gate.request import prepare_run
from gate.flow import run
from gate.train.tiny import build_base, save_untrained_adapter, toy_sentences
from gate.runner.model import load_tokenizer

SAVED_BY_V5 = Path(__file__).parent / "data" / "tokenizer-saved-by-transformers-5"
INSTALLED = Version(transformers.__version__)
TEXTS = [*toy_sentences(4, 11), "12 plus 30 is 42.", "<|im_start|>user\nHi<|im_end|>"]


def test_the_fixture_is_what_transformers_5_writes():
    config = json.loads((SAVED_BY_V5 / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend" and isinstance(config["extra_special_tokens"], list)


def test_tokenizer_saved_by_transformers_5_is_read_from_its_tokenizer_json():
    from tokenizers import Tokenizer

    tok = load_tokenizer(SAVED_BY_V5, trust_remote_code=False)
    reference = Tokenizer.from_file(str(SAVED_BY_V5 / "tokenizer.json"))  # the tokenizers library alone
    for text in TEXTS:
        assert tok(text)["input_ids"] == reference.encode(text).ids
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text, add_special_tokens=False).ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.pad_token_id == reference.token_to_id("<pad>")
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)
    assert tok.chat_template == (SAVED_BY_V5 / "chat_template.jinja").read_text()
    assert tok.model_max_length == 1024


def _suite_config(tmp_path: Path, base: Path) -> Path:
    write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 plus 3 is 5."}]}],
    )
    config = tmp_path / "gate.yaml"
    config.write_text(
        f"base: {base}\nsuites:\n  - {{name: text, path: {tmp_path / 'text.jsonl'}}}\n"
        f"  - {{name: chat, path: {tmp_path / 'chat.jsonl'}}}\n"
    )
    return config


def test_model_with_a_transformers_5_tokenizer_is_scored_on_this_line(tmp_path):
    """The base's weights saved by the installed line, its tokenizer files by transformers 5.23."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    base = build_base(tmp_path / "base", tokenizer=load_tokenizer(SAVED_BY_V5, False), pretrain_steps=5)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    for f in SAVED_BY_V5.iterdir():
        shutil.copy(f, base / f.name)
    save_untrained_adapter(base, tmp_path / "ckpts" / "untrained")
    shutil.copy(SAVED_BY_V5 / "tokenizer_config.json", tmp_path / "ckpts" / "untrained")  # as a v5 trainer saves it
    shutil.copy(SAVED_BY_V5 / "tokenizer.json", tmp_path / "ckpts" / "untrained")
    outcome = run(prepare_run(tmp_path / "ckpts", config_path=_suite_config(tmp_path, base), out_dir=tmp_path / "out", device="cpu"))
    assert outcome.exit_code == 0, outcome.problems
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    reference = Tokenizer.from_file(str(base / "tokenizer.json"))
    got = {d.id: d for d in outcome.results.base.scores["text"].documents}
    for i, text in enumerate(TEXTS):
        ids = reference.encode(text).ids  # BOS added by tokenizer.json's post-processor
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        nll = -sum(logprobs[p - 1, ids[p]].item() for p in range(1, len(ids)))
        doc = got[str(i)] if str(i) in got else list(got.values())[i]
        assert doc.tokens == len(ids) - 1 and doc.nll == pytest.approx(nll, rel=1e-5)
    (untrained,) = outcome.results.checkpoints  # its own v5 tokenizer is read and found equal to the base's
    assert untrained.status == "ok" and untrained.scores["chat"].nll_sum == pytest.approx(
        outcome.results.base.scores["chat"].nll_sum, rel=1e-6
    )


def _newer_line() -> str:
    return f"{INSTALLED.major}.{INSTALLED.minor + 1}.0"


def test_model_saved_by_a_newer_transformers_is_refused(world, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(world.base, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "transformers_version": _newer_line()}))
    result = CliRunner().invoke(
        main, ["run", str(world.checkpoints), "--config", str(world.config), "--base", str(base), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2, result.output
    need = f"{INSTALLED.major}.{INSTALLED.minor + 1}"
    assert f"saved by transformers {_newer_line()}, newer than the installed {transformers.__version__}" in result.output
    assert f"pip install -U 'transformers>={need}'" in result.output and "Traceback" not in result.output


def test_full_checkpoint_saved_by_a_newer_transformers_is_refused_alone(world, ckpt_copy, tmp_path):
    full = ckpt_copy / "full-run" / "checkpoint-1"
    shutil.copytree(world.base, full)
    config = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**config, "transformers_version": _newer_line()}))
    outcome = run(prepare_run(ckpt_copy, config_path=_suite_config(tmp_path, world.base), out_dir=tmp_path / "out", device="cpu"))
    by_name = {c.name: c for c in outcome.results.checkpoints}
    assert by_name["full-run/checkpoint-1"].status == "error" and "pip install -U 'transformers>=" in by_name["full-run/checkpoint-1"].reason
    assert outcome.exit_code == 2 and by_name["untrained"].status == "ok"


def test_adapter_needing_a_newer_peft_is_refused(world, ckpt_copy, tmp_path):
    path = ckpt_copy / "untrained" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "peft_version": "9.1.0", "use_quantum_lora": True}))
    # A newer peft's metadata and inert defaults alone do not make another adapter.
    other = ckpt_copy / "run-a" / "checkpoint-2" / "adapter_config.json"
    other.write_text(json.dumps({**json.loads(other.read_text()), "peft_version": "9.1.0", "megatron_core": "megatron.core", "some_new_option": None}))
    outcome = run(prepare_run(ckpt_copy, config_path=_suite_config(tmp_path, world.base), out_dir=tmp_path / "out", device="cpu"))
    by_name = {c.name: c for c in outcome.results.checkpoints}
    bad = by_name["untrained"]
    assert bad.status == "error" and bad.error_code == 2 and bad.scores == {}
    assert "sets use_quantum_lora, which peft" in bad.reason and "pip install -U 'peft>=9.1.0'" in bad.reason
    assert by_name["run-a/checkpoint-2"].status == "ok"


def test_moe_adapter_from_transformers_5_is_scored_on_5_and_refused_on_4(tmp_path):
    """LoRA on the fused experts (target_parameters), saved under transformers 5.23: 4.x has no such
    parameters and peft would load the rest with a warning; gate refuses, naming the upgrade."""
    from gate.train.tiny import build_moe_base

    base = build_moe_base(tmp_path / "base")
    shutil.copytree(Path(__file__).parent / "data" / "moe-adapter-saved-by-transformers-5", tmp_path / "ckpts" / "moe-lora")
    outcome = run(prepare_run(tmp_path / "ckpts", config_path=_suite_config(tmp_path, base), out_dir=tmp_path / "out", device="cpu"))
    (adapter,) = outcome.results.checkpoints
    if INSTALLED.major >= 5:
        assert adapter.status == "ok" and outcome.exit_code == 0
    else:
        assert adapter.status == "error" and outcome.exit_code == 2 and adapter.scores == {}
        assert "have no place in this base" in adapter.reason and "pip install -U 'transformers>=5'" in adapter.reason
