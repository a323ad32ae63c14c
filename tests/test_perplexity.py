"""Perplexity numbers against an independent, one-document-at-a-time computation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CONTEXT
from gate.errors import RunFailure, SuiteError
from gate.runner.perplexity import encode_suite, make_windows, run_batches, score_documents
from gate.suites import load_suite

REL = 1e-5


@pytest.fixture(scope="module")
def model(world):
    return AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(world):
    return AutoTokenizer.from_pretrained(world.base)


def reference_nll(model, ids: list[int], targets: list[int]) -> float:
    """Plain full-context forward pass of one document, float64 log-softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return -sum(logprobs[p - 1, ids[p]].item() for p in targets)


def reference_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int], int]:
    """Token ids, scored positions and scored bytes for hand-built (text, scored) segments."""
    ids, targets, nbytes = [], [], 0
    for text, scored in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if scored:
            targets += range(len(ids), len(ids) + len(piece))
            nbytes += len(text.encode())
        ids += piece
    return ids, targets, nbytes


def gate_scores(model, tokenizer, suite, batch_size=4, max_length=CONTEXT, stride=CONTEXT // 2):
    docs = encode_suite(suite, tokenizer)
    records, _ = score_documents(
        model, docs, max_length=max_length, stride=stride, batch_size=batch_size, device=torch.device("cpu"), pad_id=0
    )
    return {r.id: r for r in records}


def test_text_documents_match_reference(world, model, tokenizer):
    suite = load_suite("text", world.suites / "text.jsonl")
    got = gate_scores(model, tokenizer, suite)
    for doc in suite.documents:
        ids, targets, nbytes = reference_segments(tokenizer, [(doc.text, True)])
        ids = [tokenizer.bos_token_id, *ids]  # every text token is scored, the first one from BOS
        targets = [t + 1 for t in targets]
        assert got[doc.id].tokens == len(targets) > 0
        assert got[doc.id].bytes == nbytes == len(doc.text.encode())
        assert got[doc.id].nll == pytest.approx(reference_nll(model, ids, targets), rel=REL)


def test_prompt_completion_scores_only_the_completion_through_the_chat_template(world, model, tokenizer):
    suite = load_suite("prompt", world.suites / "prompt.jsonl")
    got = gate_scores(model, tokenizer, suite)
    for doc in suite.documents:
        header = f"<|im_start|>user\n{doc.prompt}<|im_end|>\n<|im_start|>assistant\n"
        ids, targets, nbytes = reference_segments(tokenizer, [(header, False), (doc.completion, True)])
        assert got[doc.id].tokens == len(targets)
        assert got[doc.id].bytes == nbytes
        assert got[doc.id].nll == pytest.approx(reference_nll(model, ids, targets), rel=REL)


def test_prompt_completion_without_chat_template(world, model, tokenizer):
    suite = load_suite("prompt", world.suites / "prompt.jsonl", chat_template=False)
    got = gate_scores(model, tokenizer, suite)
    for doc in suite.documents:
        ids, targets, _ = reference_segments(tokenizer, [(doc.prompt, False), (doc.completion, True)])
        ids, targets = [tokenizer.bos_token_id, *ids], [t + 1 for t in targets]
        assert got[doc.id].nll == pytest.approx(reference_nll(model, ids, targets), rel=REL)


def test_messages_score_assistant_turns_only(world, model, tokenizer):
    suite = load_suite("messages", world.suites / "messages.jsonl")
    got = gate_scores(model, tokenizer, suite)
    one, two = suite.documents
    segments = {
        one.id: [
            ("<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n", False),
            ("2 plus 3 is 5.<|im_end|>\n", True),
        ],
        two.id: [
            ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a place.<|im_end|>\n<|im_start|>assistant\n", False),
            ("The old station.<|im_end|>\n", True),
            ("<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n", False),
            ("The quiet lake.<|im_end|>\n", True),
        ],
    }
    for doc_id, segs in segments.items():
        ids, targets, nbytes = reference_segments(tokenizer, segs)
        assert got[doc_id].tokens == len(targets)
        assert got[doc_id].bytes == nbytes
        assert got[doc_id].nll == pytest.approx(reference_nll(model, ids, targets), rel=REL)


def test_long_document_every_token_once_with_maximal_context(world, model, tokenizer):
    """stride 1: token p >= L is predicted from exactly the L - 1 tokens before it."""
    suite = load_suite("long", world.suites / "long.jsonl")
    long_doc = suite.documents[0]
    ids = [tokenizer.bos_token_id, *tokenizer(long_doc.text, add_special_tokens=False)["input_ids"]]
    n, L = len(ids), CONTEXT
    assert n > 2 * L, "the long document must exceed the context"
    expected = reference_nll(model, ids[:L], list(range(1, L)))
    for p in range(L, n):
        window = ids[p - L + 1 : p + 1]
        expected += reference_nll(model, window, [L - 1])
    got = gate_scores(model, tokenizer, suite, max_length=L, stride=1)
    assert got["long"].tokens == n - 1
    assert got["long"].nll == pytest.approx(expected, rel=REL)


def test_windows_score_each_token_once_with_enough_context():
    from gate.runner.perplexity import EncodedDocument

    n, L, S = 300, 64, 24
    scored = [False] + [i % 7 != 3 for i in range(1, n)]  # some tokens are context only
    doc = EncodedDocument(id="d", input_ids=list(range(n)), scored=scored, bytes=1)
    seen = []
    for w in make_windows([doc], L, S):
        assert len(w.input_ids) <= L
        begin = w.input_ids[0]  # ids are positions here
        for j, s in enumerate(w.scored):
            if s:
                seen.append(begin + j)
                assert j >= 1
                if begin + j >= L:
                    assert j >= L - S, "after the first window a token has at least L - S context"
    assert sorted(seen) == [p for p in range(n) if scored[p]]


def test_batch_size_does_not_change_numbers(world, model, tokenizer):
    suite = load_suite("text", world.suites / "text.jsonl")
    one = gate_scores(model, tokenizer, suite, batch_size=1)
    many = gate_scores(model, tokenizer, suite, batch_size=16)
    for doc_id in one:
        assert many[doc_id].nll == pytest.approx(one[doc_id].nll, rel=1e-6)


def test_out_of_memory_halves_the_batch_and_retries():
    """A simulated allocator failure for batches above 2: the same values, batch size 2 reported."""
    from gate.runner.perplexity import Window

    windows = [Window(i, [1] * (10 - i), [False] + [True] * (9 - i)) for i in range(8)]
    calls = []

    def forward(model, batch, device, pad_id):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [float(sum(w.scored)) for w in batch]

    got = {}
    used = run_batches(None, windows, 8, torch.device("cpu"), 0, lambda b, v: got.update(zip((w.doc for w in b), v)), forward)
    assert used == 2
    assert calls[:3] == [8, 4, 2]
    assert got == {i: float(9 - i) for i in range(8)}


def test_out_of_memory_at_batch_size_one_is_a_runtime_failure():
    from gate.runner.perplexity import Window

    def forward(model, batch, device, pad_id):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(RunFailure, match="out of memory at batch size 1"):
        run_batches(None, [Window(0, [1, 2], [False, True])], 4, torch.device("cpu"), 0, lambda b, v: None, forward)


def test_messages_need_a_chat_template(world, model, tokenizer, tmp_path):
    suite = load_suite("messages", world.suites / "messages.jsonl")
    plain = AutoTokenizer.from_pretrained(world.base)
    plain.chat_template = None
    with pytest.raises(SuiteError, match="no chat template"):
        encode_suite(suite, plain)


def test_non_finite_likelihood_is_reported_not_averaged(world, tokenizer):
    broken = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32).eval()
    with torch.no_grad():
        broken.lm_head.weight.fill_(math.nan)
    suite = load_suite("text", world.suites / "text.jsonl")
    with pytest.raises(RunFailure, match="non-finite log-likelihood"):
        gate_scores(broken, tokenizer, suite)


def _lm_eval_rolling(model, tokenizer, texts: list[str]) -> list[float]:
    """lm-eval's own loglikelihood_rolling (the request behind its wikitext perplexity) on the same model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu", max_length=CONTEXT)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    return lm.loglikelihood_rolling(requests, disable_tqdm=True)


def test_text_perplexity_equals_lm_evals_rolling_loglikelihood(world, model, tmp_path):
    """Documents within the context, a tokenizer that adds no BOS itself (SmolLM2's, GPT-2's):
    gate's summed nll is exactly minus lm-eval's rolling log-likelihood, document by document."""
    plain = AutoTokenizer.from_pretrained(world.base)
    plain._tokenizer.post_processor = None  # like SmolLM2's tokenizer: encode() adds nothing
    suite = load_suite("text", world.suites / "text.jsonl")
    docs = encode_suite(suite, plain)
    ours, _ = score_documents(model, docs, max_length=CONTEXT, stride=CONTEXT // 2, batch_size=4, device=torch.device("cpu"), pad_id=plain.pad_token_id)
    theirs = _lm_eval_rolling(model, plain, [d.text for d in suite.documents])
    assert [r.nll for r in ours] == pytest.approx([-x for x in theirs], rel=1e-5)


def test_with_a_bos_adding_tokenizer_lm_eval_also_scores_a_second_bos(world, model, tokenizer):
    """lm-eval prefixes BOS to a token list that already starts with the tokenizer's own BOS: it
    scores [BOS, BOS, text...] from the second position, one token more than gate, which scores
    each text token once after one BOS. Pinned so that a change on either side shows up."""
    suite = load_suite("text", world.suites / "text.jsonl")
    docs = encode_suite(suite, tokenizer)
    ours, _ = score_documents(model, docs, max_length=CONTEXT, stride=CONTEXT // 2, batch_size=4, device=torch.device("cpu"), pad_id=tokenizer.pad_token_id)
    short = [i for i, d in enumerate(docs) if len(d.input_ids) < CONTEXT]  # one window on both sides
    texts = [suite.documents[i].text for i in short]
    theirs = _lm_eval_rolling(model, tokenizer, texts)
    bos = tokenizer.bos_token_id
    doubled = [[bos, *tokenizer(t)["input_ids"]] for t in texts]
    assert all(ids[1] == bos for ids in doubled)  # the tokenizer adds BOS itself
    assert [-x for x in theirs] == pytest.approx([reference_nll(model, ids, range(1, len(ids))) for ids in doubled], rel=1e-5)
    assert all(-t > ours[i].nll for t, i in zip(theirs, short))  # the extra, unlikely BOS costs nll
