"""Contamination check: word n-gram overlap between a suite's documents and a training file.

A held-out "known good" set only measures forgetting if the model never trained on it. For each
document, with words = lower-cased runs of letters and digits (``\\w+``) and ``n`` consecutive
words an n-gram (n = 8 by default),

    share(d) = |ngrams(d) ∩ ngrams(training)| / |ngrams(d)|

and a document is **contaminated** when ``share(d) > 0``: it repeats at least n consecutive words
of the training data. N-grams never span two fields (prompt and completion, two chat turns, two
training rows), and a segment shorter than n words contributes none. This is the n-gram test of
GPT-3's contamination study (which used n = 13 on web-scale data; 8 suits short documents).

Training files: JSONL in any of the suite shapes (``text``, ``prompt``/``completion``,
``messages``); other JSONL rows contribute all their string values; any other file is read as
plain text. No torch, no model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from gate.errors import SuiteError
from gate.hashing import sha256_file
from gate.suites import Document, Suite, load_suite

DEFAULT_N = 8
WORD = re.compile(r"\w+")


@dataclass
class Overlap:
    """How much of one suite repeats one training file."""

    suite: str
    """Suite name."""
    training_file: str
    """The training file, as given."""
    training_hash: str
    """sha256 of the training file."""
    n: int
    """Words per n-gram."""
    documents: int
    """Documents checked."""
    contaminated: dict[str, float] = field(default_factory=dict)
    """Document id -> share of its n-grams found in the training file, for every document with a share > 0."""

    @property
    def clean(self) -> bool:
        """True when no document shares an n-gram with the training file."""
        return not self.contaminated

    def summary(self) -> str:
        name = Path(self.training_file).name
        if self.clean:
            return f"{self.suite}: none of {self.documents} documents shares {self.n} consecutive words with {name}"
        worst = max(self.contaminated.values())
        return (
            f"{self.suite}: {len(self.contaminated)} of {self.documents} documents share {self.n} consecutive words with "
            f"{name} (up to {worst:.0%} of a document's {self.n}-grams)"
        )

    def worst(self, limit: int) -> list[tuple[str, float]]:
        """The ``limit`` most contaminated documents: (id, share), highest share first."""
        return sorted(self.contaminated.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]

    @classmethod
    def from_json(cls, obj: dict) -> Overlap:
        return cls(**obj)


@dataclass
class TrainingIndex:
    """The n-grams of one training file, read and hashed once for every suite checked against it."""

    path: str
    """The training file, as given."""
    sha256: str
    """sha256 of its bytes."""
    n: int
    """Words per n-gram."""
    grams: set[tuple[str, ...]]
    """Every word n-gram of the file."""


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of one segment (empty when it has fewer than n words)."""
    words = WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def document_segments(doc: Document) -> list[str]:
    """The separately tokenized fields of a suite document."""
    if doc.shape == "text":
        return [doc.text or ""]
    if doc.shape == "prompt":
        return [doc.prompt or "", doc.completion or ""]
    return [str(m.get("content", "")) for m in doc.messages or []]


def suite_segments(suite: Suite) -> dict[str, list[str]]:
    """Document id -> segments, for a loaded suite."""
    return {d.id: document_segments(d) for d in suite.documents}


def _read_text(path: Path, what: str, fix: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(f"{path}: {what} not found; {fix}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SuiteError(f"{path}: cannot be read as UTF-8 text ({err}); give a JSONL or plain-text file") from None


def _jsonl_rows(path: Path, raw: str, fix: str):
    """(line number, parsed row) of every non-blank line; a bad line is an error naming it."""
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise SuiteError(f"{path}:{number}: not valid JSON ({err.msg}); {fix}") from None


def training_segments(path: str | Path) -> list[str]:
    """Every text field of a training file (JSONL rows in any shape, else the whole file as text)."""
    path = Path(path)
    raw = _read_text(path, "training file", "give the path of the data the checkpoints were trained on")
    if path.suffix.lower() not in {".jsonl", ".json", ".ndjson"}:
        return raw.splitlines()
    fix = "fix the line or give a plain-text file"
    return [segment for _, row in _jsonl_rows(path, raw, fix) for segment in _strings(row)]


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        if "messages" in value and isinstance(value["messages"], list):
            return [str(m.get("content", "")) for m in value["messages"] if isinstance(m, dict)]
        return [s for k, v in value.items() if k not in {"id", "meta"} for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def index_training_file(path: str | Path, n: int = DEFAULT_N) -> TrainingIndex:
    """Read a training file once: its hash and all its word n-grams."""
    if n < 1:
        raise SuiteError(f"n-gram length must be at least 1, got {n}")
    grams: set[tuple[str, ...]] = set()
    for segment in training_segments(path):
        grams |= ngrams(segment, n)
    return TrainingIndex(path=str(path), sha256=sha256_file(Path(path)), n=n, grams=grams)


def suite_file_segments(path: str | Path) -> dict[str, list[str]]:
    """Document id -> segments of any JSONL file: a perplexity suite, or rows of other shapes
    (an lm-eval task's data file: every string value of a row; the id is the row's ``id`` or its line)."""
    try:
        return suite_segments(load_suite(Path(path).stem, path))
    except SuiteError:
        pass
    path = Path(path)
    out: dict[str, list[str]] = {}
    for number, row in _jsonl_rows(
        path, _read_text(path, "suite file", "give an existing JSONL file"), "give a JSONL file, one document per line"
    ):
        key = str(row.get("id", f"line-{number}")) if isinstance(row, dict) else f"line-{number}"
        out[key] = _strings(row)
    if not out:
        raise SuiteError(f"{path}: no documents; give a JSONL file, one document per line")
    return out


def overlap(suite: str, documents: dict[str, list[str]], training: TrainingIndex) -> Overlap:
    """Check one suite (document id -> its segments) against one indexed training file."""
    result = Overlap(suite=suite, training_file=training.path, training_hash=training.sha256, n=training.n, documents=len(documents))
    for doc_id, segments in documents.items():
        own = set().union(*(ngrams(s, training.n) for s in segments))
        shared = len(own & training.grams)
        if shared:
            result.contaminated[doc_id] = shared / len(own)
    return result
