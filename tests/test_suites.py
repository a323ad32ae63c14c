"""Suite files: the three document shapes, stable ids, and one clear message for every bad line."""

from __future__ import annotations

import pytest

from conftest import write_jsonl
from gate.errors import SuiteError
from gate.suites import builtin_entries, builtin_suites_dir, load_suite


def test_three_shapes_and_blank_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"text": "One."}\n\n   \n{"id": 7, "prompt": "Q", "completion": " A"}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    )
    suite = load_suite("s", path)
    assert [d.shape for d in suite.documents] == ["text", "prompt", "messages"]
    assert suite.documents[1].id == "7"
    assert [d.line for d in suite.documents] == [1, 4, 5]


def test_ids_are_content_hashes_stable_under_reordering(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}, {"text": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}, {"text": "x"}])
    ids_a = [d.id for d in load_suite("a", a).documents]
    ids_b = [d.id for d in load_suite("b", b).documents]
    assert ids_a[0] == ids_b[1] and ids_a[1] == ids_b[0]
    assert ids_a[2] == ids_a[0] + "#2"  # a repeated document keeps its own id


def test_hash_follows_the_bytes_and_options(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "x"}])
    one = load_suite("s", path)
    assert one.identity != load_suite("s", path, chat_template=False).identity
    assert one.identity != load_suite("s", path, limit=1).identity
    path.write_text('{"text": "y"}\n')
    assert load_suite("s", path).data_hash != one.data_hash


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"text": "ok"}\n\xff\xfe\n', "line 2: not UTF-8"),
        (b'{"text": "ok"}\n{"text": \n', "line 2: not valid JSON"),
        (b'["a"]\n', "line 1: must be a JSON object"),
        (b'{"txt": "a"}\n', "unknown key(s) txt"),
        (b'{"text": ""}\n', '"text" is empty'),
        (b'{"text": 3}\n', '"text" must be a string'),
        (b'{"prompt": "p"}\n', 'needs "text", "prompt" + "completion", or "messages"'),
        (b'{"text": "a", "completion": "b"}\n', "use one of text"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "no non-empty assistant turn"),
        (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "id 'a' already used on line 1"),
    ],
)
def test_bad_lines_are_reported_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(SuiteError) as err:
        load_suite("bad", path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_every_bad_line_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": ""}\nnot json\n{"text": "fine"}\n{"x": 1}\n')
    with pytest.raises(SuiteError) as err:
        load_suite("bad", path)
    text = str(err.value)
    assert "3 bad line(s)" in text and "line 1" in text and "line 2" in text and "line 4" in text


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_suite_without_documents(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(SuiteError, match="has no documents"):
        load_suite("empty", path)


def test_missing_file(tmp_path):
    with pytest.raises(SuiteError, match="file not found; fix its path in gate.yaml"):
        load_suite("gone", tmp_path / "gone.jsonl")


def test_builtin_known_good_suite_is_valid_english_text():
    entry = builtin_entries()["known-good"]
    assert entry["type"] == "perplexity"
    suite = load_suite("known-good", builtin_suites_dir() / entry["path"])
    assert len(suite.documents) == 30 and suite.shapes == {"text"}
    assert all(len(d.text.split()) >= 40 for d in suite.documents)


def test_meta_fields_are_kept_for_clustering(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "text": "One.", "meta": {"passage": "p1", "n": 3, "tags": ["x"]}}\n{"id": "b", "text": "Two."}\n')
    a, b = load_suite("s", path).documents
    assert a.meta == {"passage": "p1", "n": "3"} and b.meta == {}
