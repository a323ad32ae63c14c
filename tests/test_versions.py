"""Library versions are part of every score's identity: recorded per score, never mixed, and an
upgrade rescores what it affects (the base included), saying why."""

from __future__ import annotations

import json
import sqlite3
from importlib.metadata import version

import pytest
from click.testing import CliRunner

from gate.cli import main
from gate.hashing import sha256_json
from gate.results import read_results

INSTALLED = {p: version(p) for p in ("torch", "transformers", "tokenizers", "peft")}
CONFIG = "base: {base}\nsuites:\n  - {{name: text, path: {text}}}\n"
# The policy is not under test here: 13 tiny documents cannot certify a checkpoint, so a run ends
# with no candidate (exit 1). Exit codes 2 and 3 win over 1, so exit 1 also says that nothing was
# refused or failed: the versions let the run, check and merge through.
NO_CANDIDATE = 1


def gate(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def scored(world, tmp_path):
    config = tmp_path / "gate.yaml"
    config.write_text(CONFIG.format(base=world.base, text=world.suites / "text.jsonl"))
    out = tmp_path / "out"
    assert gate("run", world.checkpoints, "--config", config, "--out", out, "--device", "cpu", "-q").exit_code == NO_CANDIDATE
    return config, out


def test_each_score_records_the_library_versions_it_was_computed_under(scored):
    _, out = scored
    results = read_results(out / "results.json")
    expected_base = {k: v for k, v in INSTALLED.items() if k != "peft"}  # peft never touches the base
    assert results.base.scores["text"].libraries == expected_base
    for checkpoint in results.checkpoints:
        assert checkpoint.scores["text"].libraries == INSTALLED
    raw = json.loads((out / "results.json").read_text())
    assert raw["checkpoints"][0]["scores"]["text"]["libraries"]["transformers"] == INSTALLED["transformers"]


def _as_if_stored_under(store, package: str, old: str) -> None:
    """Rewrite a store as gate writes it under another version of one package (keys included)."""
    con = sqlite3.connect(store)
    with con:
        for table, detail in (("suite_scores", "document_scores"), ("task_scores", "item_scores")):
            for key, text in con.execute(f"SELECT key, identity_json FROM {table}").fetchall():
                identity = json.loads(text)
                identity["versions"][package] = old
                new = sha256_json(identity)
                con.execute(f"UPDATE {table} SET key=?, identity_json=? WHERE key=?", (new, json.dumps(identity, sort_keys=True), key))
                con.execute(f"UPDATE {detail} SET score_key=? WHERE score_key=?", (new, key))
    con.close()


def _work_as_if_planned_under(out, package: str, old: str) -> None:
    """Rewrite a run's work.json as gate plans it under another version of one package (keys included)."""
    path = out / "work.json"
    work = json.loads(path.read_text())
    work["versions"][package] = work["library_versions"][package] = old
    for item in work["items"]:
        if package in item["identity"]["versions"]:
            item["identity"]["versions"][package] = old
            item["key"] = sha256_json(item["identity"])
    path.write_text(json.dumps(work))


def test_after_an_upgrade_everything_is_rescored_and_the_run_says_why(world, scored):
    config, out = scored
    before = read_results(out / "results.json")
    _as_if_stored_under(out / "gate.sqlite", "transformers", "4.57.6")
    result = gate("run", world.checkpoints, "--config", config, "--out", out, "--device", "cpu", "-q")
    assert result.exit_code == NO_CANDIDATE
    lines = [line for line in result.output.splitlines() if line.startswith("rescoring")]
    assert lines == [
        f"rescoring 4 model x suite score(s) stored under other library versions (transformers 4.57.6 -> "
        f"{INSTALLED['transformers']}): scores computed under other versions are never compared"
    ]
    assert "computed 4 model x suite score(s), reused 0 from the store" in result.output  # the base included
    after = read_results(out / "results.json")
    assert after.base.scores["text"].nll_sum == pytest.approx(before.base.scores["text"].nll_sum, rel=1e-9)
    # Nothing changed since: the next run reuses everything and says nothing about versions.
    again = gate("run", world.checkpoints, "--config", config, "--out", out, "--device", "cpu", "-q")
    assert "rescoring" not in again.output and "computed 0 model x suite score(s), reused 4" in again.output


def test_check_refuses_results_that_mix_library_versions(scored):
    config, out = scored
    assert gate("check", out, "--config", config).exit_code == NO_CANDIDATE
    raw = json.loads((out / "results.json").read_text())
    raw["checkpoints"][1]["scores"]["text"]["libraries"]["transformers"] = "4.57.6"
    raw["checkpoints"][2]["scores"]["text"]["libraries"]["tokenizers"] = "0.22.2"
    (out / "results.json").write_text(json.dumps(raw))
    result = gate("check", out, "--config", config)
    assert result.exit_code == 2
    assert "scores computed under other library versions would be compared" in result.output
    assert f"  - run-a/checkpoint-4 on text: transformers 4.57.6 vs {INSTALLED['transformers']} (the base's)" in result.output
    assert f"  - untrained on text: tokenizers 0.22.2 vs {INSTALLED['tokenizers']} (the base's)" in result.output
    assert "run-a/checkpoint-2" not in result.output


def test_merge_uses_the_versions_the_shards_scored_under(world, tmp_path):
    config = tmp_path / "gate.yaml"
    config.write_text(CONFIG.format(base=world.base, text=world.suites / "text.jsonl"))
    shards = [tmp_path / f"shard{i}" for i in (1, 2)]
    for i, out in enumerate(shards, 1):
        assert gate("run", world.checkpoints, "--config", config, "--out", out, "--device", "cpu", "-q", "--shard", f"{i}/2").exit_code == 0  # a shard gives no verdict
        # As if the shards ran on GPU machines (a CUDA torch build) and the merge runs on a CPU one.
        _as_if_stored_under(out / "gate.sqlite", "torch", "2.13.0+cu126")
        raw = json.loads((out / "results.json").read_text())
        raw["versions"]["torch"] = "2.13.0+cu126"
        (out / "results.json").write_text(json.dumps(raw))
        _work_as_if_planned_under(out, "torch", "2.13.0+cu126")
    merged = tmp_path / "merged"
    args = ["merge", world.checkpoints, "--config", config, "--out", merged, "--from", shards[0], "--from", shards[1]]
    assert gate(*args).exit_code == NO_CANDIDATE
    results = read_results(merged / "results.json")
    assert all(c.scores["text"].libraries["torch"] == "2.13.0+cu126" for c in results.checkpoints)
    assert results.base.scores["text"].libraries["torch"] == "2.13.0+cu126"
    raw = json.loads((shards[1] / "results.json").read_text())
    raw["versions"]["transformers"] = "4.57.6"
    (shards[1] / "results.json").write_text(json.dumps(raw))
    _work_as_if_planned_under(shards[1], "transformers", "4.57.6")
    refused = gate("merge", world.checkpoints, "--config", config, "--out", tmp_path / "m2", "--from", shards[0], "--from", shards[1])
    assert refused.exit_code == 2 and "the shards scored under different library versions" in refused.output
    assert f"{shards[1]}: torch 2.13.0+cu126, transformers 4.57.6" in refused.output
