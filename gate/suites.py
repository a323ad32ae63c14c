"""Reads perplexity suite data (JSONL, one document per line) and hashes it.

Three document shapes, one per line:

* ``{"text": ...}``: every token of the text is scored;
* ``{"prompt": ..., "completion": ...}``: only the completion's tokens are scored, given the prompt;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: the chat template is applied and the
  assistant turns are scored.

An optional ``"id"`` names the document; without one, the id is a hash of the document's content,
so ids stay stable when lines are added, removed or reordered (the policy pairs documents by id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gate.errors import SuiteError
from gate.hashing import sha256_bytes, sha256_json
from gate.kinds import DocumentShape

ALLOWED_KEYS = {"id", "text", "prompt", "completion", "messages", "meta"}
MAX_REPORTED_PROBLEMS = 20


@dataclass
class Document:
    """One scored document of a perplexity suite."""

    id: str
    """Stable identifier: the line's ``id``, else ``h:`` + a hash of the content."""
    shape: DocumentShape
    """``text``, ``prompt`` (prompt + completion) or ``messages``."""
    text: str | None = None
    """The whole text, for shape ``text``."""
    prompt: str | None = None
    """The unscored context, for shape ``prompt``."""
    completion: str | None = None
    """The scored continuation, for shape ``prompt``."""
    messages: list[dict] | None = None
    """Chat turns ``{"role", "content"}``, for shape ``messages``; assistant turns are scored."""
    line: int = 0
    """1-based line number in the suite file, for messages that point at the data."""
    meta: dict[str, str] = field(default_factory=dict)
    """The line's ``meta`` object, scalar fields as text: what a gate's ``cluster:`` may group by."""

    def excerpt(self, limit: int = 240) -> str:
        """A short text for reports: the text, the prompt and completion, or the conversation."""
        if self.shape == "text":
            full = self.text
        elif self.shape == "prompt":
            full = f"{self.prompt} ⟶ {self.completion}"
        else:
            full = " | ".join(f"{m['role']}: {m['content']}" for m in self.messages)
        return full if len(full) <= limit else full[: limit - 1] + "…"


@dataclass
class Suite:
    """A perplexity suite: its documents and the identity that results are keyed by."""

    name: str
    """Name from gate.yaml; results and policy refer to the suite by it."""
    path: str
    """Absolute path of the JSONL file."""
    documents: list[Document]
    """The usable documents, in file order."""
    data_hash: str
    """sha256 of the file's bytes."""
    chat_template: bool = True
    """Whether prompt/completion documents go through the tokenizer's chat template."""
    options: dict = field(default_factory=dict)
    """Options that change what is scored; part of the suite's identity."""

    @property
    def identity(self) -> str:
        """Hash of everything about the suite that changes its numbers."""
        return sha256_json({"data": self.data_hash, "chat_template": self.chat_template, **self.options})

    @property
    def drift_k(self) -> int | None:
        """Top-k size of the drift reference; None when drift is off for this suite."""
        return self.options.get("drift_k")

    @property
    def shapes(self) -> set[str]:
        return {d.shape for d in self.documents}


def builtin_suites_dir() -> Path:
    """Folder of the suites shipped with gate (source checkout or installed wheel)."""
    here = Path(__file__).resolve().parent
    # The installed wheel's copy first: a stray top-level "suites" folder must not shadow it.
    for candidate in (here / "_builtin_suites", here.parent / "suites"):
        if candidate.is_dir():
            return candidate
    return here.parent / "suites"


def builtin_entries() -> dict[str, dict]:
    """Built-in suites by name (suites/builtin.yaml): gate.yaml entries, paths relative to suites/."""
    import yaml

    path = builtin_suites_dir() / "builtin.yaml"
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {name: {"name": name, **entry} for name, entry in (entries or {}).items()}


def load_suite(
    name: str,
    path: str | Path,
    *,
    chat_template: bool = True,
    limit: int | None = None,
    drift_k: int | None = None,
) -> Suite:
    """Read and validate a JSONL suite. Raises SuiteError listing every bad line at once.

    ``drift_k``: also measure each checkpoint's drift from the base: 0 the exact method, k >= 1 a top-k reference of this size.
    """
    path = Path(path)
    raw, documents = read_jsonl_items(path, f"suite {name!r}", _parse_line, lambda d: [d.text, d.prompt, d.completion, d.messages])
    if not documents:
        raise SuiteError(
            f'{path}: suite {name!r} has no documents; write one JSON object per line with "text", "prompt" + "completion", or "messages"'
        )
    options = {}
    if limit is not None:
        documents = documents[:limit]
        options["limit"] = limit
    if drift_k is not None:
        options["drift_k"] = drift_k  # the base's stored reference depends on it (method, k): part of the identity
    return Suite(
        name=name,
        path=str(path.resolve()),
        documents=documents,
        data_hash=sha256_bytes(raw),
        chat_template=chat_template,
        options=options,
    )


def json_line(line: str, allowed: set[str]) -> tuple[dict, str | None]:
    """One JSONL line of a data file -> (its object, its "id" as a string or None); ValueError with what to fix.

    Shared by every JSONL format gate reads (perplexity documents, generation probes).
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("must be a JSON object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    item_id = obj.get("id")
    if item_id is not None and not isinstance(item_id, (str, int)):
        raise ValueError(f'"id" must be a string or an integer, not {type(item_id).__name__}')
    return obj, None if item_id is None else str(item_id)


def _parse_line(line: str, number: int) -> Document:
    obj, doc_id = json_line(line, ALLOWED_KEYS)
    document = _shape(obj, doc_id, number)
    meta = obj.get("meta")
    if isinstance(meta, dict):
        document.meta = {str(k): str(v) for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
    return document


def _shape(obj: dict, doc_id: str | None, number: int) -> Document:
    if "text" in obj:
        if {"prompt", "completion", "messages"} & set(obj):
            raise ValueError('has "text" and another shape; use one of text, prompt+completion, messages')
        return Document(id=doc_id, shape="text", text=_nonempty(obj, "text"), line=number)
    if "messages" in obj:
        if {"prompt", "completion"} & set(obj):
            raise ValueError('has "messages" and "prompt"/"completion"; use one shape per line')
        return Document(id=doc_id, shape="messages", messages=_messages(obj["messages"]), line=number)
    if "completion" in obj:
        prompt = obj.get("prompt", "")
        if not isinstance(prompt, str):
            raise ValueError('"prompt" must be a string')
        return Document(id=doc_id, shape="prompt", prompt=prompt, completion=_nonempty(obj, "completion"), line=number)
    raise ValueError('needs "text", "prompt" + "completion", or "messages"')


def _nonempty(obj: dict, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, not {type(value).__name__}')
    if not value.strip():
        raise ValueError(f'"{key}" is empty; there is nothing to score')
    return value


def _messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise ValueError(f'messages[{i}] must be an object with string "role" and "content"')
    if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        raise ValueError("has no non-empty assistant turn; there is nothing to score")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_jsonl_items(path: Path, what: str, parse, content) -> tuple[bytes, list]:
    """The items of a JSONL data file, one per non-blank line, and its raw bytes (for its hash).

    ``parse(line, number)`` makes an item (with ``id`` and ``line``) or raises ValueError saying
    what to fix; ``content(item)`` is what an unnamed item's id hashes. Every bad line is reported
    at once in one SuiteError naming the file (``what``: "suite 'x'", "generate suite 'x'").
    Shared by perplexity documents and generation probes.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SuiteError(f"{path}: {what} file not found; fix its path in gate.yaml") from None
    except OSError as err:
        raise SuiteError(f"{path}: {what} cannot be read ({err.strerror})") from None
    items: list = []
    problems: list[str] = []
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"line {number}: not UTF-8 ({err.reason} at byte {err.start}); re-save the file as UTF-8")
            continue
        if not line.strip():
            continue  # blank lines separate nothing and hold nothing: skip them
        try:
            items.append(parse(line, number))
        except ValueError as err:
            problems.append(f"line {number}: {err}")
    problems += _assign_ids(items, content)
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        listing = "\n".join(f"  - {p}" for p in shown)
        raise SuiteError(f"{path}: {what} has {len(problems)} bad line(s):\n{listing}{tail}")
    return raw, items


def _assign_ids(items: list, content) -> list[str]:
    """Give unnamed items a content-hash id; report duplicate explicit ids."""
    problems = []
    seen: dict[str, int] = {}
    for item in items:
        if item.id is not None:
            if item.id in seen:
                problems.append(f"line {item.line}: id {item.id!r} already used on line {seen[item.id]}; ids must be unique")
            seen.setdefault(item.id, item.line)
    occurrences: dict[str, int] = {}
    for item in items:
        if item.id is not None:
            continue
        digest = sha256_json(content(item))[:16]
        occurrences[digest] = occurrences.get(digest, 0) + 1
        n = occurrences[digest]
        # Identical items are legitimate (repeated boilerplate); number the repeats.
        item.id = f"h:{digest}" if n == 1 else f"h:{digest}#{n}"
    return problems
