"""Adapters as trainers save them, made with peft on the tiny model: scanned by peft's own rules
and scored as peft computes them (an independent per-document computation), each spelling of the
same adapter giving the same numbers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import write_jsonl
from gate.request import prepare_run
from gate.flow import run
from gate.train.tiny import save_adapter, toy_sentences
from gate.scan import scan

ATTENTION = ["q_proj", "v_proj"]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The same adapter (same seed, same modules) written four ways in target_modules.
SPELLINGS = {
    "names": ATTENTION,
    "suffixes": ["self_attn.q_proj", "self_attn.v_proj"],
    "regex": r".*\.(q_proj|v_proj)",
    "paths": [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ATTENTION],
}
OTHERS = {
    "all-linear": {"target_modules": "all-linear"},
    "linear-names": {"target_modules": LINEAR},
    "dora-rslora": {"target_modules": ATTENTION, "use_dora": True, "use_rslora": True},
    "modules-to-save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "layer-1-only": {"target_modules": ATTENTION, "layers_to_transform": [1]},
}


@pytest.fixture(scope="module")
def adapters(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    folder = root / "checkpoints"
    for name, targets in SPELLINGS.items():
        save_adapter(world.base, folder / name, seed=1, target_modules=targets)
    for name, options in OTHERS.items():
        save_adapter(world.base, folder / name, seed=2, **options)
    config = root / "gate.yaml"
    config.write_text(f"base: {world.base}\nsuites:\n  - {{name: text, path: {world.suites / 'text.jsonl'}}}\n")
    request = prepare_run(folder, config_path=config, out_dir=root / "out", device="cpu", batch_size=4)
    return folder, run(request)


def reference_scores(world, adapter) -> dict[str, float]:
    """peft's own model (PeftModel.from_pretrained) on each document, one full forward pass each."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gate.suites import load_suite

    tokenizer = AutoTokenizer.from_pretrained(world.base)
    model = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    out = {}
    for doc in load_suite("text", world.suites / "text.jsonl").documents:
        ids = [tokenizer.bos_token_id, *tokenizer(doc.text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        out[doc.id] = -sum(logprobs[p - 1, ids[p]].item() for p in range(1, len(ids)))
    return out


def documents(outcome, name):
    model = next(c for c in outcome.results.checkpoints if c.name == name)
    assert model.status == "ok", model.reason
    return {d.id: d.nll for d in model.scores["text"].documents}


def test_every_peft_spelling_scans_as_valid(adapters):
    folder, outcome = adapters
    report = scan(folder)
    assert report.invalid == []
    assert sorted(c.name for c in report.checkpoints) == sorted([*SPELLINGS, *OTHERS])
    found = {c.name: c for c in report.checkpoints}
    assert found["dora-rslora"].lora.use_dora and found["dora-rslora"].lora.use_rslora
    assert outcome.exit_code == 0 and outcome.problems == []


def test_equivalent_spellings_give_equal_scores(adapters):
    folder, outcome = adapters
    weights = {(folder / n / "adapter_model.safetensors").read_bytes() for n in SPELLINGS}
    assert len(weights) == 1  # peft saved the same tensors for every spelling
    scores = [documents(outcome, name) for name in SPELLINGS]
    assert all(s == scores[0] for s in scores[1:])
    assert scores[0] != {d.id: d.nll for d in outcome.results.base.scores["text"].documents}
    assert documents(outcome, "all-linear") == documents(outcome, "linear-names")


@pytest.mark.parametrize("name", ["names", "all-linear", "dora-rslora", "modules-to-save", "layer-1-only"])
def test_scores_match_peft_document_by_document(world, adapters, name):
    folder, outcome = adapters
    got = documents(outcome, name)
    expected = reference_scores(world, folder / name)
    assert got.keys() == expected.keys()
    for doc_id, nll in expected.items():
        assert got[doc_id] == pytest.approx(nll, rel=1e-5)
    base = {d.id: d.nll for d in outcome.results.base.scores["text"].documents}
    assert got != pytest.approx(base, rel=1e-4)  # the adapter changes the numbers: the comparison can fail


@pytest.mark.parametrize(
    "name,edit",
    [
        ("layer-1-only", {"layers_to_transform": [0]}),  # its weights are for layer 1
        ("regex", {"target_modules": r".*\.q_proj"}),  # its weights include v_proj
        ("suffixes", {"target_modules": ["attn.q_proj", "v_proj"]}),  # a suffix matches whole name parts only
    ],
)
def test_config_that_does_not_target_its_weights_is_invalid(adapters, tmp_path, name, edit):
    folder, _ = adapters
    shutil.copytree(folder / name, tmp_path / name)
    path = tmp_path / name / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    (bad,) = scan(tmp_path).checkpoints
    assert bad.status == "invalid" and "does not target" in bad.reason


def test_adapter_with_resized_embeddings_is_not_compared(world, tmp_path):
    save_adapter(world.base, tmp_path / "ckpts" / "added-tokens", target_modules=ATTENTION, resize_vocab=3)
    config = tmp_path / "gate.yaml"
    write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in toy_sentences(3, 5)])
    config.write_text(f"base: {world.base}\nsuites:\n  - {{name: text, path: {tmp_path / 'text.jsonl'}}}\n")
    outcome = run(prepare_run(tmp_path / "ckpts", config_path=config, out_dir=tmp_path / "out", device="cpu"))
    (bad,) = outcome.results.checkpoints
    assert bad.status == "error" and "resized the embeddings" in bad.reason and "not comparable" in bad.reason
    assert bad.scores == {} and outcome.exit_code == 2


def test_base_path_from_the_training_machine_is_remapped_with_base(world, ckpt_copy, tmp_path):
    from gate.errors import BaseModelError

    for path in ckpt_copy.rglob("adapter_config.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": "/mnt/train-box/base"}))
    config = tmp_path / "gate.yaml"  # no `base:`: the adapters' own base name is used
    config.write_text(f"suites:\n  - {{name: text, path: {world.suites / 'text.jsonl'}}}\n")
    with pytest.raises(BaseModelError, match=r"'/mnt/train-box/base', a path that does not exist on this machine.*--base"):
        prepare_run(ckpt_copy, config_path=config, out_dir=tmp_path / "out")
    request = prepare_run(ckpt_copy, config_path=config, out_dir=tmp_path / "out", base=str(world.base), device="cpu")
    outcome = run(request)
    assert outcome.exit_code == 0 and all(c.status == "ok" for c in outcome.results.checkpoints)


def test_adapter_with_tensors_the_base_has_no_place_for_is_refused(world, adapters, tmp_path):
    """peft loads the tensors that fit and warns about the others; gate refuses to score that."""
    from safetensors.torch import load_file, save_file

    folder, _ = adapters
    shutil.copytree(folder / "names", tmp_path / "ckpts" / "deeper")
    path = tmp_path / "ckpts" / "deeper" / "adapter_model.safetensors"
    tensors = load_file(path)
    for key in [k for k in tensors if ".layers.1." in k]:  # as if trained on a model with 8 layers
        tensors[key.replace(".layers.1.", ".layers.7.")] = tensors[key].clone()
    save_file(tensors, path)
    assert scan(tmp_path / "ckpts").checkpoints[0].ok  # the config targets q_proj/v_proj, as its tensors say
    config = tmp_path / "gate.yaml"
    config.write_text(f"base: {world.base}\nsuites:\n  - {{name: text, path: {world.suites / 'text.jsonl'}}}\n")
    outcome = run(prepare_run(tmp_path / "ckpts", config_path=config, out_dir=tmp_path / "out", device="cpu"))
    (bad,) = outcome.results.checkpoints
    assert bad.status == "error" and outcome.exit_code == 2 and bad.scores == {}
    assert "4 of its tensors have no place in this base and would be ignored" in bad.reason
    assert "layers.7" in bad.reason and "--base" in bad.reason
