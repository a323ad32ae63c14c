"""The SQLite results store: exact round trips, content keys, atomic writes, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from gate.errors import RunFailure
from gate.results import DocumentScore, Drift, DriftToken, SuiteScore
from gate.store import STORE_SCHEMA, ResultsStore, ScoreIdentity, ScoreProvenance, StoredHidden, StoredReference

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
    with pytest.raises(RunFailure, match=f"store schema 99 is not {STORE_SCHEMA}"):
        ResultsStore(path)


def drift_score() -> SuiteScore:
    docs = [
        DocumentScore(
            f"d{i}", nll=1.5 + i, tokens=i + 2, bytes=9, kl_sum=0.1 * i + 1 / 7, top1_matches=i + 1,
            drifted=[DriftToken(index=i, kl=0.25, before="The <b>", token=" cat", after=".", base_top=" dog", checkpoint_top=" cat")],
        )
        for i in range(3)
    ]
    return SuiteScore.from_documents("s", docs, Drift(k=4, kl_p99=0.75))


def test_drift_round_trip_is_exact_and_travels_with_export(tmp_path):
    reference = [StoredReference(4, bytes(range(16)) * (i + 2), bytes(16) * (i + 2), b"\x01" * 8 * (i + 2)) for i in range(3)]
    with ResultsStore(tmp_path / "a.sqlite") as store:
        store.put(identity(model_hash="base"), score(), PROVENANCE, reference=reference)
        store.put(identity(), drift_score(), PROVENANCE, reference_key=identity(model_hash="base").key)
        assert store.get(identity().key) == drift_score()
        assert store.get(identity(model_hash="base").key) == score()  # the base's score carries no drift
        assert store.get_reference(identity(model_hash="base").key) == reference
        assert store.get_reference(identity().key) is None
        dump = store.export(store.keys())
    with ResultsStore(tmp_path / "b.sqlite") as other:
        assert other.import_rows(dump) == 2
        assert other.get(identity().key) == drift_score()
        assert other.get_reference(identity(model_hash="base").key) == reference
        other.put(identity(), score(), PROVENANCE)  # rewritten without drift: its drift rows go with the old row
        assert other.get(identity().key) == score()


def test_store_of_schema_2_gains_the_drift_tables_and_keeps_its_scores(tmp_path):
    path = tmp_path / "gate.sqlite"
    with ResultsStore(path) as store:
        store.put(identity(), score(), PROVENANCE)
    conn = sqlite3.connect(path)
    for table in ("drift_references", "drift_scores", "document_drift"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("UPDATE meta SET value='2' WHERE key='schema'")
    conn.commit()
    conn.close()
    with ResultsStore(path) as store:
        assert store.get(identity().key) == score()
        store.put(identity(model_hash="m2"), drift_score(), PROVENANCE)
        assert store.get(identity(model_hash="m2").key) == drift_score()
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (str(STORE_SCHEMA),)


def test_exact_references_round_trip_and_travel_with_export(tmp_path):
    hidden = [StoredHidden("bfloat16", 3, bytes(range(6 * (i + 1)))) for i in range(2)]
    with ResultsStore(tmp_path / "a.sqlite") as store:
        store.put(identity(model_hash="base"), score(), PROVENANCE, reference=hidden)
        assert store.get_reference(identity(model_hash="base").key) == hidden
        dump = store.export(store.keys())
    with ResultsStore(tmp_path / "b.sqlite") as other:
        other.import_rows(dump)
        assert other.get_reference(identity(model_hash="base").key) == hidden
        other.put(identity(model_hash="base"), score(), PROVENANCE)  # rewritten without: the hidden rows go
        assert other.get_reference(identity(model_hash="base").key) is None


def test_store_of_schema_3_gains_drift_hidden_and_keeps_its_drift(tmp_path):
    path = tmp_path / "gate.sqlite"
    reference = [StoredReference(4, bytes(16) * 2, bytes(16) * 2, bytes(8) * 2) for _ in range(3)]
    with ResultsStore(path) as store:
        store.put(identity(model_hash="base"), score(), PROVENANCE, reference=reference)
        store.put(identity(), drift_score(), PROVENANCE, reference_key=identity(model_hash="base").key)
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE drift_hidden")
    conn.execute("UPDATE meta SET value='3' WHERE key='schema'")
    conn.commit()
    conn.close()
    with ResultsStore(path) as store:
        assert store.get(identity().key) == drift_score()
        assert store.get_reference(identity(model_hash="base").key) == reference
        store.put(identity(model_hash="m2"), score(), PROVENANCE, reference=[StoredHidden("float32", 1, bytes(4))])
        assert store.get_reference(identity(model_hash="m2").key) == [StoredHidden("float32", 1, bytes(4))]
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("4",)
