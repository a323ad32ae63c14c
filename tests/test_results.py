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
        ('{"schema_version": 1}', r"results.json: gate_version: field required \(and 7 more problem\(s\)\); re-run `gate run`"),
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


@pytest.mark.parametrize(
    "breakage,expected",
    [
        (lambda d: d["checkpoints"][0]["scores"]["s"]["documents"][1].update(nll="x"),
         "checkpoints[0].scores.s.documents[1].nll: input should be a valid number, unable to parse string as a number, got \"x\""),
        (lambda d: d["checkpoints"][1].pop("kind"), "checkpoints[1].kind: field required"),
        (lambda d: d["base"]["scores"]["s"]["documents"][0].update(tokens=[2]), "base.scores.s.documents[0].tokens: input should be a valid integer, got [2]"),
        (lambda d: d.update(suites={"s": 1}), "suites: input should be a valid list, got {\"s\": 1}"),
    ],
)
def test_a_broken_document_is_refused_with_its_field_path(tmp_path, breakage, expected):
    """One message with the path to the bad field (not `malformed (KeyError(...))`), exit 2 through the CLI."""
    from click.testing import CliRunner

    from gate.cli import main

    path = tmp_path / "results.json"
    write_results(path, make_results())
    document = json.loads(path.read_text())
    breakage(document)
    path.write_text(json.dumps(document))
    with pytest.raises(GateError) as err:
        read_results(path)
    assert str(err.value) == f"{path}: {expected}; re-run `gate run` to rewrite it"
    result = CliRunner().invoke(main, ["export", str(tmp_path)])
    assert result.exit_code == 2 and f"error: {path}: {expected}" in result.output
    assert "Traceback" not in result.output


def test_field_paths_read_as_written():
    from gate.results import field_path

    assert field_path(("checkpoints", 2, "scores", "known-good", "documents", 4, "nll")) == "checkpoints[2].scores.known-good.documents[4].nll"
    assert field_path((3,)) == "[3]"
    assert field_path(()) == "(the document)"
