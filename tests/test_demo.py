"""`gate demo` end to end on the real SmolLM2 base, at reduced size (shorter training runs)."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
from click.testing import CliRunner

from gate.cli import main
from gate.train.demo import GGUF_DIST, demo_plans


# Documents per suite: every suite whole (arith, the largest, has 100 items). The guardrails need
# their items to certify anything at the family's level: at 20 or 50 items arith's `max_drop: 0.1`
# stays inconclusive even when base and checkpoint agree on every item, and nothing may ship.
LIMIT = "100"


def _require_smollm2():
    try:
        importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            pytest.fail(f"{GGUF_DIST} is not installed; `make install` installs it (CI must run the demo test)")
        pytest.skip(f"{GGUF_DIST} is not installed (`make install` installs it)")


def test_reduced_plans_keep_the_shape_of_the_full_demo():
    full, reduced = demo_plans(1.0), demo_plans(0.15)
    assert [p.name for p in full] == ["run-healthy", "run-overfit"]
    assert [(p.steps, p.save_steps) for p in full] == [(30, 10), (30, 10)]
    assert [(p.steps, p.save_steps) for p in reduced] == [(4, 2), (4, 2)]
    # sqrt(30 / 4) times the full-size learning rates, so that a short run moves as far
    assert reduced[0].learning_rate == pytest.approx(3e-4 * (30 / 4) ** 0.5)
    assert full[1].learning_rate / full[0].learning_rate == pytest.approx(10)


@pytest.mark.slow
def test_demo_rejects_the_forgetting_run_and_picks_the_healthy_one(tmp_path):
    _require_smollm2()
    runner = CliRunner()
    args = ["demo", "--dir", str(tmp_path / "demo"), "--out", str(tmp_path / "out"), "--size", "0.15", "--limit", LIMIT, "-q"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output

    # The base: an ordinary safetensors folder, not a quantized one.
    base = tmp_path / "demo" / "base"
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    # The runs: exactly the folders the Trainer writes.
    for run in ("run-healthy", "run-overfit"):
        for step in (2, 4):
            folder = tmp_path / "demo" / "checkpoints" / run / f"checkpoint-{step}"
            assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= {f.name for f in folder.iterdir()}

    verdict = json.loads((tmp_path / "out" / "verdict.json").read_text())
    assert verdict["selected"].startswith("run-healthy/")
    overfit = [c for c in verdict["checkpoints"] if c["name"].startswith("run-overfit/")]
    assert len(overfit) == 2
    for c in overfit:
        assert c["verdict"] == "fail"
        assert any(k["suite"] == "known-good" and k["outcome"] == "fail" for k in c["checks"])
    assert "run-overfit: 2 of 2 checkpoints rejected (regressed on known-good" in result.output
    assert f"verdict: {verdict['selected']} may ship" in result.output

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    checked = {s["name"]: s["overlap"] for s in results["suites"] if s["overlap"]}
    assert set(checked) == {"known-good", "chat-known-good"}
    assert all(o["contaminated"] == {} for found in checked.values() for o in found)
    assert "none of 24 documents shares 8 consecutive words with triage-train.jsonl" in (tmp_path / "out" / "report.html").read_text()

    # Everything is cached: the second demo trains nothing and scores nothing.
    stamp = (tmp_path / "demo" / "checkpoints" / "run-healthy" / "checkpoint-2" / "adapter_model.safetensors").stat().st_mtime_ns
    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "computed 0 model x suite score(s)" in again.output
    assert (tmp_path / "demo" / "checkpoints" / "run-healthy" / "checkpoint-2" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
