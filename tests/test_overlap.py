"""The contamination check: n-gram overlap between suites and training files (no torch)."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from gate.cli import main
from gate.config import load_config
from gate.errors import ConfigError, SuiteError
from gate.overlap import index_training_file, ngrams, overlap, suite_file_segments, suite_segments, training_segments
from gate.suites import builtin_suites_dir, load_suite


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_ngrams_are_lower_cased_words_within_one_segment():
    assert ngrams("The cat, the HAT.", 2) == {("the", "cat"), ("cat", "the"), ("the", "hat")}
    assert ngrams("too short", 3) == set()
    assert len(ngrams("a b c d e", 3)) == 3  # 5 words -> 3 trigrams


def test_share_is_the_fraction_of_a_documents_ngrams_seen_in_training(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "one two three four"}, {"text": "nine ten"}])
    # doc "a": trigrams (one two three) (two three four) (three four five): 2 of 3 are in training.
    # doc "b": "nine ten eleven" has one trigram, not in training: the rows are not joined.
    # doc "c": its prompt ends "one two" and its completion begins "three": n-grams do not cross fields.
    documents = {"a": ["One two three four five"], "b": ["nine ten eleven"], "c": ["x one two", "three y"]}
    training = index_training_file(train, 3)
    found = overlap("s", documents, training)
    assert found.contaminated == {"a": pytest.approx(2 / 3)}
    assert found.documents == 3 and not found.clean
    assert "1 of 3 documents share 3 consecutive words with train.jsonl (up to 67%" in found.summary()
    assert overlap("s", {"b": ["nine ten eleven"]}, training).clean
    assert training.sha256 == hashlib.sha256(train.read_bytes()).hexdigest() and found.training_hash == training.sha256


def test_training_files_in_every_shape(tmp_path):
    rows = [
        {"text": "plain text row"},
        {"prompt": "a prompt", "completion": "its completion"},
        {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]},
        {"id": "ignored-id", "question": "what is it", "choices": ["this", "that"]},
    ]
    assert training_segments(write_jsonl(tmp_path / "t.jsonl", rows)) == [
        "plain text row", "a prompt", "its completion", "hello there", "general kenobi", "what is it", "this", "that",
    ]
    (tmp_path / "t.txt").write_text("line one here\nline two here\n")
    assert index_training_file(tmp_path / "t.txt", 3).grams == {("line", "one", "here"), ("line", "two", "here")}


def test_bad_training_files_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(SuiteError, match="missing.jsonl: training file not found"):
        training_segments(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(SuiteError, match=r"bad.jsonl:2: not valid JSON"):
        training_segments(tmp_path / "bad.jsonl")


def test_suite_documents_use_every_field(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"id": "p", "prompt": "ask this", "completion": "answer that"},
        {"id": "m", "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ])
    docs = suite_segments(load_suite("s", path))
    assert docs == {"p": ["ask this", "answer that"], "m": ["u", "a"]}
    lm_eval_rows = write_jsonl(tmp_path / "task.jsonl", [{"question": "q one", "choices": ["x", "y"], "answer": 0}])
    assert suite_file_segments(lm_eval_rows) == {"line-1": ["q one", "x", "y"]}


def test_builtin_known_good_is_clean_against_the_demo_training_data_and_a_copied_paragraph_is_caught(tmp_path):
    runner = CliRunner()
    demo_train = builtin_suites_dir() / "demo" / "triage-train.jsonl"
    result = runner.invoke(main, ["overlap", "known-good", str(demo_train)])
    assert result.exit_code == 0, result.output
    assert "✓ known-good: none of 30 documents shares 8 consecutive words with triage-train.jsonl" in result.output

    kitchen = next(d for d in load_suite("kg", builtin_suites_dir() / "known-good.jsonl").documents if d.id == "kitchen")
    sentence = kitchen.text.split(". ")[1]  # one sentence of one paragraph leaks into the training data
    leaky = write_jsonl(tmp_path / "leaky.jsonl", [{"text": "unrelated words here"}, {"text": sentence}])
    result = runner.invoke(main, ["overlap", "known-good", str(demo_train), str(leaky)])
    assert result.exit_code == 1, result.output
    assert "✗ known-good: 1 of 30 documents share 8 consecutive words with leaky.jsonl" in result.output
    assert "    kitchen  " in result.output


def test_overlap_command_bad_input_exits_2_with_the_fix(tmp_path):
    runner = CliRunner()
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    result = runner.invoke(main, ["overlap", "no-such-suite", str(train)])
    assert result.exit_code == 2
    assert "no-such-suite: neither a file nor a suite" in result.output and "known-good" in result.output
    result = runner.invoke(main, ["overlap", "arith", str(train)])
    assert result.exit_code == 2 and "an lm-eval suite; give its data file instead" in result.output
    result = runner.invoke(main, ["overlap", "known-good", str(tmp_path / "nope.txt")])
    assert result.exit_code == 2 and "nope.txt: training file not found" in result.output
    assert "Traceback" not in result.output


def test_contamination_config(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "style.jsonl", [{"text": "y"}])
    (tmp_path / "gate.yaml").write_text(
        "suites:\n  - name: known-good\n  - name: style\n    path: style.jsonl\n"
        "contamination: {training_data: train.jsonl, suites: [known-good]}\n"
    )
    config = load_config(tmp_path / "gate.yaml")
    assert config.contamination.training_data == [str((tmp_path / "train.jsonl").resolve())]
    assert config.contamination.suites == ["known-good"] and config.contamination.n == 8
    (tmp_path / "gate.yaml").write_text(
        "suites:\n  - name: known-good\n  - name: arith\n"
        "contamination: {training_data: [missing.jsonl], suites: [arith], n: 0, extra: 1}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "gate.yaml")
    text = str(err.value)
    assert "contamination.training_data: missing.jsonl: file not found" in text
    assert "contamination.suites: 'arith' is not a perplexity suite" in text
    assert "contamination.n: must be a positive integer" in text
    assert "contamination.extra: unknown key" in text
