"""The results store: SQLite under the output folder, keyed by content hashes, atomic, resumable.

One row of ``suite_scores`` is one (model, suite) pair scored under one set of scoring settings;
its key is a hash of the base weights, the checkpoint weights, the suite data, the tokenizer, the
settings and the library versions that change numbers (scores computed under other versions are
never reused nor paired with these). A pair is written in one transaction once fully scored, so a
run killed at any moment leaves only complete rows, and a re-run computes only missing keys.

What the model said (generate suites, lm-eval generation tasks) is kept verbatim in
``item_outputs``, one row per item that has an output, beside the item's numbers in
``item_scores``; stores made before this table existed simply have no outputs.

Drift suites add four tables, written in the same transaction as the score they belong to:
``drift_hidden`` (the exact method: the base's final hidden state per scored token, in the compute
dtype, one row per document: hidden size x 4 bytes per token in float32, x 2 in bfloat16; SmolLM2-135M:
2.2 GB per million tokens in float32), ``drift_references`` (the top-k method: the base's top-k
log-probabilities, token ids and rest mass per scored token, as little-endian float32 / int32 /
float64 blobs, one row per document: 8k + 8 bytes per scored token, 264 MB per million tokens at
k = 32), ``drift_scores`` (a checkpoint's k, kl_p99 and the key
of the base score it was compared with) and ``document_drift`` (per document: kl_sum,
top1_matches and the most drifted tokens as JSON).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from gate.errors import RunFailure, StoreError
from gate.hashing import sha256_json
from gate.results import DocumentScore, Drift, DriftToken, ItemScore, SuiteScore, TaskScore

STORE_NAME = "gate.sqlite"
STORE_SCHEMA = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS suite_scores (
    key TEXT PRIMARY KEY,
    model_hash TEXT NOT NULL,
    suite_identity TEXT NOT NULL,
    identity_json TEXT NOT NULL,
    suite TEXT NOT NULL,
    nll_sum REAL NOT NULL,
    tokens INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    device TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    seconds REAL NOT NULL,
    gate_version TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS document_scores (
    score_key TEXT NOT NULL REFERENCES suite_scores(key) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    nll REAL NOT NULL,
    tokens INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (score_key, position)
);
CREATE TABLE IF NOT EXISTS drift_references (
    score_key TEXT NOT NULL REFERENCES suite_scores(key) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    k INTEGER NOT NULL,
    logprobs BLOB NOT NULL,
    indices BLOB NOT NULL,
    rest BLOB NOT NULL,
    PRIMARY KEY (score_key, position)
);
CREATE TABLE IF NOT EXISTS drift_hidden (
    score_key TEXT NOT NULL REFERENCES suite_scores(key) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    width INTEGER NOT NULL,
    hidden BLOB NOT NULL,
    PRIMARY KEY (score_key, position)
);
CREATE TABLE IF NOT EXISTS drift_scores (
    score_key TEXT PRIMARY KEY REFERENCES suite_scores(key) ON DELETE CASCADE,
    k INTEGER NOT NULL,
    kl_p99 REAL NOT NULL,
    reference_key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS document_drift (
    score_key TEXT NOT NULL REFERENCES suite_scores(key) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    kl_sum REAL NOT NULL,
    top1_matches INTEGER NOT NULL,
    drifted_json TEXT NOT NULL,
    PRIMARY KEY (score_key, position)
);
CREATE TABLE IF NOT EXISTS task_scores (
    key TEXT PRIMARY KEY,
    model_hash TEXT NOT NULL,
    suite_identity TEXT NOT NULL,
    identity_json TEXT NOT NULL,
    suite TEXT NOT NULL,
    score_json TEXT NOT NULL,
    device TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    seconds REAL NOT NULL,
    gate_version TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS item_scores (
    score_key TEXT NOT NULL REFERENCES task_scores(key) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    values_json TEXT NOT NULL,
    excerpt TEXT NOT NULL,
    PRIMARY KEY (score_key, position)
);
CREATE TABLE IF NOT EXISTS item_outputs (
    score_key TEXT NOT NULL REFERENCES task_scores(key) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    output_json TEXT NOT NULL,
    PRIMARY KEY (score_key, position)
);
"""


@dataclass
class ScoreIdentity:
    """Everything that determines a (model, suite) score; its hash is the store key."""

    base_hash: str | None
    """sha256 of the base weights (None for a full checkpoint, which stands alone)."""
    model_hash: str
    """sha256 of the weights scored: the base's, an adapter's, or a full checkpoint's."""
    tokenizer_hash: str
    """sha256 of the tokenizer files used."""
    suite_identity: str
    """Suite data hash plus the suite options that change numbers."""
    settings: dict
    """Scoring settings that change numbers (dtype, max_length, stride, scoring version)."""
    versions: dict = field(default_factory=dict)
    """Versions of the libraries that compute the numbers: torch, transformers and tokenizers
    always; peft for adapters; lm_eval for lm-eval suites."""

    @property
    def key(self) -> str:
        return sha256_json(self.as_json())

    def as_json(self) -> dict:
        return {
            "base": self.base_hash,
            "model": self.model_hash,
            "tokenizer": self.tokenizer_hash,
            "suite": self.suite_identity,
            "settings": self.settings,
            "versions": self.versions,
        }


@dataclass
class StoredReference:
    """One document's drift reference as stored: the base's top-k at each scored token."""

    k: int
    """Top-k size."""
    logprobs: bytes
    """(tokens, k) float32, little-endian: the base's k largest log-probabilities, descending."""
    indices: bytes
    """(tokens, k) int32, little-endian: their token ids."""
    rest: bytes
    """(tokens,) float64, little-endian: the base's probability mass outside its top k."""


@dataclass
class StoredHidden:
    """One document's exact drift reference as stored: the base's final hidden state at each scored token."""

    dtype: str
    """torch dtype name of the values (the compute dtype): "float32", "bfloat16", "float16"."""
    width: int
    """Hidden size (values per token)."""
    hidden: bytes
    """(tokens, width) values, in the machine's byte order (little-endian everywhere gate runs)."""


@dataclass
class ScoreProvenance:
    """How a stored score was computed (kept for the report; not part of the key)."""

    device: str
    """Device it ran on."""
    batch_size: int
    """Batch size actually used (after any out-of-memory backoff)."""
    seconds: float
    """Wall time of the scoring."""
    gate_version: str
    """gate version that computed it."""


class ResultsStore:
    """SQLite store of per-document scores. Safe for concurrent readers and writers (WAL)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except (sqlite3.DatabaseError, OSError) as err:  # OSError: the lock file beside it
            raise RunFailure(
                f"{self.path}: the results store cannot be opened ({err}); if the disk is full, free space and run "
                "again (nothing is lost); if the file is damaged, move it aside to start a fresh one (its scores "
                "are then recomputed)"
            ) from None

    def _open(self, wait: float = 60.0) -> None:
        # Two runs on one output folder may create the store at the same moment, and SQLite does
        # not always wait for a lock while a new file is switched to WAL and its tables made: the
        # set-up is serialised by an advisory lock on a file beside the store. timeout: later
        # writers wait for each other's transactions.
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._conn = sqlite3.connect(self.path, timeout=wait, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)  # idempotent; executescript manages its own commit
            with self._transaction():
                self._check_version()

    def _transaction(self):
        return _Transaction(self._conn)

    def _check_version(self) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(STORE_SCHEMA),))
        elif row[0] in ("2", "3"):
            # 2 -> 3 added the drift tables, 3 -> 4 drift_hidden (created above): every stored score stays valid.
            self._conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(STORE_SCHEMA),))
        elif row[0] != str(STORE_SCHEMA):
            raise RunFailure(
                f"{self.path}: store schema {row[0]} is not {STORE_SCHEMA}; it was made by another gate "
                "version: use another --out folder or move this file aside"
            )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def has(self, key: str) -> bool:
        """Whether a score (perplexity or lm-eval) is stored under this key."""
        for table in ("suite_scores", "task_scores"):
            if self._conn.execute(f"SELECT 1 FROM {table} WHERE key=?", (key,)).fetchone() is not None:
                return True
        return False

    def other_versions(self, identity: ScoreIdentity) -> list[dict]:
        """Library versions of stored scores that match ``identity`` in everything but them.

        A score stored without versions (an older gate) reports ``{}``.
        """
        wanted = {k: v for k, v in identity.as_json().items() if k != "versions"}
        found = []
        for table in ("suite_scores", "task_scores"):
            for (text,) in self._conn.execute(
                f"SELECT identity_json FROM {table} WHERE model_hash=? AND suite_identity=?",
                (identity.model_hash, identity.suite_identity),
            ):
                stored = json.loads(text)
                versions = stored.pop("versions", {})
                if stored == wanted and versions != identity.versions:
                    found.append(versions)
        return found

    def _versions(self, table: str, key: str) -> dict:
        row = self._conn.execute(f"SELECT identity_json FROM {table} WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]).get("versions", {}) if row else {}

    def get(self, key: str) -> SuiteScore | None:
        row = self._conn.execute("SELECT suite FROM suite_scores WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        docs = [
            DocumentScore(id=doc_id, nll=nll, tokens=tokens, bytes=nbytes)
            for doc_id, nll, tokens, nbytes in self._conn.execute(
                "SELECT doc_id, nll, tokens, bytes FROM document_scores WHERE score_key=? ORDER BY position",
                (key,),
            )
        ]
        found = self._conn.execute("SELECT k, kl_p99 FROM drift_scores WHERE score_key=?", (key,)).fetchone()
        drift = None
        if found is not None:
            drift = Drift(k=found[0], kl_p99=found[1])
            rows = self._conn.execute(
                "SELECT kl_sum, top1_matches, drifted_json FROM document_drift WHERE score_key=? ORDER BY position", (key,)
            )
            for doc, (kl_sum, matches, drifted) in zip(docs, rows):
                doc.kl_sum, doc.top1_matches = kl_sum, matches
                doc.drifted = [DriftToken(**t) for t in json.loads(drifted)]
        score = SuiteScore.from_documents(row[0], docs, drift)
        score.libraries = self._versions("suite_scores", key)
        return score

    def get_reference(self, key: str) -> list[StoredReference] | list[StoredHidden] | None:
        """The drift reference stored with the base's score under this key (per document), or None."""
        rows = self._conn.execute(
            "SELECT k, logprobs, indices, rest FROM drift_references WHERE score_key=? ORDER BY position", (key,)
        ).fetchall()
        if rows:
            return [StoredReference(*r) for r in rows]
        rows = self._conn.execute("SELECT dtype, width, hidden FROM drift_hidden WHERE score_key=? ORDER BY position", (key,)).fetchall()
        return [StoredHidden(*r) for r in rows] or None

    def put(
        self,
        identity: ScoreIdentity,
        score: SuiteScore,
        provenance: ScoreProvenance,
        reference: list[StoredReference] | list[StoredHidden] | None = None,
        reference_key: str | None = None,
    ) -> None:
        """Store one complete (model, perplexity suite) score in a single transaction.

        ``reference``: the base's drift reference (one per document); ``reference_key``: for a
        checkpoint's drift, the key of the base score it was compared with.
        """
        key = identity.key
        extra = []
        if reference is not None and all(isinstance(r, StoredHidden) for r in reference):
            extra.append(("drift_hidden", [(key, i, r.dtype, r.width, r.hidden) for i, r in enumerate(reference)]))
        elif reference is not None:
            extra.append(("drift_references", [(key, i, r.k, r.logprobs, r.indices, r.rest) for i, r in enumerate(reference)]))
        if score.drift is not None:
            extra.append(("drift_scores", [(key, score.drift.k, score.drift.kl_p99, reference_key or "")]))
            extra.append(
                (
                    "document_drift",
                    [(key, i, d.kl_sum, d.top1_matches, json.dumps([vars(t) for t in d.drifted])) for i, d in enumerate(score.documents)],
                )
            )
        self._replace(
            "suite_scores",
            identity,
            score.suite,
            (score.nll_sum, score.tokens, score.bytes),
            provenance,
            "document_scores",
            [(key, i, d.id, d.nll, d.tokens, d.bytes) for i, d in enumerate(score.documents)],
            extra,
        )

    def put_task(self, identity: ScoreIdentity, score: TaskScore, provenance: ScoreProvenance) -> None:
        """Store one complete (model, lm-eval suite) score in a single transaction."""
        key = identity.key
        header = {k: v for k, v in score.to_json().items() if k != "items"}
        self._replace(
            "task_scores",
            identity,
            score.suite,
            (json.dumps(header),),
            provenance,
            "item_scores",
            [(key, i, it.id, it.prompt_hash, json.dumps(it.values), it.excerpt) for i, it in enumerate(score.items)],
            [("item_outputs", [(key, i, json.dumps(it.output)) for i, it in enumerate(score.items) if it.output is not None])],
        )

    def _replace(self, table, identity, suite, values: tuple, provenance, detail_table, detail_rows, extra=()) -> None:
        """(Re)write one score row and its per-item rows atomically; a crash leaves the old state."""
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        key = identity.key
        row = (
            key,
            identity.model_hash,
            identity.suite_identity,
            json.dumps(identity.as_json(), sort_keys=True),
            suite,
            *values,
            provenance.device,
            provenance.batch_size,
            provenance.seconds,
            provenance.gate_version,
            now,
        )
        try:
            with self._transaction():
                self._conn.execute(f"DELETE FROM {table} WHERE key=?", (key,))
                self._conn.execute(f"INSERT INTO {table} VALUES ({','.join('?' * len(row))})", row)
                for name, rows in ((detail_table, detail_rows), *extra):
                    if rows:
                        marks = ",".join("?" * len(rows[0]))
                        self._conn.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)
        except sqlite3.OperationalError as err:
            # The transaction rolled back: every score stored before this one is intact.
            raise StoreError(
                f"{self.path}: cannot store the score of suite {suite!r} ({err}); free disk space and run the "
                "same command again: every score finished so far is kept"
            ) from None

    def get_task(self, key: str) -> TaskScore | None:
        row = self._conn.execute("SELECT score_json FROM task_scores WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        items = [
            ItemScore(id=doc_id, prompt_hash=prompt_hash, values=json.loads(values), excerpt=excerpt)
            for doc_id, prompt_hash, values, excerpt in self._conn.execute(
                "SELECT doc_id, prompt_hash, values_json, excerpt FROM item_scores WHERE score_key=? ORDER BY position",
                (key,),
            )
        ]
        for position, output in self._conn.execute(
            "SELECT position, output_json FROM item_outputs WHERE score_key=? ORDER BY position", (key,)
        ):
            items[position].output = json.loads(output)
        return TaskScore(**{**json.loads(row[0]), "items": items, "libraries": self._versions("task_scores", key)})

    _TABLES = (("suite_scores", "document_scores"), ("task_scores", "item_scores"))
    _DETAILS = {
        "suite_scores": ("document_scores", "drift_references", "drift_hidden", "drift_scores", "document_drift"),
        "task_scores": ("item_scores", "item_outputs"),
    }

    def keys(self) -> set[str]:
        """Every stored score's key."""
        return {k for table, _ in self._TABLES for (k,) in self._conn.execute(f"SELECT key FROM {table}")}

    def export(self, keys: set[str]) -> dict[str, list[tuple]]:
        """The raw rows of these scores, to carry them to another store (distributed workers, merge)."""
        dump: dict[str, list[tuple]] = {}
        marks = ",".join("?" * len(keys))
        for table, details in self._DETAILS.items():
            dump[table] = self._conn.execute(f"SELECT * FROM {table} WHERE key IN ({marks})", tuple(keys)).fetchall()
            for detail in details:
                dump[detail] = self._conn.execute(
                    f"SELECT * FROM {detail} WHERE score_key IN ({marks}) ORDER BY score_key", tuple(keys)
                ).fetchall()
        return dump

    def import_rows(self, dump: dict[str, list[tuple]]) -> int:
        """Write exported rows in one transaction (replacing equal keys); returns how many scores."""
        with self._transaction():
            for table, details in self._DETAILS.items():
                for row in dump.get(table, []):
                    self._conn.execute(f"DELETE FROM {table} WHERE key=?", (row[0],))
                    self._conn.execute(f"INSERT INTO {table} VALUES ({','.join('?' * len(row))})", row)
                for detail in details:
                    for row in dump.get(detail, []):
                        self._conn.execute(f"INSERT INTO {detail} VALUES ({','.join('?' * len(row))})", row)
        return sum(len(dump.get(table, [])) for table, _ in self._TABLES)

    def count(self) -> int:
        """Number of stored (model, suite) scores of both kinds."""
        return sum(self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("suite_scores", "task_scores"))

    @property
    def hash_cache(self) -> _FileHashCache:
        return _FileHashCache(self._conn)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (Ctrl-C included)."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            self._conn.execute("ROLLBACK")


class _FileHashCache:
    """gate.hashing.HashCache backed by the store, so unchanged weights are not re-hashed."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def get(self, path: str, size: int, mtime_ns: int) -> str | None:
        row = self._conn.execute("SELECT sha256 FROM file_hashes WHERE path=? AND size=? AND mtime_ns=?", (path, size, mtime_ns)).fetchone()
        return row[0] if row else None

    def put(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO file_hashes VALUES (?,?,?,?)", (path, size, mtime_ns, sha256))
