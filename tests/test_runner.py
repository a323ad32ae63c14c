"""The run recipe end to end on real peft checkpoints: numbers, incrementality, resumption, bad models."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from conftest import HANG_GUARD_S, write_jsonl
from gate.request import prepare_run
from gate.progress import ProgressEvent
from gate.results import read_results
from gate.flow import run
from gate.train.tiny import build_base, save_untrained_adapter, toy_sentences

SUITES = ["text", "prompt", "messages", "long"]


def run_on(world, checkpoints, out, progress=None, **overrides):
    request = prepare_run(checkpoints, config_path=world.config, out_dir=out, device="cpu", batch_size=4, **overrides)
    return run(request, progress=progress) if progress else run(request)


@pytest.fixture(scope="module")
def first_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return run_on(world, world.checkpoints, out), out


def test_first_run_scores_everything_with_the_base_loaded_once(first_run):
    outcome, out = first_run
    models = ["base", "run-a/checkpoint-2", "run-a/checkpoint-4", "untrained"]
    assert sorted(outcome.computed) == sorted((m, s) for m in models for s in SUITES)
    assert outcome.base_loads == 1
    assert outcome.exit_code == 0 and outcome.problems == []
    results = read_results(out / "results.json")
    assert [c.name for c in results.checkpoints] == models[1:]
    assert results.settings.max_length == 128 and results.settings.dtype == "float32"
    for model in [results.base, *results.checkpoints]:
        assert sorted(model.scores) == sorted(SUITES)
        for score in model.scores.values():
            # Corpus numbers come from the sums, never from per-document perplexities.
            assert score.nll_sum == pytest.approx(sum(d.nll for d in score.documents), rel=1e-12)
            assert score.tokens == sum(d.tokens for d in score.documents)
            assert score.perplexity == pytest.approx(math.exp(score.nll_sum / score.tokens))
            assert score.bits_per_byte == pytest.approx(score.nll_sum / math.log(2) / score.bytes)


def test_results_json_carries_the_per_document_records(first_run, world):
    _, out = first_run
    raw = json.loads((out / "results.json").read_text())
    assert raw["schema_version"] == 1
    text = raw["checkpoints"][1]["scores"]["text"]
    assert len(text["documents"]) == 13
    assert {"id", "nll", "tokens", "bytes"} <= set(text["documents"][0])
    assert text["perplexity"] == pytest.approx(math.exp(text["nll_sum"] / text["tokens"]))
    assert raw["base"]["weights_hash"] and raw["settings"]["tokenizer_hash"]
    assert {s["name"] for s in raw["suites"]} == set(SUITES)


def test_untrained_adapter_reproduces_the_base_exactly(first_run):
    outcome, _ = first_run
    base = outcome.results.base
    untrained = next(c for c in outcome.results.checkpoints if c.name == "untrained")
    for suite in SUITES:
        assert [d.nll for d in untrained.scores[suite].documents] == [d.nll for d in base.scores[suite].documents]


def test_trained_adapter_differs_from_the_base(first_run):
    outcome, _ = first_run
    base = outcome.results.base.scores["prompt"]
    trained = next(c for c in outcome.results.checkpoints if c.name == "run-a/checkpoint-4").scores["prompt"]
    assert abs(trained.nll_sum - base.nll_sum) > 1e-3


def test_rerun_computes_nothing_and_loads_no_model(first_run, world):
    outcome, out = first_run
    again = run_on(world, world.checkpoints, out)
    assert again.computed == []
    assert again.base_loads == 0
    assert len(again.reused) == 16
    assert again.results.checkpoints[0].scores["text"] == outcome.results.checkpoints[0].scores["text"]


def test_a_new_checkpoint_costs_one_checkpoint(world, ckpt_copy, tmp_path):
    out = tmp_path / "out"
    run_on(world, ckpt_copy, out)
    save_untrained_adapter(world.base, ckpt_copy / "run-b" / "checkpoint-1", seed=1)
    again = run_on(world, ckpt_copy, out)
    assert sorted(again.computed) == [("run-b/checkpoint-1", s) for s in sorted(SUITES)]
    assert again.base_loads == 1


def test_changed_suite_data_recomputes_that_suite_only(world, ckpt_copy, tmp_path):
    suites = tmp_path / "suites"
    shutil.copytree(world.suites, suites)
    config = tmp_path / "gate.yaml"
    config.write_text(world.config.read_text().replace(str(world.suites), str(suites)))
    request = dict(config_path=config, out_dir=tmp_path / "out", device="cpu")
    run(prepare_run(ckpt_copy, **request))
    with (suites / "text.jsonl").open("a") as fh:
        fh.write(json.dumps({"text": "A new line of text."}) + "\n")
    again = run(prepare_run(ckpt_copy, **request))
    assert {s for _, s in again.computed} == {"text"}
    assert len(again.computed) == 4


def test_interrupted_run_keeps_finished_scores_and_resumes(world, tmp_path):
    out = tmp_path / "out"
    starts = []

    def interrupt_on_third_pair(event: ProgressEvent) -> None:
        if event.kind == "start":
            starts.append(event)
            if len(starts) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_on(world, world.checkpoints, out, progress=interrupt_on_third_pair)
    rows = sqlite3.connect(out / "gate.sqlite").execute("SELECT COUNT(*) FROM suite_scores").fetchone()[0]
    assert rows == 2
    resumed = run_on(world, world.checkpoints, out)
    assert len(resumed.computed) == 14 and len(resumed.reused) == 2


def test_killed_process_leaves_a_sound_store_and_the_rerun_finishes(world, tmp_path):
    """kill -9 in the middle of scoring: no corrupt store, only the remaining work is done."""
    suites = tmp_path / "suites"
    suites.mkdir()
    write_jsonl(suites / "big.jsonl", [{"text": t} for t in toy_sentences(1500, 11)])
    config = tmp_path / "gate.yaml"
    config.write_text(f"base: {world.base}\nsuites:\n  - {{name: big, path: {suites / 'big.jsonl'}}}\n")
    out = tmp_path / "out"
    store = out / "gate.sqlite"
    cmd = [sys.executable, "-m", "gate", "run", str(world.checkpoints), "--config", str(config), "--out", str(out), "-q", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    rows = 0
    deadline = time.monotonic() + HANG_GUARD_S
    while rows == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if store.exists():
            try:
                rows = sqlite3.connect(store).execute("SELECT COUNT(*) FROM suite_scores").fetchone()[0]
            except sqlite3.OperationalError:
                rows = 0  # schema not created yet
    assert proc.poll() is None, "the run finished before it could be killed; make the suite bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    conn = sqlite3.connect(store)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = conn.execute("SELECT COUNT(*) FROM suite_scores").fetchone()[0]
    assert 1 <= stored < 4
    resumed = run(prepare_run(world.checkpoints, config_path=config, out_dir=out, device="cpu"))
    assert len(resumed.computed) == 4 - stored
    assert len(resumed.reused) == stored


def test_adapter_for_another_base_is_reported_and_the_rest_is_scored(world, ckpt_copy, tmp_path, first_run):
    other = build_base(tmp_path / "other-base", hidden_size=32)
    save_untrained_adapter(other, ckpt_copy / "foreign")  # sorts first: the first adapter attached fails
    outcome = run_on(world, ckpt_copy, tmp_path / "out", base=str(world.base))
    foreign = next(c for c in outcome.results.checkpoints if c.name == "foreign")
    assert foreign.status == "error"
    assert "size mismatch" in foreign.reason and "trained on another base" in foreign.reason
    assert outcome.exit_code == 2
    scored = [c for c in outcome.results.checkpoints if c.status == "ok"]
    assert len(scored) == 3 and all(len(c.scores) == 4 for c in scored)
    # The failed load left nothing behind in the base: the others score exactly as in a clean run.
    clean = {c.name: c for c in first_run[0].results.checkpoints}
    for c in scored:
        assert c.scores == clean[c.name].scores
    assert read_results(tmp_path / "out" / "results.json").checkpoints[0].name == "foreign"


def test_adapter_whose_target_modules_the_base_lacks(world, ckpt_copy, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=512))
    get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(ckpt_copy / "gpt2-adapter")
    outcome = run_on(world, ckpt_copy, tmp_path / "out", base=str(world.base))
    bad = next(c for c in outcome.results.checkpoints if c.name == "gpt2-adapter")
    assert bad.status == "error" and "--base" in bad.reason
    assert outcome.exit_code == 2


def test_checkpoint_with_added_tokens_is_not_compared(world, ckpt_copy, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.base)
    tok.add_tokens(["<new_token>"])
    tok.save_pretrained(ckpt_copy / "run-a/checkpoint-4")
    outcome = run_on(world, ckpt_copy, tmp_path / "out")
    bad = next(c for c in outcome.results.checkpoints if c.name == "run-a/checkpoint-4")
    assert bad.status == "error" and "tokenizer differs" in bad.reason and "513 vs 512" in bad.reason


def test_full_checkpoint_is_scored_alone_and_matches_the_merged_adapter(world, tmp_path, first_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, world.checkpoints / "run-a/checkpoint-4").merge_and_unload()
    folder = tmp_path / "full-run" / "checkpoint-4"
    merged.save_pretrained(folder)
    outcome = run_on(world, tmp_path / "full-run", tmp_path / "out")
    (full,) = outcome.results.checkpoints
    assert full.kind == "full" and full.status == "ok"
    lora = next(c for c in first_run[0].results.checkpoints if c.name == "run-a/checkpoint-4")
    for suite in SUITES:
        assert full.scores[suite].nll_sum == pytest.approx(lora.scores[suite].nll_sum, rel=1e-5)
