"""The long table (Results.to_frame, gate export): one row per model x suite x item x metric."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from click.testing import CliRunner

import gate
from gate.cli import main
from gate.results import ItemScore, TaskScore, write_results
from test_results import make_results  # tests/ is on sys.path (pytest rootdir-relative imports)


def results_with_a_task():
    results = make_results()
    items = [ItemScore("0", "p0", {"acc": 1.0}), ItemScore("1", "p1", {"acc": 0.0}), ItemScore("2", "p2", {"acc": 1.0})]
    results.base.tasks["arith"] = TaskScore("arith", "arith", "acc", {"acc": 2 / 3}, items)
    return results


def test_frame_by_hand():
    frame = results_with_a_task().to_frame()
    # base: 2 documents x (nll, tokens, bytes, perplexity) + 3 items x acc; the checkpoint: 2 x 4;
    # the invalid checkpoint has no rows.
    assert len(frame) == 8 + 3 + 8
    assert set(frame["model"]) == {"base", "run/checkpoint-2"}
    doc = frame[(frame.model == "base") & (frame.item == "a")].set_index("metric")
    assert doc.loc["nll", "value"] == 2.0 and doc.loc["tokens", "value"] == 2 and doc.loc["bytes", "value"] == 5
    assert doc.loc["perplexity", "value"] == pytest.approx(math.e)  # exp(2 / 2): the document's own
    # the suite-level figure is the corpus perplexity exp(6 / 4), not a mean of document perplexities
    assert doc.loc["perplexity", "suite_value"] == pytest.approx(math.exp(1.5))
    assert math.isnan(doc.loc["nll", "suite_value"])
    assert doc.loc["perplexity", "headline"] and not doc.loc["nll", "headline"]
    acc = frame[(frame.suite == "arith")]
    assert list(acc["value"]) == [1.0, 0.0, 1.0]
    assert acc["suite_value"].tolist() == pytest.approx([2 / 3] * 3) and acc["headline"].all()
    steps = frame.drop_duplicates("model").set_index("model")["step"]
    assert pd.isna(steps["base"]) and steps["run/checkpoint-2"] == 2
    # one analysis people do: the headline metric by step
    by_step = frame[frame.headline & (frame.suite == "s")].groupby("model")["suite_value"].first()
    assert by_step["base"] == pytest.approx(math.exp(1.5))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_writes_the_same_table(tmp_path, fmt):
    out = tmp_path / "out"
    write_results(out / "results.json", results_with_a_task())
    result = CliRunner().invoke(main, ["export", str(out), "--format", fmt])
    assert result.exit_code == 0, result.output
    path = out / f"results.{fmt}"
    assert result.output.strip() == f"table: {path}"
    read = {"csv": pd.read_csv, "parquet": pd.read_parquet, "jsonl": lambda p: pd.read_json(p, lines=True)}[fmt]
    written = read(path)
    expected = gate.load_results(out).to_frame()
    assert list(written.columns) == list(expected.columns)
    assert len(written) == len(expected)
    assert written["value"].tolist() == pytest.approx(expected["value"].tolist())


def test_export_errors_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path)])
    assert result.exit_code == 2
    assert "results.json: not found; run `gate run` first" in result.output
    out = tmp_path / "out"
    write_results(out / "results.json", results_with_a_task())
    (tmp_path / "blocker").write_text("a file, not a folder")
    result = CliRunner().invoke(main, ["export", str(out), "-o", str(tmp_path / "blocker" / "t.csv")])
    assert result.exit_code == 2 and "cannot be written" in result.output


def test_load_results_takes_the_folder_or_the_file(tmp_path):
    write_results(tmp_path / "results.json", results_with_a_task())
    assert gate.load_results(tmp_path) == gate.load_results(tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["schema_version"] == 1
