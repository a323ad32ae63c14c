"""The CLI through click's CliRunner: exit codes, exact lines, one clear message, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import save_nan_base
from gate.cli import main


@pytest.fixture
def cli():
    return CliRunner()


def invoke(cli, *args):
    result = cli.invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def test_every_command_has_help(cli):
    assert invoke(cli, "--help").exit_code == 0
    for name, command in main.commands.items():
        assert command.help, f"{name} has no help text"
        result = invoke(cli, name, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_scan_table(cli, world):
    result = invoke(cli, "scan", world.checkpoints)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "checkpoint          kind    step  status",
        "run-a/checkpoint-2  lora       2  ok",
        "run-a/checkpoint-4  lora       4  ok",
        "untrained           lora       -  ok",
        "3 valid, 0 invalid",
    ]


def test_scan_json(cli, world):
    result = invoke(cli, "scan", world.checkpoints, "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["run-a/checkpoint-2", "run-a/checkpoint-4", "untrained"]
    for row in rows:
        assert {"name", "path", "step", "kind", "base_model", "status", "reason"} <= set(row)
        assert row["status"] == "ok" and row["reason"] is None and row["kind"] == "lora"


def test_scan_with_an_invalid_checkpoint_exits_2(cli, ckpt_copy):
    (ckpt_copy / "run-a/checkpoint-2/adapter_model.safetensors").unlink()
    result = invoke(cli, "scan", ckpt_copy)
    assert result.exit_code == 2
    assert "run-a/checkpoint-2  lora       2  INVALID: " in result.stdout
    assert "2 valid, 1 invalid" in result.stdout


def test_scan_empty_folder_exits_2(cli, tmp_path):
    result = invoke(cli, "scan", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path}: no checkpoints found;")


def test_scan_missing_folder_exits_2(cli, tmp_path):
    result = invoke(cli, "scan", tmp_path / "nope")
    assert result.exit_code == 2
    assert "not a folder" in result.stderr


def test_run_writes_results_and_prints_a_table(cli, world, tmp_path):
    out = tmp_path / "out"
    result = invoke(cli, "run", world.checkpoints, "--config", world.config, "--out", out, "--device", "cpu", "-q")
    assert result.exit_code == 1, result.output  # the fixture's suites (2-13 documents) are too small to certify
    lines = result.stdout.splitlines()
    assert lines[0] == "perplexity (lower is better)"
    assert lines[1].split() == ["model", "step", "text", "prompt", "messages", "long"]
    assert [line.split()[0] for line in lines[2:6]] == ["base", "run-a/checkpoint-2", "run-a/checkpoint-4", "untrained"]
    assert lines[6] == "computed 16 model x suite score(s), reused 0 from the store"
    assert lines[7] == f"results: {out / 'results.json'}"
    # The default policy: no perplexity suite may rise by more than 5%; 13 documents cannot show that.
    assert lines[9] == "verdict: no candidate (no checkpoint passes every gate (3 inconclusive))"
    assert lines[10].split()[:3] == ["run-a/checkpoint-2", "INCONCLUSIVE", "text.perplexity:"]
    assert "too small: 13 items, at least 20 needed for this check" in lines[10]
    assert lines[13] == "sizing (80% power at alpha / 3 = 0.0167):"
    assert lines[14].startswith("  text.perplexity max increase 5%: MDE ") and lines[14].endswith("TOO SMALL")
    assert "; 13 items, about " in lines[14]
    assert lines[18].startswith("  chance every gate passes: run-a/checkpoint-2 0.00")
    assert lines[19] == f"verdict: {out / 'verdict.json'}"
    assert (out / "results.json").is_file() and (out / "gate.sqlite").is_file() and (out / "verdict.json").is_file()
    again = invoke(cli, "run", world.checkpoints, "--config", world.config, "--out", out, "--device", "cpu", "-q")
    assert again.exit_code == 1
    assert "computed 0 model x suite score(s), reused 16 from the store" in again.stdout


def test_run_uses_the_builtin_suite_without_a_config(cli, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(cli, "run", world.checkpoints, "--out", tmp_path / "out", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split() == ["model", "step", "known-good"]


def test_run_bad_config_exits_2_naming_file_and_field(cli, world, tmp_path):
    config = tmp_path / "gate.yaml"
    config.write_text("suites:\n  - name: s\n    path: nowhere.jsonl\nbatch_sise: 3\n")
    result = invoke(cli, "run", world.checkpoints, "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {config}: 2 problems:")
    assert "suites[0] (s).path:" in result.stderr and "batch_sise: unknown key; did you mean 'batch_size'?" in result.stderr


def test_run_bad_suite_exits_2(cli, world, tmp_path):
    suite = tmp_path / "s.jsonl"
    suite.write_text("")
    config = tmp_path / "gate.yaml"
    config.write_text(f"suites: [{{name: s, path: {suite}}}]\n")
    result = invoke(cli, "run", world.checkpoints, "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert f"error: {suite}: suite 's' has no documents" in result.stderr


def test_run_without_checkpoints_exits_2(cli, world, tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke(cli, "run", tmp_path / "empty", "--config", world.config, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "no checkpoints found" in result.stderr


def test_run_with_only_invalid_checkpoints_exits_2(cli, world, tmp_path):
    folder = tmp_path / "ckpts" / "checkpoint-1"
    folder.mkdir(parents=True)
    shutil.copy(world.checkpoints / "untrained/adapter_config.json", folder)
    result = invoke(cli, "run", tmp_path / "ckpts", "--config", world.config, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "no valid checkpoint to score" in result.stderr and "checkpoint-1" in result.stderr


def test_run_keeps_results_when_one_checkpoint_is_invalid(cli, world, ckpt_copy, tmp_path):
    (ckpt_copy / "run-a/checkpoint-2/adapter_model.safetensors").write_bytes(b"\0" * 10)
    out = tmp_path / "out"
    result = invoke(cli, "run", ckpt_copy, "--config", world.config, "--out", out, "--device", "cpu", "-q")
    assert result.exit_code == 2
    assert "run-a/checkpoint-2       2  INVALID:" in result.stdout
    assert "error: " in result.stderr and "corrupt safetensors" in result.stderr
    results = json.loads((out / "results.json").read_text())
    statuses = {c["name"]: c["status"] for c in results["checkpoints"]}
    assert statuses == {"run-a/checkpoint-2": "invalid", "run-a/checkpoint-4": "ok", "untrained": "ok"}


def test_run_unknown_base_exits_2(cli, world, tmp_path):
    result = invoke(cli, "run", world.checkpoints, "--base", "nobody/no-model", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "error: base 'nobody/no-model': not a local folder and not in the Hugging Face cache" in result.stderr
    assert "--online" in result.stderr


def test_run_max_length_beyond_context_exits_2(cli, world, tmp_path):
    result = invoke(cli, "run", world.checkpoints, "--config", world.config, "--max-length", 4096, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "max_length 4096 exceeds the model's context of 128 tokens" in result.stderr


def test_run_runtime_failure_exits_3(cli, world, tmp_path):
    broken = save_nan_base(world.base, tmp_path / "nan-base")
    result = invoke(cli, "run", world.checkpoints, "--config", world.config, "--base", broken, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 3, result.output
    assert "non-finite log-likelihood" in result.stderr


@pytest.fixture
def ran(cli, world, tmp_path):
    out = tmp_path / "out"
    result = invoke(cli, "run", world.checkpoints, "--config", world.config, "--out", out, "--device", "cpu", "-q")
    assert result.exit_code == 1  # no candidate: the fixture's suites are too small to certify anything
    return out


def test_check_reproduces_the_run_verdict(cli, ran):
    first = json.loads((ran / "verdict.json").read_text())
    result = invoke(cli, "check", ran)
    assert result.exit_code == 1
    again = json.loads((ran / "verdict.json").read_text())
    first.pop("provenance"), again.pop("provenance")
    assert again == first
    assert first["selected"] is None and first["outcome"] == "no_candidate"
    assert [c["verdict"] for c in first["checkpoints"]] == ["inconclusive", "inconclusive", "inconclusive"]
    check = first["checkpoints"][0]["checks"][0]
    keys = {"suite", "metric", "base_value", "value", "delta", "low", "high", "level", "p_value", "margin", "mde", "items_needed", "outcome", "reason"}
    assert keys <= set(check)


def test_check_with_an_edited_policy_exits_1_when_nothing_may_ship(cli, world, ran, tmp_path):
    strict = tmp_path / "strict.yaml"
    strict.write_text(world.config.read_text() + "gates:\n  - {suite: prompt, metric: perplexity, min_decrease: 50%}\n")
    result = invoke(cli, "check", ran, "--config", strict)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[1].startswith("verdict: no candidate (no checkpoint passes every gate")
    assert json.loads((ran / "verdict.json").read_text())["selected"] is None


def test_check_with_an_invalid_policy_exits_2(cli, world, ran, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(world.config.read_text() + "gates:\n  - {suite: text, metric: acc, max_drop: 0.1}\n  - {suite: text, metric: perplexity, max_increase: -2%}\n")
    result = invoke(cli, "check", ran, "--config", bad)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {bad}: 2 problems:")
    assert "gates[0]: metric 'acc' of perplexity suite 'text' must be perplexity or bits_per_byte" in result.stderr
    assert "gates[1].max_increase: must be 0 or more" in result.stderr


def test_check_without_results_exits_2(cli, tmp_path):
    result = invoke(cli, "check", tmp_path)
    assert result.exit_code == 2
    assert "results.json: not found; run `gate run` first" in result.stderr


def test_bless_then_gate_against_the_release(cli, world, ran, tmp_path):
    result = invoke(cli, "bless", "untrained", "--out", ran)
    assert result.exit_code == 0 and result.stdout.strip() == f"blessed untrained as the current release: {ran / 'release.json'}"
    config = tmp_path / "with-release.yaml"
    config.write_text(world.config.read_text() + "reference: release\n")
    result = invoke(cli, "check", ran, "--config", config)
    assert result.exit_code == 1
    verdict = json.loads((ran / "verdict.json").read_text())
    untrained = verdict["checkpoints"][2]
    assert {c["against"] for c in untrained["checks"]} == {"base", "release:untrained"}
    assert {c["reason"] for c in untrained["checks"] if c["against"] != "base"} == {"the same weights as release:untrained: nothing changed"}
    assert verdict["policy"]["reference"] == "release"


def test_bless_errors(cli, ran, tmp_path):
    result = invoke(cli, "bless", "nope", "--out", ran)
    assert result.exit_code == 2 and "no checkpoint 'nope' in results.json" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results.json").write_text((ran / "results.json").read_text())
    result = invoke(cli, "check", empty, "--config", ran.parent / "missing.yaml")
    assert result.exit_code == 2 and "file not found" in result.stderr


def test_shards_merged_equal_a_single_run(cli, world, ran, tmp_path):
    outs = []
    for i in (1, 2):
        out = tmp_path / f"shard{i}"
        result = invoke(cli, "run", world.checkpoints, "--config", world.config, "--out", out, "--device", "cpu", "-q", "--shard", f"{i}/2")
        assert result.exit_code == 0, result.output
        assert f"shard {i}/2 scored" in result.stdout
        outs.append(out)
    shard2 = json.loads((outs[1] / "results.json").read_text())
    assert shard2["base"]["scores"] == {}  # the base is shard 1's
    merged = tmp_path / "merged"
    args = ["merge", world.checkpoints, "--config", world.config, "--out", merged]
    result = invoke(cli, *args, *[a for out in outs for a in ("--from", out)])
    assert result.exit_code == 1, result.output
    assert "computed 0 model x suite score(s), reused 16 from the store" in result.stdout
    single, combined = (json.loads((d / "results.json").read_text()) for d in (ran, merged))
    assert [c["scores"] for c in combined["checkpoints"]] == [c["scores"] for c in single["checkpoints"]]
    assert combined["base"]["scores"] == single["base"]["scores"]
    verdicts = [json.loads((d / "verdict.json").read_text()) for d in (ran, merged)]
    for v in verdicts:
        v.pop("provenance")
    assert verdicts[0] == verdicts[1]


def test_bad_shard_and_merge_inputs(cli, world, tmp_path):
    result = invoke(cli, "run", world.checkpoints, "--config", world.config, "--out", tmp_path / "o", "--shard", "3/2")
    assert result.exit_code == 2 and "--shard '3/2': must be i/n" in result.stderr
    result = invoke(cli, "merge", world.checkpoints, "--from", tmp_path / "nothing", "--out", tmp_path / "m")
    assert result.exit_code == 2 and "results.json: not found" in result.stderr


def test_executor_ray_without_ray_says_how_to_install(cli, world, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    result = invoke(cli, "run", world.checkpoints, "--config", world.config, "--out", tmp_path / "o", "--executor", "ray", "-q")
    assert result.exit_code == 2
    assert "pip install 'gate[ray]'" in result.stderr


def test_run_records_the_contamination_check_in_results_and_reports(cli, world, tmp_path):
    text_rows = [json.loads(line) for line in (world.suites / "text.jsonl").read_text().splitlines()]
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "Something else entirely. " + text_rows[0]["text"]}) + "\n")
    config = tmp_path / "gate.yaml"
    config.write_text(
        world.config.read_text() + f"contamination: {{training_data: [{train}], suites: [text, prompt]}}\n"
    )
    out = tmp_path / "out"
    result = invoke(cli, "run", world.checkpoints, "--config", config, "--out", out, "-q")
    assert result.exit_code in (0, 1), result.output
    results = json.loads((out / "results.json").read_text())
    overlaps = {s["name"]: s["overlap"] for s in results["suites"]}
    assert overlaps["messages"] == [] and len(overlaps["prompt"]) == 1 and overlaps["prompt"][0]["contaminated"] == {}
    [text] = overlaps["text"]
    assert text["n"] == 8 and text["documents"] == 13 and text["training_file"] == str(train)
    assert 1 <= len(text["contaminated"]) < 13 and max(text["contaminated"].values()) == 1.0
    assert any("text: " in w and "share 8 consecutive words with train.jsonl" in w for w in results["warnings"])
    html = (out / "report.html").read_text()
    assert "Contamination check" in html and "✗ text: " in html and "✓ prompt: none of 5 documents" in html
    assert "Contamination check: ❌ text:" in (out / "summary.md").read_text()
