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

Drift (a suite with ``drift: true``), in the same forward pass, by one of two methods.

Exact (the default, ``drift_k`` unset, DRIFT_EXACT internally). When the base is scored, each scored
token keeps the base's final hidden state h_t: the input of its output embedding (lm_head), captured
by a forward hook in the model's compute dtype, so nothing is rounded (float32 on CPU, bfloat16 on a
GPU run in bfloat16). A checkpoint's pass recomputes the base's logits W h_t (+ bias) with the
BASE's output-embedding weights W (an adapter's base module, which peft leaves untouched; for a
full-weight checkpoint, the tensor read from the base's safetensors): one matmul per scored token,
the same as the base's own lm_head. Then, per scored token, over the whole vocabulary,

    KL_t = sum_v p_v (log p_v - log q_v)        p = softmax(W h_t), q = the checkpoint's distribution

in float32 (sums of float32 terms, returned as float64), and top-1 agreement as below with the
base's top id = argmax_v W h_t. It needs the model's logits to BE lm_head(h): models with final
logit soft-capping (Gemma 2) or logit scaling (Cohere, Granite) are refused (exit 2, use the top-k
method); the base's first batch checks it. Storage: hidden size x bytes per scored token.

Top-k (``drift_k: k`` given explicitly). When the base is scored, each scored token keeps the base's top-k log-probabilities b_1..b_k (float32, descending), their token ids and
the rest mass p_r = 1 - sum_i exp(b_i) (float64): the *drift reference*. A checkpoint's pass reads its
own log-probabilities c_i at those ids and its rest mass q_r = 1 - sum_i exp(c_i), and computes

    KL_t = sum_i exp(b_i) (b_i - c_i) + p_r (log p_r - log q_r)       (0 log 0 = 0)

the KL divergence KL(base || checkpoint) of the two next-token distributions coarse-grained to k+1
buckets (the base's top k, and "the rest"). It is exact for that coarse-graining and, by the log-sum
inequality, a lower bound of the full-vocabulary KL; with k = 32 the rest holds little of the base's
mass, so the gap is small (bench/drift.py measures it on a real model). Top-1 agreement at t is 1
when the base's most likely token is (one of) the checkpoint's most likely: c at the base's top id
equals the checkpoint's maximum log-probability.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from gate.errors import RunFailure, SuiteError
from gate.results import DocumentScore, DriftToken
from gate.store import StoredHidden, StoredReference
from gate.suites import Document, Suite

SCORING_VERSION = "ppl-1"

DRIFT_EXACT = 0
"""A suite's drift_k that selects the exact method (the base's hidden states, full-vocabulary KL)."""

SOFTCAP_KEYS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
"""config.json keys of models whose logits are not lm_head(hidden): the exact method refuses them."""


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
    begin: int = 0
    """Position of the slice's first token in the document."""


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
        prefix = tokenizer.apply_chat_template([{"role": "user", "content": doc.prompt}], tokenize=False, add_generation_prompt=True)
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
        raise SuiteError(f"{suite.path}: line {doc.line} (document {doc.id!r}) tokenizes to no scored tokens; remove it")
    return EncodedDocument(id=doc.id, input_ids=ids, scored=scored, bytes=nbytes)


def _message_segments(doc: Document, suite: Suite, tokenizer) -> list[tuple[str, bool]]:
    if not tokenizer.chat_template:
        raise SuiteError(
            f'{suite.path}: line {doc.line} uses "messages" but the tokenizer has no chat template; '
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
        windows.append(Window(index, doc.input_ids[:max_length], doc.scored[:max_length], 0))
        scored_until = max_length  # tokens before this position are scored already
        while scored_until < n:
            end = min(scored_until + stride, n)
            begin = end - max_length
            mask = [doc.scored[p] and p >= scored_until for p in range(begin, end)]
            if any(mask):
                windows.append(Window(index, doc.input_ids[begin:end], mask, begin))
            scored_until = end
    return windows


DRIFT_WORST = 3  # tokens per document kept for the report (the largest KL)
DRIFT_CONTEXT = 8  # tokens of context on each side of a reported token
_ROWS_PER_CHUNK = 1 << 26  # logits elements per chunk of the drift computation (256 MB in float32)


@dataclass
class DriftReference:
    """The base at each scored token of one document, in order: its top-k, or (exact) its hidden state."""

    logprobs: np.ndarray | None = None
    """Top-k: (tokens, k) float32: the base's k largest log-probabilities, descending."""
    indices: np.ndarray | None = None
    """Top-k: (tokens, k) int32: their token ids."""
    rest: np.ndarray | None = None
    """Top-k: (tokens,) float64: the base's probability mass outside its top k."""
    hidden: torch.Tensor | None = None
    """Exact: (tokens, hidden size) the base's final hidden state (lm_head's input), compute dtype, on CPU."""
    expected: np.ndarray | None = None
    """Exact: (tokens, hidden size) float32 m = W^T p_base, the output embedding expected under the base's
    next-token distribution (None in references stored before gate kept it: the recompute path)."""
    offset: np.ndarray | None = None
    """Exact: (tokens,) float64 s = m . h_base - logsumexp(base logits)."""
    top: np.ndarray | None = None
    """Exact: (tokens,) int32 the base's most likely next token."""

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[0] if self.hidden is not None else self.logprobs.shape[0])


@dataclass
class OutputHead:
    """The base's output embedding (lm_head): logits = hidden @ weight.T + bias."""

    weight: torch.Tensor
    """(vocabulary, hidden size), in the compute dtype, on the scoring device."""
    bias: torch.Tensor | None = None
    """(vocabulary,) or None (almost every causal LM has none)."""


def base_output_head(model) -> OutputHead:
    """The BASE's output embedding inside ``model`` (the base, or the base with an adapter attached).

    peft wraps a targeted lm_head (LoRA: ``base_layer``; ``modules_to_save``: ``original_module``)
    and leaves the wrapped module's weights untouched, so unwrapping gives the base's own weights
    without a copy. Tied embeddings are the same tensor as the input embedding: the base's too.
    """
    module = model.get_output_embeddings()
    while True:
        if hasattr(module, "original_module"):
            module = module.original_module
        elif hasattr(module, "base_layer"):
            module = module.base_layer
        else:
            break
    return OutputHead(module.weight, getattr(module, "bias", None))


def output_head_from_files(folder, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False) -> OutputHead:
    """The base's output embedding read from its safetensors, without loading the model.

    Its parameter names come from an empty (meta-device) instance of the architecture: every name
    the output weight has (with tied embeddings, the input embedding's too) is looked for in the files.
    """
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = skeleton.get_output_embeddings()
    params = list(skeleton.named_parameters(remove_duplicate=False))
    weight_names = [n for n, p in params if p is head.weight]
    bias = getattr(head, "bias", None)
    bias_names = [n for n, p in params if bias is not None and p is bias]
    if getattr(config, "tie_word_embeddings", False):
        weight_names += [n for n, p in params if p is skeleton.get_input_embeddings().weight]
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as tensors:
            keys = set(tensors.keys())
            for kind, names in (("weight", weight_names), ("bias", bias_names)):
                name = next((n for n in names if n in keys), None)
                if name is not None and kind not in found:
                    found[kind] = tensors.get_tensor(name)
    if "weight" not in found or (bias_names and "bias" not in found):
        raise RunFailure(
            f"{folder}: the base's output embedding ({', '.join(weight_names) or 'lm_head'}) is not in its safetensors "
            "files, which the exact drift of a full-weight checkpoint reads; set `drift_k: 32` on the suite (top-k drift)"
        )
    move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731 - the model is loaded in this dtype too
    return OutputHead(move(found["weight"]), move(found["bias"]) if "bias" in found else None)


def to_stored(reference: DriftReference, k: int) -> StoredReference | StoredHidden:
    """One document's reference as the store keeps it (bytes, nothing rounded)."""
    if reference.hidden is not None:
        hidden = reference.hidden.contiguous()
        dtype = str(hidden.dtype).removeprefix("torch.")
        blob = hidden.view(torch.uint8).numpy().tobytes()
        if reference.expected is not None:
            # One blob: the hidden states, then m (float32), s (float64) and the base's top-1 (int32).
            dtype += EXPECTED_SUFFIX
            blob += (
                reference.expected.astype("<f4").tobytes()
                + reference.offset.astype("<f8").tobytes()
                + reference.top.astype("<i4").tobytes()
            )
        return StoredHidden(dtype, int(hidden.shape[1]), blob)
    return StoredReference(
        k,
        reference.logprobs.astype("<f4").tobytes(),
        reference.indices.astype("<i4").tobytes(),
        reference.rest.astype("<f8").tobytes(),
    )


def from_stored(stored: StoredReference | StoredHidden) -> DriftReference:
    if isinstance(stored, StoredHidden):
        dtype, packed = stored.dtype.removesuffix(EXPECTED_SUFFIX), stored.dtype.endswith(EXPECTED_SUFFIX)
        size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        per_token = stored.width * size + (stored.width * 4 + 8 + 4 if packed else 0)
        tokens = len(stored.hidden) // per_token
        cut = tokens * stored.width * size
        values = torch.frombuffer(bytearray(stored.hidden[:cut]), dtype=torch.uint8) if cut else torch.empty(0, dtype=torch.uint8)
        reference = DriftReference(hidden=values.view(getattr(torch, dtype)).reshape(-1, stored.width))
        if packed:
            rest = stored.hidden[cut:]
            m_end, s_end = tokens * stored.width * 4, tokens * stored.width * 4 + tokens * 8
            reference.expected = np.frombuffer(rest[:m_end], dtype="<f4").reshape(-1, stored.width)
            reference.offset = np.frombuffer(rest[m_end:s_end], dtype="<f8")
            reference.top = np.frombuffer(rest[s_end:], dtype="<i4")
        return reference
    return DriftReference(
        logprobs=np.frombuffer(stored.logprobs, dtype="<f4").reshape(-1, stored.k),
        indices=np.frombuffer(stored.indices, dtype="<i4").reshape(-1, stored.k),
        rest=np.frombuffer(stored.rest, dtype="<f8"),
    )


EXPECTED_SUFFIX = "+expected"
"""A stored exact reference whose dtype name ends so also holds m, s and the base's top-1 per token."""


def head_is_base(model) -> bool:
    """Whether ``model`` (the base with an adapter attached) computes its logits with the base's own
    output embedding: no LoRA on it, no trained copy (``modules_to_save``). Then the exact KL needs no
    base logits at all (see ``_compare_expected``)."""
    module = model.get_output_embeddings()
    return module is not None and not hasattr(module, "base_layer") and not hasattr(module, "original_module")


class NotLinearHead(Exception):
    """The model's logits are not lm_head(hidden): the exact drift method cannot recompute them."""


@dataclass
class DriftRun:
    """What drift work a scoring pass does: capture the base's reference, or compare with it."""

    k: int
    """Top-k size of the reference; DRIFT_EXACT: the exact method (hidden states)."""
    reference: list[DriftReference] | None = None
    """Per document (suite order), the base's reference; None: this pass captures it (the base)."""
    tokenizer: object = None
    """Decodes the reported tokens (a checkpoint's pass)."""
    head: OutputHead | None = None
    """Exact method: the base's output embedding (the base's pass: to compute m; a checkpoint's: to recompute the base's logits)."""
    shared_head: bool = False
    """Exact method, a checkpoint's pass: its output embedding is the base's own, so the KL comes from m and
    s (O(hidden size) per token) when the reference holds them."""
    captured: list[DriftReference] = field(default_factory=list)
    """Filled by the base's pass: its reference, per document."""
    token_kl: list[np.ndarray] = field(default_factory=list)
    """Filled by a checkpoint's pass: the KL at every scored token of the suite (for percentiles)."""

    @property
    def capturing(self) -> bool:
        return self.reference is None

    @property
    def exact(self) -> bool:
        return self.k == DRIFT_EXACT


@dataclass
class _WindowDrift:
    """One window's drift numbers, per scored token (in position order)."""

    positions: list[int]
    """Document positions of the scored tokens."""
    kl: np.ndarray | None = None
    """Checkpoint pass: KL(base || checkpoint) per token."""
    match: np.ndarray | None = None
    """Checkpoint pass: top-1 agreement per token (bool)."""
    top: np.ndarray | None = None
    """Checkpoint pass: the checkpoint's most likely token id per token."""
    logprobs: np.ndarray | None = None
    """Base pass: (tokens, k) top-k log-probabilities."""
    indices: np.ndarray | None = None
    """Base pass: (tokens, k) token ids."""
    rest: np.ndarray | None = None
    """Base pass: rest mass per token."""
    hidden: torch.Tensor | None = None
    """Base pass, exact: (tokens, hidden size) hidden states."""
    expected: np.ndarray | None = None
    """Base pass, exact: (tokens, hidden size) m per token."""
    offset: np.ndarray | None = None
    """Base pass, exact: (tokens,) s per token."""
    base_top: np.ndarray | None = None
    """Checkpoint pass, exact: the base's most likely token id per token."""


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
    drift: DriftRun | None = None,
) -> tuple[list[DocumentScore], int]:
    """Score documents; returns their records and the batch size finally used.

    With ``drift``, the same forward passes also capture the base's reference (``drift.captured``)
    or compare with it (per-document kl_sum, top1_matches, the most drifted tokens; ``drift.token_kl``).
    """
    windows = make_windows(docs, max_length, stride)
    remaining = [0] * len(docs)
    for w in windows:
        remaining[w.doc] += 1
    nll = [0.0] * len(docs)
    pieces: list[list[tuple[int, _WindowDrift]]] = [[] for _ in docs]
    finished = 0
    slots = _reference_slots(docs) if drift is not None else None

    def consume(batch: list[Window], values: list) -> None:
        nonlocal finished
        for window, value in zip(batch, values):
            if drift is not None:
                value, window_drift = value
                pieces[window.doc].append((window.begin, window_drift))
            nll[window.doc] += value
            remaining[window.doc] -= 1
            finished += remaining[window.doc] == 0
        on_progress(finished, len(docs))

    # Longest first: similar lengths share a batch (little padding), and an out-of-memory
    # error shows up on the first batch rather than after an hour.
    order = sorted(windows, key=lambda w: len(w.input_ids), reverse=True)
    forward, hook = None, None
    if drift is not None:
        tap: dict = {}
        if drift.exact and (drift.capturing or drift.shared_head):
            head = model.get_output_embeddings()
            if head is None:
                raise NotLinearHead()  # no output embedding to recompute the logits with
            hook = head.register_forward_hook(partial(_tap, tap))
        forward = partial(_forward, drift=drift, reference=lambda w: _window_reference(drift, slots, w), tap=tap)
    try:
        used = run_batches(model, order, batch_size, device, pad_id, consume, forward)
    finally:
        if hook is not None:
            hook.remove()
    records = []
    for index, (doc, value) in enumerate(zip(docs, nll)):
        if not math.isfinite(value):
            raise RunFailure(
                f"document {doc.id!r} has a non-finite log-likelihood ({value}); the weights or the dtype overflow (try --dtype float32)"
            )
        record = DocumentScore(id=doc.id, nll=value, tokens=doc.n_scored, bytes=doc.bytes)
        if drift is not None:
            _finish_drift(drift, index, doc, record, sorted(pieces[index], key=lambda p: p[0]))
        records.append(record)
    return records, used


def _tap(tap: dict, module, args, output) -> None:
    """Forward hook on lm_head: keep its input (the final hidden states) and output of this batch."""
    tap["hidden"], tap["logits"] = args[0], output


def _reference_slots(docs: list[EncodedDocument]) -> list[list[int]]:
    """Per document, position -> index among its scored tokens (the reference's row), -1 if unscored."""
    slots = []
    for doc in docs:
        row, out = 0, []
        for s in doc.scored:
            out.append(row if s else -1)
            row += s
        slots.append(out)
    return slots


def _window_reference(drift: DriftRun, slots, window: Window) -> tuple[torch.Tensor, ...] | None:
    """The base's reference rows for a window's scored tokens (None while capturing it)."""
    if drift.capturing:
        return None
    ref = drift.reference[window.doc]
    rows = [slots[window.doc][window.begin + p] for p, s in enumerate(window.scored) if s]
    if ref.tokens != len(slots[window.doc]) - slots[window.doc].count(-1) or (ref.hidden is not None) != drift.exact:
        raise RunFailure("the stored drift reference does not match the suite's tokens; delete gate.sqlite and re-run")
    if drift.exact and drift.shared_head and ref.expected is not None:
        return (
            ref.hidden[rows],
            torch.from_numpy(ref.expected[rows]),
            torch.from_numpy(ref.offset[rows]),
            torch.from_numpy(ref.top[rows].astype(np.int64)),
        )
    if drift.exact:
        return (ref.hidden[rows],)
    return (
        torch.from_numpy(ref.logprobs[rows]),
        torch.from_numpy(ref.indices[rows].astype(np.int64)),
        torch.from_numpy(ref.rest[rows]),
    )


def _finish_drift(drift: DriftRun, index: int, doc: EncodedDocument, record: DocumentScore, pieces: list[tuple[int, _WindowDrift]]) -> None:
    """Join a document's windows (in position order) into its reference or its drift record."""
    parts = [p for _, p in pieces]
    if drift.capturing and drift.exact:
        reference = DriftReference(hidden=torch.cat([p.hidden for p in parts]))
        if all(p.expected is not None for p in parts):
            reference.expected = np.concatenate([p.expected for p in parts])
            reference.offset = np.concatenate([p.offset for p in parts])
            reference.top = np.concatenate([p.base_top for p in parts]).astype(np.int32)
        drift.captured.append(reference)
        return
    if drift.capturing:
        drift.captured.append(
            DriftReference(
                logprobs=np.concatenate([p.logprobs for p in parts]),
                indices=np.concatenate([p.indices for p in parts]),
                rest=np.concatenate([p.rest for p in parts]),
            )
        )
        return
    kl = np.concatenate([p.kl for p in parts])
    if not np.isfinite(kl).all():
        raise RunFailure(
            f"document {doc.id!r} has a non-finite KL divergence to the base; the weights or the dtype overflow (try --dtype float32)"
        )
    match = np.concatenate([p.match for p in parts])
    top = np.concatenate([p.top for p in parts])
    positions = [q for p in parts for q in p.positions]
    base_top = np.concatenate([p.base_top for p in parts]) if drift.exact else drift.reference[index].indices[:, 0]
    drift.token_kl.append(kl)
    record.kl_sum = math.fsum(kl.tolist())
    record.top1_matches = int(match.sum())
    worst = heapq.nlargest(DRIFT_WORST, range(len(kl)), key=lambda i: kl[i])
    record.drifted = [
        _drift_token(drift.tokenizer, doc, positions[i], float(kl[i]), int(base_top[i]), int(top[i])) for i in worst if kl[i] > 0
    ]


def _drift_token(tokenizer, doc: EncodedDocument, position: int, kl: float, base_top: int, top: int) -> DriftToken:
    ids = doc.input_ids
    decode = (lambda t: tokenizer.decode(t)) if tokenizer is not None else (lambda t: " ".join(map(str, t)))
    return DriftToken(
        index=sum(doc.scored[:position]),
        kl=kl,
        before=decode(ids[max(0, position - DRIFT_CONTEXT) : position]),
        token=decode([ids[position]]),
        after=decode(ids[position + 1 : position + 1 + DRIFT_CONTEXT]),
        base_top=decode([base_top]),
        checkpoint_top=decode([top]),
    )


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
                raise RunFailure("out of memory at batch size 1; lower max_length in gate.yaml or use a larger device") from None
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
def _forward(
    model, batch: list[Window], device: torch.device, pad_id: int, drift: DriftRun | None = None, reference=None, tap=None
) -> list:
    """One padded forward pass; returns each window's summed nll over its scored tokens.

    With ``drift``, each window's value is (nll, _WindowDrift), from the same logits.
    """
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
    if drift is not None:
        hidden = None
        if drift.exact and drift.capturing:
            hidden = tap.pop("hidden")
            head_logits = tap.pop("logits")
            if not tap.get("checked"):
                # The exact method recomputes logits as lm_head(hidden): true of this model only if
                # nothing (soft-capping, scaling) comes after lm_head. Checked once, on the first batch.
                if head_logits.shape != logits.shape or not torch.equal(head_logits, logits):
                    raise NotLinearHead()
                tap["checked"] = True
            del head_logits
            hidden = hidden.reshape(-1, hidden.shape[-1])
        elif drift.exact and drift.shared_head:
            hidden = tap.pop("hidden")
            tap.pop("logits", None)
            hidden = hidden.reshape(-1, hidden.shape[-1])
        return _forward_drift(flat, labels, batch, drift, reference, hidden)
    if flat.dtype != torch.float32:
        flat = flat.float()
    nll = torch.nn.functional.cross_entropy(flat, labels.view(-1).to(flat.device), ignore_index=-100, reduction="none")
    return nll.view(len(batch), width).double().sum(dim=1).tolist()


def _forward_drift(
    flat: torch.Tensor, labels: torch.Tensor, batch: list[Window], drift: DriftRun, reference, hidden: torch.Tensor | None = None
) -> list:
    """nll and drift from the scored rows only, in chunks that bound the float32 log-softmax's memory.

    The log-softmax of the scored rows is the one cross_entropy computes, so nll is the same
    number; top-k, gathers and the KL work on (tokens x k) numbers and cost little beside it.
    """
    flat_labels = labels.view(-1)
    rows = (flat_labels != -100).nonzero().squeeze(1)  # row-major: window by window, positions ascending
    counts = [sum(w.scored) for w in batch]
    targets = flat_labels[rows].to(flat.device)
    rows = rows.to(flat.device)
    chunk = max(1, _ROWS_PER_CHUNK // flat.shape[-1])
    nll_parts, drift_parts = [], []
    refs = None if drift.capturing else [reference(w) for w in batch]
    ref_cat = None if refs is None else [torch.cat(parts) for parts in zip(*refs)]
    if drift.exact and drift.capturing:
        # The base: its hidden states at the scored rows, as they are (compute dtype); nll as without drift.
        kept = hidden[rows].cpu()
    fast = drift.exact and not drift.capturing and drift.shared_head and ref_cat is not None and len(ref_cat) == 4
    if fast:
        own = hidden[rows]  # the checkpoint's final hidden states at the scored rows
    for start in range(0, len(rows), chunk):
        picked = flat[rows[start : start + chunk]].float()
        logp = torch.log_softmax(picked, dim=-1)
        best = logp.max(dim=-1)
        # logsumexp of the logits, read off at the most likely token (where it is best conditioned).
        lse = picked.gather(1, best.indices[:, None]).squeeze(1).double() - best.values.double()
        del picked
        nll_parts.append(-logp.gather(1, targets[start : start + chunk, None]).squeeze(1).double().cpu())
        if drift.exact and drift.capturing:
            if drift.head is not None:  # without the base's head only the hidden states are kept (the recompute path)
                drift_parts.append(_expected(logp, lse, best.indices, kept[start : start + chunk], drift.head))
            continue
        if fast:
            m, s, base_top = (t[start : start + chunk] for t in ref_cat[1:])
            drift_parts.append(_compare_expected(logp, best, lse, own[start : start + chunk], m, s, base_top.to(logp.device)))
        elif drift.exact:
            h = ref_cat[0][start : start + chunk].to(logp.device)
            base_logits = torch.nn.functional.linear(h, drift.head.weight, drift.head.bias)
            drift_parts.append(_compare_exact(logp, base_logits))
        elif drift.capturing:
            if drift.k > logp.shape[-1]:
                raise RunFailure(f"drift_k {drift.k} exceeds the model's vocabulary ({logp.shape[-1]} tokens)")
            values, indices = torch.topk(logp, drift.k, dim=-1)
            rest = (1.0 - values.double().exp().sum(dim=-1)).clamp_min(0.0)
            drift_parts.append((values.cpu(), indices.to(torch.int32).cpu(), rest.cpu()))
        else:
            b, idx, p_rest = (t[start : start + chunk] for t in ref_cat)
            drift_parts.append(_compare(logp, b, idx.to(logp.device), p_rest))
    nll = torch.cat(nll_parts)
    joined = [torch.cat(parts) for parts in zip(*drift_parts)]
    out, offset = [], 0
    for window, n in zip(batch, counts):
        sl = slice(offset, offset + n)
        positions = [window.begin + p for p, s in enumerate(window.scored) if s]
        if drift.exact and drift.capturing and joined:
            part = _WindowDrift(
                positions, hidden=kept[sl], expected=joined[0][sl].numpy(), offset=joined[1][sl].numpy(), base_top=joined[2][sl].numpy()
            )
        elif drift.exact and drift.capturing:
            part = _WindowDrift(positions, hidden=kept[sl])
        elif drift.exact:
            part = _WindowDrift(
                positions,
                kl=joined[0][sl].numpy(),
                match=joined[1][sl].numpy(),
                top=joined[2][sl].numpy(),
                base_top=joined[3][sl].numpy(),
            )
        elif drift.capturing:
            part = _WindowDrift(positions, logprobs=joined[0][sl].numpy(), indices=joined[1][sl].numpy(), rest=joined[2][sl].numpy())
        else:
            part = _WindowDrift(positions, kl=joined[0][sl].numpy(), match=joined[1][sl].numpy(), top=joined[2][sl].numpy())
        out.append((float(nll[sl].sum()), part))
        offset += n
    return out


def _compare(logp: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, p_rest: torch.Tensor):
    """Per token: KL over the base's top-k buckets plus the rest, top-1 agreement, the checkpoint's top id."""
    c = logp.gather(1, idx).double().cpu()
    b = b.double()
    p = b.exp()
    # Terms where the base gives no probability are 0 (0 log 0 = 0), whatever the checkpoint says.
    head = torch.where(p > 0, p * (b - c), torch.zeros_like(p)).sum(dim=-1)
    q_rest = (1.0 - c.exp().sum(dim=-1)).clamp_min(0.0)
    # A rest mass lost to rounding (q_r -> 0) is floored: a smaller KL, so still a lower bound.
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.clamp_min(1e-30).log()), torch.zeros_like(p_rest))
    # Rounding can leave -1e-17 where the distributions agree; KL is never negative.
    kl = (head + tail).clamp_min(0.0)  # NaN stays NaN: reported as a failure, never averaged
    best = logp.max(dim=-1)
    match = (logp.gather(1, idx[:, :1]).squeeze(1) >= best.values).cpu()
    return kl, match, best.indices.cpu()


def _expected(logp: torch.Tensor, lse: torch.Tensor, top: torch.Tensor, hidden: torch.Tensor, head: OutputHead):
    """The base's pass: per token m = W^T p (float32), s = m . h - logsumexp(logits) (float64), top-1 id.

    With b = W h_b + beta and c = W h_c + beta (one output embedding), p = softmax(b):
    KL(base || checkpoint) = p . (b - c) - lse(b) + lse(c) = m . (h_b - h_c) - lse(b) + lse(c)
                           = s - m . h_c + lse(c),
    an identity (the bias cancels), so a checkpoint that shares the output embedding needs only its
    own hidden state and logsumexp: O(hidden size) per token instead of a second vocabulary-wide pass.
    s is computed with the stored (float32) m, so m's rounding only touches m . (h_b - h_c), which is small.
    """
    p = logp.exp()
    m = (p.to(head.weight.dtype) @ head.weight).float()
    s = (m.double() * hidden.to(m.device).double()).sum(dim=-1) - lse
    return m.cpu(), s.cpu(), top.to(torch.int32).cpu()


def _compare_expected(logp: torch.Tensor, best, lse: torch.Tensor, hidden: torch.Tensor, m, s, base_top):
    """A checkpoint sharing the base's output embedding: KL = s - m . h_c + lse(c) per token (see ``_expected``)."""
    dot = (m.to(hidden.device).double() * hidden.double()).sum(dim=-1)
    kl = (s.to(hidden.device) - dot + lse.to(hidden.device)).cpu()
    # Rounding (float32 logits) can leave -1e-7 where the distributions agree; KL is never negative.
    kl = kl.clamp_min(0.0)  # NaN stays NaN: reported as a failure, never averaged
    match = logp.gather(1, base_top[:, None]).squeeze(1) >= best.values
    return kl, match.cpu(), best.indices.cpu(), base_top.cpu()


def _compare_exact(logp: torch.Tensor, base_logits: torch.Tensor):
    """Per token: the full-vocabulary KL(base || checkpoint), top-1 agreement, both models' top ids.

    ``logp``: the checkpoint's float32 log-probabilities; ``base_logits``: the base's recomputed
    logits (compute dtype), upcast here as the base's own pass upcasts them.
    """
    base_top = base_logits.argmax(dim=-1)
    lb = torch.log_softmax(base_logits.float(), dim=-1)
    del base_logits
    diff = lb - logp
    p = lb.exp_()  # lb is not needed any more: its memory holds p
    kl = torch.einsum("tv,tv->t", diff, p)  # row by row sum of p * diff, without a (tokens x vocabulary) product
    redo = kl.isnan().nonzero().squeeze(1)
    if len(redo):
        # A base logit of -inf gives p = 0 and diff = -inf: 0 log 0 = 0, whatever the checkpoint says.
        # A NaN from the checkpoint stays NaN (a failure, never averaged).
        kl[redo] = torch.where(p[redo] > 0, diff[redo] * p[redo], 0.0).sum(dim=-1)
    kl = kl.double()
    kl = kl.clamp_min(0.0)  # rounding can leave -1e-9 where the distributions agree; KL is never negative
    best = logp.max(dim=-1)
    match = logp.gather(1, base_top[:, None]).squeeze(1) >= best.values
    return kl.cpu(), match.cpu(), best.indices.cpu(), base_top.cpu()
