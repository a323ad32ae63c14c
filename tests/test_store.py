"""The SQLite results store: exact round trips, content keys, atomic writes, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from gate.errors import RunFailure
from gate.results import DocumentScore, SuiteScore
from gate.store import ResultsStore, ScoreIdentity, ScoreProvenance

PROVENANCE = ScoreProvenance(device="cpu", batch_size=8, seconds=0.1, gate_version="0")


def identity(**changes) -> ScoreIdentity:
    values = dict(base_hash="b", model_hash="m", tokenizer_hash="t", suite_identity="s", settings={"dtype": "float32"})
    values.update(changes)
    return ScoreIdentity(**values)


def score(n: int = 3) -> SuiteScore:
    return SuiteScore.from_documents("s", [DocumentScore(f"d{i}", nll=0.1 * i + 1 / 3, tokens=i + 1, bytes=2 * i + 1) for i in range(n)])


def test_round_trip_is_exact(tmp_path):
    with ResultsStore(tmp_path / "gate.sqlite") as store:
        store.put(identity(), score(), PROVENANCE)
        assert store.get(identity().key) == score()
        assert store.has(identity().key)


@pytest.mark.parametrize(
    "change",
    [
        {"base_hash": "b2"},
        {"model_hash": "m2"},
        {"tokenizer_hash": "t2"},
        {"suite_identity": "s2"},
        {"settings": {"dtype": "bfloat16"}},
    ],
)
def test_every_part_of_the_identity_changes_the_key(change):
    assert identity(**change).key != identity().key


def test_failed_write_leaves_nothing(tmp_path):
    bad = score()
    bad.documents[1].id = object()  # sqlite cannot store it: the insert fails half-way
    with ResultsStore(tmp_path / "gate.sqlite") as store:
        with pytest.raises(sqlite3.Error):
            store.put(identity(), bad, PROVENANCE)
        assert not store.has(identity().key)
        assert store._conn.execute("SELECT COUNT(*) FROM document_scores").fetchone()[0] == 0


def _writer(path, start):
    with ResultsStore(path) as store:
        for i in range(start, start + 20):
            store.put(identity(model_hash=f"m{i}"), score(50), PROVENANCE)


def test_concurrent_writers(tmp_path):
    path = tmp_path / "gate.sqlite"
    ResultsStore(path).close()
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(path, k * 20)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with ResultsStore(path) as store:
        assert store.count() == 40
        assert all(store.get(identity(model_hash=f"m{i}").key) == score(50) for i in range(40))


def test_file_hash_cache(tmp_path):
    with ResultsStore(tmp_path / "gate.sqlite") as store:
        cache = store.hash_cache
        cache.put("/w", 10, 99, "abc")
        assert cache.get("/w", 10, 99) == "abc"
        assert cache.get("/w", 10, 100) is None  # touched since: hash again


def test_corrupt_store_is_a_clear_error(tmp_path):
    path = tmp_path / "gate.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RunFailure, match="cannot be opened .* move it aside"):
        ResultsStore(path)


def test_store_from_another_schema_version(tmp_path):
    path = tmp_path / "gate.sqlite"
    ResultsStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(RunFailure, match="store schema 99 is not 2"):
        ResultsStore(path)
