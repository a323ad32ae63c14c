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
from gate.suites import Document, load_suite

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

    @classmethod
    def from_json(cls, obj: dict) -> Overlap:
        return cls(**obj)


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


def training_segments(path: str | Path) -> list[str]:
    """Every text field of a training file (JSONL rows in any shape, else the whole file as text)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(f"{path}: training file not found; give the path of the data the checkpoints were trained on") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SuiteError(f"{path}: cannot be read as UTF-8 text ({err}); give a JSONL or plain-text training file") from None
    if path.suffix.lower() not in {".jsonl", ".json", ".ndjson"}:
        return raw.splitlines()
    segments: list[str] = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise SuiteError(f"{path}:{number}: not valid JSON ({err.msg}); fix the line or give a plain-text file") from None
        segments += _strings(row)
    return segments


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


def training_ngrams(path: str | Path, n: int = DEFAULT_N) -> set[tuple[str, ...]]:
    """All word n-grams of a training file."""
    grams: set[tuple[str, ...]] = set()
    for segment in training_segments(path):
        grams |= ngrams(segment, n)
    return grams


def suite_file_segments(path: str | Path) -> dict[str, list[str]]:
    """Document id -> segments of any JSONL file: a perplexity suite, or rows of other shapes
    (an lm-eval task's data file: every string value of a row; the id is the row's ``id`` or its line)."""
    try:
        return {d.id: document_segments(d) for d in load_suite(Path(path).stem, path).documents}
    except SuiteError:
        pass
    out: dict[str, list[str]] = {}
    raw = Path(path).read_text(encoding="utf-8")
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as err:
                raise SuiteError(f"{path}:{number}: not valid JSON ({err.msg}); give a JSONL file, one document per line") from None
            key = str(row.get("id", f"line-{number}")) if isinstance(row, dict) else f"line-{number}"
            out[key] = _strings(row)
    if not out:
        raise SuiteError(f"{path}: no documents; give a JSONL file, one document per line")
    return out


def overlap(
    suite: str,
    documents: dict[str, list[str]],
    training_file: str | Path,
    *,
    n: int = DEFAULT_N,
    grams: set[tuple[str, ...]] | None = None,
) -> Overlap:
    """Check one suite (document id -> its segments) against one training file.

    ``grams``: the training file's n-grams, when already computed (one file, many suites)."""
    if n < 1:
        raise SuiteError(f"n-gram length must be at least 1, got {n}")
    grams = training_ngrams(training_file, n) if grams is None else grams
    result = Overlap(
        suite=suite, training_file=str(training_file), training_hash=sha256_file(Path(training_file)), n=n, documents=len(documents)
    )
    for doc_id, segments in documents.items():
        own = set().union(*(ngrams(s, n) for s in segments))
        shared = len(own & grams)
        if shared:
            result.contaminated[doc_id] = shared / len(own)
    return result
