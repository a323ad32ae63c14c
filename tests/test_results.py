"""results.json: corpus numbers from sufficient statistics, versioned, written atomically."""

from __future__ import annotations

import json
import math

import pytest

from gate.errors import GateError
from gate.results import DocumentScore, ModelResult, Results, RunSettings, SuiteInfo, SuiteScore, read_results, write_results


def two_documents() -> SuiteScore:
    return SuiteScore.from_documents(
        "s", [DocumentScore("a", nll=2.0, tokens=2, bytes=5), DocumentScore("b", nll=4.0, tokens=2, bytes=7)]
    )


def test_corpus_numbers_by_hand():
    score = two_documents()
    # sum nll = 6 nats over 4 tokens and 12 bytes.
    assert score.perplexity == pytest.approx(4.4816890703380645)  # e^(6/4)
    assert score.bits_per_byte == pytest.approx(0.7213475204444817)  # 6 / (12 ln 2)
    mean_of_document_perplexities = (math.e**1 + math.e**2) / 2  # what gate must NOT report
    assert abs(score.perplexity - mean_of_document_perplexities) > 0.5


def make_results() -> Results:
    base = ModelResult(name="base", kind="base", path="b", weights_hash="h0", scores={"s": two_documents()})
    ckpt = ModelResult(name="run/checkpoint-2", kind="lora", path="/c", step=2, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]}, scores={"s": two_documents()})
    bad = ModelResult(name="broken", kind="lora", path="/x", status="invalid", reason="truncated")
    return Results(
        schema_version=1,
        gate_version="0.1.0",
        created_at="2026-01-01T00:00:00+00:00",
        command="gate run x",
        versions={"torch": "2"},
        settings=RunSettings("cpu", "float32", 8, 128, 64, "ppl-1", "t"),
        base=base,
        checkpoints=[ckpt, bad],
        suites=[SuiteInfo("s", "perplexity", "/s.jsonl", "d", "i", 2, True)],
    )


def test_round_trip(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_results(path, make_results())
    again = read_results(path)
    assert again == make_results()
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left
    raw = json.loads(path.read_text())
    assert raw["base"]["scores"]["s"]["perplexity"] == pytest.approx(4.4816890703380645)


def test_non_finite_numbers_are_never_written(tmp_path):
    results = make_results()
    results.base.scores["s"].documents[0].nll = float("nan")
    with pytest.raises(ValueError):
        write_results(tmp_path / "results.json", results)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content,fragment",
    [
        ('{"schema_version": 99}', "schema_version 99 is not 1"),
        ("{not json", "unreadable"),
        ('{"schema_version": 1}', "malformed"),
    ],
)
def test_unreadable_results(tmp_path, content, fragment):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(GateError, match=fragment):
        read_results(path)


def test_missing_results(tmp_path):
    with pytest.raises(GateError, match="run `gate run` first"):
        read_results(tmp_path / "results.json")
