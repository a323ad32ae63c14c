"""Per-document token log-likelihoods: encoded once per suite, windowed, batched, under inference_mode.

Conventions (part of SCORING_VERSION; changing them changes the store keys):

* ``text`` documents are tokenized without special tokens and preceded by one context token
  (the tokenizer's BOS, else its EOS), so that every token of the text is scored, the first one
  included. This is lm-eval's convention for rolling log-likelihoods.
* ``prompt`` documents: the prompt goes through the chat template as a user turn with the
  generation prompt (when the suite allows it and the tokenizer has a template), else it follows
  the context token as plain text; the completion's tokens are scored.
* ``messages`` documents: the chat template is applied turn by turn; the tokens each assistant
  turn adds to the rendered conversation (its content and end-of-turn marker) are scored.
* A sequence longer than ``max_length`` is scored with a sliding window: the first window scores
  its tokens, each next window moves ``stride`` tokens and scores only the tokens no earlier window
  scored, so every token is scored exactly once and, after the first window, with at least
  ``max_length - stride`` tokens of left context (all of it when stride is 1).

Per document: nll = -sum over scored tokens t of log p(x_t | x_<t), in nats, accumulated in
float64 from float32 log-softmax (logits are upcast: bf16 log-probabilities lose ~3 digits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from gate.errors import RunFailure, SuiteError
from gate.results import DocumentScore
from gate.suites import Document, Suite

SCORING_VERSION = "ppl-1"


@dataclass
class EncodedDocument:
    """A document as token ids, with which tokens are scored."""

    id: str
    """Document id."""
    input_ids: list[int]
    """Token ids fed to the model."""
    scored: list[bool]
    """scored[i]: token i is predicted from tokens < i and counted; scored[0] is always False."""
    bytes: int
    """UTF-8 bytes of the scored text."""

    @property
    def n_scored(self) -> int:
        return sum(self.scored)


@dataclass
class Window:
    """A slice of one document that fits the model: ids plus which of them to score."""

    doc: int
    """Index of the document in the encoded suite."""
    input_ids: list[int]
    """Token ids of the slice."""
    scored: list[bool]
    """Which tokens of the slice are scored here (each document token in exactly one window)."""


def context_token_id(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise RunFailure(
            "the tokenizer has neither a BOS nor an EOS token, so the first token of a text has no "
            "context to be scored from; set tokenizer.bos_token in the base's tokenizer_config.json"
        )
    return token


def encode_suite(suite: Suite, tokenizer) -> list[EncodedDocument]:
    """Tokenize every document of a suite once; the result is shared by all checkpoints."""
    return [encode_document(doc, suite, tokenizer) for doc in suite.documents]


def encode_document(doc: Document, suite: Suite, tokenizer) -> EncodedDocument:
    ctx = context_token_id(tokenizer)
    templated = doc.shape == "messages" or (doc.shape == "prompt" and suite.chat_template and tokenizer.chat_template)
    if doc.shape == "text":
        segments = [(doc.text, True)]
    elif doc.shape == "prompt" and templated:
        prefix = tokenizer.apply_chat_template(
            [{"role": "user", "content": doc.prompt}], tokenize=False, add_generation_prompt=True
        )
        segments = [(prefix, False), (doc.completion, True)]
    elif doc.shape == "prompt":
        segments = [(doc.prompt, False), (doc.completion, True)]
    else:
        segments = _message_segments(doc, suite, tokenizer)
    ids, scored, nbytes = [], [], 0
    for text, is_scored in segments:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        scored += [is_scored] * len(piece)
        if is_scored:
            nbytes += len(text.encode("utf-8"))
    # Plain text starts after the context token, as at the start of a document in training; a
    # chat template renders its own start. Either way the first token must not be scored.
    if not templated or not scored or scored[0]:
        ids, scored = [ctx, *ids], [False, *scored]
    if not any(scored):
        raise SuiteError(
            f"{suite.path}: line {doc.line} (document {doc.id!r}) tokenizes to no scored tokens; remove it"
        )
    return EncodedDocument(id=doc.id, input_ids=ids, scored=scored, bytes=nbytes)


def _message_segments(doc: Document, suite: Suite, tokenizer) -> list[tuple[str, bool]]:
    if not tokenizer.chat_template:
        raise SuiteError(
            f"{suite.path}: line {doc.line} uses \"messages\" but the tokenizer has no chat template; "
            "use prompt/completion or text documents for this model"
        )

    def render(messages: list[dict], generation_prompt: bool) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""  # rendered text already split into segments
    for i, message in enumerate(doc.messages):
        if message["role"] != "assistant":
            continue
        before = render(doc.messages[:i], True)
        through = render(doc.messages[: i + 1], False)
        if not before.startswith(done) or not through.startswith(before):
            raise SuiteError(
                f"{suite.path}: line {doc.line}: the chat template does not render this conversation "
                "turn by turn (an earlier turn changes when later turns are added), so assistant turns "
                "cannot be isolated; use prompt/completion documents instead"
            )
        segments += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    return segments


def make_windows(docs: list[EncodedDocument], max_length: int, stride: int) -> list[Window]:
    """Cut each document into windows of at most max_length tokens (see module docstring)."""
    if not 1 <= stride < max_length:
        raise RunFailure(f"stride {stride} must be at least 1 and below max_length {max_length}")
    windows = []
    for index, doc in enumerate(docs):
        n = len(doc.input_ids)
        if n <= max_length:
            windows.append(Window(index, doc.input_ids, doc.scored))
            continue
        windows.append(Window(index, doc.input_ids[:max_length], doc.scored[:max_length]))
        scored_until = max_length  # tokens before this position are scored already
        while scored_until < n:
            end = min(scored_until + stride, n)
            begin = end - max_length
            mask = [doc.scored[p] and p >= scored_until for p in range(begin, end)]
            if any(mask):
                windows.append(Window(index, doc.input_ids[begin:end], mask))
            scored_until = end
    return windows


def score_documents(
    model,
    docs: list[EncodedDocument],
    *,
    max_length: int,
    stride: int,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[list[DocumentScore], int]:
    """Score documents; returns their records and the batch size finally used."""
    windows = make_windows(docs, max_length, stride)
    remaining = [0] * len(docs)
    for w in windows:
        remaining[w.doc] += 1
    nll = [0.0] * len(docs)
    finished = 0

    def consume(batch: list[Window], values: list[float]) -> None:
        nonlocal finished
        for window, value in zip(batch, values):
            nll[window.doc] += value
            remaining[window.doc] -= 1
            finished += remaining[window.doc] == 0
        on_progress(finished, len(docs))

    # Longest first: similar lengths share a batch (little padding), and an out-of-memory
    # error shows up on the first batch rather than after an hour.
    order = sorted(windows, key=lambda w: len(w.input_ids), reverse=True)
    used = run_batches(model, order, batch_size, device, pad_id, consume)
    records = []
    for doc, value in zip(docs, nll):
        if not math.isfinite(value):
            raise RunFailure(
                f"document {doc.id!r} has a non-finite log-likelihood ({value}); the weights or the "
                "dtype overflow (try --dtype float32)"
            )
        records.append(DocumentScore(id=doc.id, nll=value, tokens=doc.n_scored, bytes=doc.bytes))
    return records, used


def run_batches(
    model,
    windows: list[Window],
    batch_size: int,
    device: torch.device,
    pad_id: int,
    consume: Callable[[list[Window], list[float]], None],
    forward: Callable | None = None,
) -> int:
    """Score windows batch by batch; on out-of-memory halve the batch and retry that batch."""
    forward = forward or _forward
    start = 0
    while start < len(windows):
        batch = windows[start : start + batch_size]
        try:
            values = forward(model, batch, device, pad_id)
        except Exception as err:  # noqa: BLE001 - narrowed by is_out_of_memory below
            if not is_out_of_memory(err):
                raise
            if batch_size == 1:
                raise RunFailure(
                    "out of memory at batch size 1; lower max_length in gate.yaml or use a larger device"
                ) from None
            batch_size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        consume(batch, values)
        start += len(batch)
    return batch_size


def is_out_of_memory(err: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom_type) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


@torch.inference_mode()
def _forward(model, batch: list[Window], device: torch.device, pad_id: int) -> list[float]:
    """One padded forward pass; returns each window's summed nll over its scored tokens."""
    width = max(len(w.input_ids) for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, window in enumerate(batch):
        ids[row, : len(window.input_ids)] = torch.tensor(window.input_ids)
        attention[row, : len(window.input_ids)] = 1
    # Right padding: real tokens keep positions 0..n-1, and causal attention never sees the pads.
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
    # Logits at position p - 1 predict token p: label each position with the next token when that
    # one is scored, else ignore it. One fused cross-entropy over the whole batch, no copy of the
    # (batch x width x vocabulary) logits in float32 (upcast only from half precision).
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, window in enumerate(batch):
        targets = [p for p, s in enumerate(window.scored) if s]
        labels[row, [p - 1 for p in targets]] = torch.tensor([window.input_ids[p] for p in targets], dtype=torch.long)
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype != torch.float32:
        flat = flat.float()
    nll = torch.nn.functional.cross_entropy(flat, labels.view(-1).to(flat.device), ignore_index=-100, reduction="none")
    return nll.view(len(batch), width).double().sum(dim=1).tolist()
