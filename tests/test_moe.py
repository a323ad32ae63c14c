"""A mixture-of-experts model (tiny, Qwen3-MoE style) with LoRA on its attention and on its
experts, scored under transformers 5 (experts fused into 3-D parameters at load time) and checked
against peft's own model, document by document."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

from conftest import write_jsonl
from gate.request import prepare_run
from gate.flow import run
from gate.train.tiny import build_moe_base, save_adapter, toy_sentences
from gate.scan import scan

pytestmark = pytest.mark.skipif(
    Version(transformers.__version__).major < 5,
    reason="transformers 4.x keeps each expert as its own module; LoRA on the experts' parameters "
    "(target_parameters) needs the fused experts of transformers 5",
)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TEXTS = toy_sentences(6, 21) + ["3 plus 4 is 7."]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base = build_moe_base(root / "base", pretrain_steps=10)
    ckpts = root / "checkpoints"
    save_adapter(base, ckpts / "a-attention-and-experts", seed=3, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)
    save_adapter(base, ckpts / "b-attention-only", seed=4, target_modules=["q_proj", "v_proj"])
    write_jsonl(root / "text.jsonl", [{"text": t} for t in TEXTS])
    config = root / "gate.yaml"
    config.write_text(f"base: {base}\nsuites:\n  - {{name: text, path: {root / 'text.jsonl'}}}\n")
    outcome = run(prepare_run(ckpts, config_path=config, out_dir=root / "out", device="cpu", batch_size=3))
    return base, ckpts, outcome


def reference(base, adapter=None) -> list[float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        out.append(-sum(logprobs[p - 1, ids[p]].item() for p in range(1, len(ids))))
    return out


def test_experts_are_saved_one_by_one_and_fused_at_load(moe):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base, _, _ = moe
    with safe_open(str(base / "model.safetensors"), "pt") as fh:
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in set(fh.keys())
    params = dict(AutoModelForCausalLM.from_pretrained(base).named_parameters())
    assert params["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4  # one slice per expert


def test_adapter_on_experts_scans_as_valid(moe):
    _, ckpts, _ = moe
    found = {c.name: c for c in scan(ckpts).checkpoints}
    assert all(c.ok for c in found.values())
    assert sorted(found["a-attention-and-experts"].lora.target_parameters) == sorted(EXPERTS)


@pytest.mark.parametrize("name", [None, "a-attention-and-experts", "b-attention-only"])
def test_moe_scores_match_peft_document_by_document(moe, name):
    base, ckpts, outcome = moe
    assert outcome.exit_code == 0, outcome.problems
    results = outcome.results
    model = results.base if name is None else next(c for c in results.checkpoints if c.name == name)
    got = [d.nll for d in model.scores["text"].documents]
    assert got == pytest.approx(reference(base, None if name is None else ckpts / name), rel=1e-5)
    if name is not None:
        assert got != pytest.approx([d.nll for d in results.base.scores["text"].documents], rel=1e-4)
