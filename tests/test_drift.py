"""Drift (KL to the base, top-1 agreement) against an independent full-vocabulary computation."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CONTEXT
from gate.cli import main
from gate.errors import RunFailure
from gate.runner.perplexity import (
    DRIFT_EXACT,
    DriftRun,
    NotLinearHead,
    base_output_head,
    head_is_base,
    encode_suite,
    output_head_from_files,
    score_documents,
)
from gate.suites import load_suite


@pytest.fixture(scope="module")
def tokenizer(world):
    return AutoTokenizer.from_pretrained(world.base)


@pytest.fixture(scope="module")
def base_model(world):
    return AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tuned(world):
    base = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    return PeftModel.from_pretrained(base, world.checkpoints / "run-a/checkpoint-4").eval()


U32 = 2.0**-24  # float32's unit roundoff


def kl_tolerance(docs, *models) -> float:
    """Per-token absolute tolerance (nats) of a KL from float32 logits against the float64 reference.

    gate's pass and the independent one are different float32 forward passes (windows batched, or the
    base's logits recomputed for a few rows, against one document alone), so each logit differs by
    summation order. A length-d float32 dot product errs by about sqrt(d) u relative to its terms'
    magnitude (probabilistic rounding-error analysis: Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019;
    the worst case d u is never approached), and every layer adds its own (RMSNorm keeps each layer's
    output at unit scale), so |dx| <= (layers + 1) sqrt(d) u L with L = the largest |logit| + log V
    (which also bounds the logsumexp). A token's KL = sum_v p_v (b_v - c_v) moves by at most
    2 |dx| through each of b and c (d log_softmax(x)_v = dx_v - E_p[dx], so |d log p| <= 2 max |dx|),
    and the weights p_v sum to 1: |dKL| <= 4 |dx|. A document's sum of n tokens: n times that.
    For the tiny model (d = 64, 2 layers, V = 512, |logit| <= ~6) that is ~7e-5 nats per token,
    about 15x the largest difference seen (5e-6) and 1e-4 of a typical document's KL: a wrong formula
    (reversed KL, a missing logsumexp, a dropped term) moves it by far more. Independent of the
    machine's thread count and load, which change only the summation order this bound covers.
    """
    config = models[0].config
    with torch.no_grad():
        largest = max(float(m(torch.tensor([d.input_ids])).logits.abs().max()) for m in models for d in docs)
    magnitude = largest + math.log(config.vocab_size)
    return 4 * (config.num_hidden_layers + 1) * math.sqrt(config.hidden_size) * U32 * magnitude


@pytest.fixture(scope="module")
def tol(world, base_model, tuned, tokenizer) -> float:
    """kl_tolerance for the trained adapter against the base, over the text suite."""
    return kl_tolerance(encode_suite(load_suite("text", world.suites / "text.jsonl"), tokenizer), base_model, tuned)


def score(model, docs, drift, batch_size=4, max_length=CONTEXT):
    return score_documents(
        model, docs, max_length=max_length, stride=max_length // 2, batch_size=batch_size,
        device=torch.device("cpu"), pad_id=0, drift=drift,
    )[0]


def drift_of(base_model, model, docs, k, tokenizer=None, head=None, shared=None, **kw):
    """As the recipe does it: the base captures (with m and s when exact), then the model is compared;
    an adapter that leaves lm_head alone takes the m . h path (``shared``), others recompute the base's logits."""
    capture = DriftRun(k, head=base_output_head(base_model) if k == DRIFT_EXACT else None)
    score(base_model, docs, capture, **kw)
    if k == DRIFT_EXACT and head is None:
        head = base_output_head(model)  # an adapter on (its own copy of) the base
    if shared is None:
        shared = k == DRIFT_EXACT and isinstance(model, PeftModel) and head_is_base(model)
    run = DriftRun(k, reference=capture.captured, tokenizer=tokenizer, head=head, shared_head=shared)
    return score(model, docs, run, **kw), run, capture


def full_distributions(model, ids: list[int]) -> np.ndarray:
    """One document, one plain forward pass, float64 log-softmax over the whole vocabulary."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def independent(base_model, model, doc, k):
    """Per scored token: full KL, the (k+1)-bucket KL and top-1 agreement, from full distributions."""
    lb, lc = full_distributions(base_model, doc.input_ids), full_distributions(model, doc.input_ids)
    full, bucketed, agree = [], [], []
    for p in (p for p, s in enumerate(doc.scored) if s):
        b, c = lb[p - 1], lc[p - 1]
        pb, pc = np.exp(b), np.exp(c)
        full.append(float(np.sum(pb * (b - c))))
        top = np.argsort(-b, kind="stable")[:k]
        rest_b, rest_c = 1 - pb[top].sum(), 1 - pc[top].sum()
        tail = rest_b * (math.log(rest_b) - math.log(rest_c)) if rest_b > 1e-12 else 0.0
        bucketed.append(float(np.sum(pb[top] * (b[top] - c[top])) + tail))
        agree.append(int(np.argmax(b) == np.argmax(c)))
    return np.array(full), np.array(bucketed), np.array(agree)


@pytest.mark.parametrize("k", [1, 4, 32])
def test_bucketed_kl_and_top1_match_an_independent_computation(world, base_model, tuned, tokenizer, k, tol):
    suite = load_suite("text", world.suites / "text.jsonl")
    docs = encode_suite(suite, tokenizer)
    records, run, _ = drift_of(base_model, tuned, docs, k, tokenizer)
    total_full = total_bucketed = 0.0
    for doc, record, token_kl in zip(docs, records, run.token_kl):
        full, bucketed, agree = independent(base_model, tuned, doc, k)
        assert token_kl == pytest.approx(bucketed, rel=0, abs=tol)
        assert record.kl_sum == pytest.approx(bucketed.sum(), rel=0, abs=doc.n_scored * tol)
        assert record.top1_matches == agree.sum()
        assert np.all(token_kl <= full + tol)  # a lower bound of the full KL, token by token
        total_full += full.sum()
        total_bucketed += bucketed.sum()
    assert total_full / sum(d.n_scored for d in docs) > 0.01  # the fine-tune did move (nats per token)
    if k == 32:  # most of the base's mass is in its top 32 of 512 tokens
        assert total_bucketed / total_full > 0.9


def test_with_k_the_whole_vocabulary_the_kl_is_the_full_kl(world, base_model, tuned, tokenizer, tol):
    suite = load_suite("prompt", world.suites / "prompt.jsonl")
    docs = encode_suite(suite, tokenizer)
    vocab = base_model.config.vocab_size
    records, _, _ = drift_of(base_model, tuned, docs, vocab, tokenizer)
    for doc, record in zip(docs, records):
        full, _, _ = independent(base_model, tuned, doc, vocab)
        assert record.kl_sum == pytest.approx(full.sum(), rel=0, abs=doc.n_scored * tol)


def test_windows_line_up_with_the_reference(world, base_model, tokenizer):
    """Long documents, several windows, batches in another order: the base against itself is 0, all agree."""
    suite = load_suite("long", world.suites / "long.jsonl")
    docs = encode_suite(suite, tokenizer)
    assert len(docs[0].input_ids) > CONTEXT
    capture = DriftRun(8)
    score(base_model, docs, capture, batch_size=1)
    run = DriftRun(8, reference=capture.captured, tokenizer=tokenizer)
    records = score(base_model, docs, run, batch_size=1)
    for doc, record in zip(docs, records):
        assert record.kl_sum == pytest.approx(0.0, abs=1e-9)
        assert record.top1_matches == doc.n_scored
        assert record.drifted == []


def test_windowed_documents_match_an_independent_per_window_computation(world, base_model, tuned, tokenizer, tol):
    """Each token of a long document is compared in the window that scores it."""
    from gate.runner.perplexity import make_windows

    suite = load_suite("long", world.suites / "long.jsonl")
    docs = encode_suite(suite, tokenizer)[:1]
    records, run, _ = drift_of(base_model, tuned, docs, 16, tokenizer, batch_size=3)
    expected = []
    for w in make_windows(docs, CONTEXT, CONTEXT // 2):
        lb, lc = full_distributions(base_model, w.input_ids), full_distributions(tuned, w.input_ids)
        for p in (p for p, s in enumerate(w.scored) if s):
            b, c = lb[p - 1], lc[p - 1]
            top = np.argsort(-b)[:16]
            rb, rc = 1 - np.exp(b[top]).sum(), 1 - np.exp(c[top]).sum()
            expected.append(float(np.sum(np.exp(b[top]) * (b[top] - c[top])) + rb * math.log(rb / rc)))
    assert run.token_kl[0] == pytest.approx(np.array(expected), rel=0, abs=tol)
    worst = records[0].drifted
    assert worst and worst[0].kl == pytest.approx(max(expected), rel=0, abs=tol)
    assert [t.kl for t in worst] == sorted((t.kl for t in worst), reverse=True)


def test_reported_tokens_show_context_and_both_top_tokens(world, base_model, tuned, tokenizer):
    suite = load_suite("text", world.suites / "text.jsonl")
    docs = encode_suite(suite, tokenizer)
    records, run, capture = drift_of(base_model, tuned, docs, 32, tokenizer)
    doc, record = docs[0], records[0]
    lb, lc = full_distributions(base_model, doc.input_ids), full_distributions(tuned, doc.input_ids)
    positions = [p for p, s in enumerate(doc.scored) if s]
    top = record.drifted[0]
    p = positions[top.index]
    assert top.kl == pytest.approx(run.token_kl[0].max(), rel=1e-9)
    assert top.token == tokenizer.decode([doc.input_ids[p]])
    assert top.base_top == tokenizer.decode([int(np.argmax(lb[p - 1]))])
    assert top.checkpoint_top == tokenizer.decode([int(np.argmax(lc[p - 1]))])
    assert top.before == tokenizer.decode(doc.input_ids[max(0, p - 8) : p])


def test_non_finite_log_probabilities_fail_instead_of_being_averaged(world, base_model, tokenizer):
    suite = load_suite("text", world.suites / "text.jsonl")
    docs = encode_suite(suite, tokenizer)
    capture = DriftRun(8)
    score(base_model, docs, capture)
    broken = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32).eval()
    with torch.no_grad():
        broken.lm_head.weight[3].fill_(math.inf)  # one token's logit is infinite: NaN log-probabilities
    with pytest.raises(RunFailure, match="non-finite"):
        score(broken, docs, DriftRun(8, reference=capture.captured, tokenizer=tokenizer))


# --- the exact method: the base's hidden states, the full vocabulary -----------------------------


def assert_exact(base_model, model, docs, records, run):
    """gate's per-token KL, kl_sum and top-1 counts against the float64 full-vocabulary computation,
    within the float32 tolerance of kl_tolerance (per token; n times that for a sum of n tokens)."""
    tol = kl_tolerance(docs, base_model, model)
    total = gate_total = 0.0
    for doc, record, token_kl in zip(docs, records, run.token_kl):
        full, _, agree = independent(base_model, model, doc, 1)
        assert token_kl == pytest.approx(full, rel=0, abs=tol)
        assert record.kl_sum == pytest.approx(full.sum(), rel=0, abs=doc.n_scored * tol)
        assert record.top1_matches == agree.sum()
        total += full.sum()
        gate_total += record.kl_sum
    assert gate_total == pytest.approx(total, rel=0, abs=sum(d.n_scored for d in docs) * tol)
    return total / sum(d.n_scored for d in docs)


def test_exact_kl_is_the_full_kl_for_a_trained_adapter(world, base_model, tuned, tokenizer):
    docs = encode_suite(load_suite("text", world.suites / "text.jsonl"), tokenizer)
    records, run, capture = drift_of(base_model, tuned, docs, DRIFT_EXACT, tokenizer)
    assert run.shared_head and capture.captured[0].expected is not None  # the m . h path
    assert capture.captured[0].hidden.dtype == torch.float32
    assert capture.captured[0].hidden.shape == (docs[0].n_scored, base_model.config.hidden_size)
    assert assert_exact(base_model, tuned, docs, records, run) > 0.01  # the fine-tune did move
    # Where top-k's buckets miss mass, the exact KL is the larger: top-4's lower bound is well below it.
    bucketed, _, _ = drift_of(base_model, tuned, docs, 4, tokenizer)
    assert sum(r.kl_sum for r in bucketed) < 0.95 * sum(r.kl_sum for r in records)


def test_the_two_exact_paths_agree(world, base_model, tuned, tokenizer, tol):
    """m . h (the adapter shares the base's lm_head) and the recomputed base logits give one KL and top-1."""
    docs = encode_suite(load_suite("text", world.suites / "text.jsonl"), tokenizer)
    fast, fast_run, capture = drift_of(base_model, tuned, docs, DRIFT_EXACT, tokenizer)
    slow, slow_run, _ = drift_of(base_model, tuned, docs, DRIFT_EXACT, tokenizer, shared=False)
    assert fast_run.shared_head and not slow_run.shared_head
    for a, b, ka, kb in zip(fast, slow, fast_run.token_kl, slow_run.token_kl):
        assert ka == pytest.approx(kb, rel=0, abs=tol)
        assert a.kl_sum == pytest.approx(b.kl_sum, rel=0, abs=len(ka) * tol)
        assert a.top1_matches == b.top1_matches
    # s and m as stored: s = m . h_b - logsumexp(base logits), m = W^T softmax(base logits).
    ref, doc = capture.captured[0], docs[0]
    with torch.no_grad():
        logits = base_model(torch.tensor([doc.input_ids])).logits[0].double()
    rows = [p - 1 for p, s in enumerate(doc.scored) if s]
    p = torch.softmax(logits[rows], dim=-1)
    m = (p @ base_model.lm_head.weight.detach().double())
    assert ref.expected == pytest.approx(m.numpy(), rel=1e-4, abs=1e-6)
    s = (torch.from_numpy(ref.expected).double() * ref.hidden.double()).sum(-1) - torch.logsumexp(logits[rows], -1)
    assert ref.offset == pytest.approx(s.numpy(), rel=1e-6, abs=1e-5)
    assert list(ref.top) == logits[rows].argmax(-1).tolist()


def test_exact_kl_over_windows_and_batches_in_another_order(world, base_model, tuned, tokenizer, tol):
    docs = encode_suite(load_suite("long", world.suites / "long.jsonl"), tokenizer)[:1]
    records, run, _ = drift_of(base_model, tuned, docs, DRIFT_EXACT, tokenizer, batch_size=3)
    from gate.runner.perplexity import make_windows

    expected = []
    for w in make_windows(docs, CONTEXT, CONTEXT // 2):
        lb, lc = full_distributions(base_model, w.input_ids), full_distributions(tuned, w.input_ids)
        expected += [float(np.sum(np.exp(lb[p - 1]) * (lb[p - 1] - lc[p - 1]))) for p, s in enumerate(w.scored) if s]
    assert run.token_kl[0] == pytest.approx(np.array(expected), rel=0, abs=tol)
    assert run.token_kl[0].sum() == pytest.approx(sum(expected), rel=0, abs=len(expected) * tol)
    worst = records[0].drifted[0]
    assert worst.kl == pytest.approx(max(expected), rel=0, abs=tol)


def noisy_adapter(world, tmp_path, **lora):
    """A LoRA adapter with random A and B (noise over the whole vocabulary), attached to a fresh base."""
    from gate.train.tiny import save_adapter

    path = save_adapter(world.base, tmp_path / "noisy", seed=3, **lora)
    base = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    return PeftModel.from_pretrained(base, path).eval()


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["q_proj", "v_proj", "down_proj"]},
        {"target_modules": ["q_proj", "lm_head"]},  # LoRA on lm_head: the base's weights are its base_layer
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},  # a trained copy of lm_head
    ],
    ids=["noise", "lora-lm_head", "modules_to_save-lm_head"],
)
def test_exact_kl_for_noise_like_adapters_and_a_retrained_lm_head(world, base_model, tokenizer, tmp_path, lora):
    model = noisy_adapter(world, tmp_path, **lora)
    if "modules_to_save" in lora:
        with torch.no_grad():  # the adapter's own copy of lm_head moves; the base's must not be used for it
            copy = model.base_model.model.lm_head.modules_to_save["default"]
            copy.weight.add_(0.05 * torch.randn_like(copy.weight))
    head = base_output_head(model)
    assert torch.equal(head.weight, base_model.lm_head.weight)  # the base's own, not the adapter's
    docs = encode_suite(load_suite("text", world.suites / "text.jsonl"), tokenizer)
    records, run, _ = drift_of(base_model, model, docs, DRIFT_EXACT, tokenizer, head=head)
    assert assert_exact(base_model, model, docs, records, run) > 1e-3


def test_exact_kl_of_a_full_checkpoint_with_rounded_weights(world, base_model, tokenizer, tmp_path):
    """Rounded weights (noise spread over the vocabulary: 8-bit floats, as bfloat16 is to SmolLM2 but
    strong enough to move the tiny model), a full checkpoint: the base's lm_head is read from the
    base's safetensors, the base itself not in memory."""
    rounded = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(torch.float8_e4m3fn).float())
    head = output_head_from_files(world.base, torch.float32, torch.device("cpu"))
    assert torch.equal(head.weight, base_model.lm_head.weight) and head.bias is None
    docs = encode_suite(load_suite("text", world.suites / "text.jsonl"), tokenizer)
    records, run, _ = drift_of(base_model, rounded, docs, DRIFT_EXACT, tokenizer, head=head)
    assert assert_exact(base_model, rounded, docs, records, run) > 1e-3
    # Noise over the whole vocabulary is what top-k misses: its bound falls short (by 5% at 32 of 512 tokens).
    bucketed, _, _ = drift_of(base_model, rounded, docs, 32, tokenizer)
    assert sum(r.kl_sum for r in bucketed) < 0.99 * sum(r.kl_sum for r in records)


def test_output_head_from_files_with_tied_embeddings(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float32)
    head = output_head_from_files(tmp_path / "tied", torch.bfloat16, torch.device("cpu"))
    assert head.weight.dtype == torch.bfloat16
    assert torch.equal(head.weight, model.get_input_embeddings().weight.to(torch.bfloat16))


def test_exact_drift_of_an_untrained_adapter_is_zero(world, base_model, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    untrained = PeftModel.from_pretrained(base, world.checkpoints / "untrained").eval()
    docs = encode_suite(load_suite("long", world.suites / "long.jsonl"), tokenizer)
    records, run, _ = drift_of(base_model, untrained, docs, DRIFT_EXACT, tokenizer, batch_size=1)
    for doc, record, kl in zip(docs, records, run.token_kl):
        assert np.all(kl <= 1e-6)  # the same logits up to the matmul's rounding
        assert record.top1_matches == doc.n_scored


def test_exact_capture_refuses_logits_that_are_not_lm_head(world, tokenizer):
    """Gemma 2 soft-caps its final logits: they are not lm_head(h), so the exact method cannot recompute them."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    docs = encode_suite(load_suite("text", world.suites / "text.jsonl"), tokenizer)
    with pytest.raises(NotLinearHead):
        score(model, docs, DriftRun(DRIFT_EXACT))
    score(model, docs, DriftRun(8))  # top-k works on the model's own logits
    config.final_logit_softcapping = None
    score(Gemma2ForCausalLM(config).eval(), docs, DriftRun(DRIFT_EXACT))  # without soft-capping: accepted


def test_exact_non_finite_log_probabilities_fail(world, base_model, tokenizer):
    docs = encode_suite(load_suite("text", world.suites / "text.jsonl"), tokenizer)
    capture = DriftRun(DRIFT_EXACT)
    score(base_model, docs, capture)
    broken = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32).eval()
    with torch.no_grad():
        broken.lm_head.weight[3].fill_(math.inf)
    with pytest.raises(RunFailure, match="non-finite"):
        score(broken, docs, DriftRun(DRIFT_EXACT, reference=capture.captured, head=base_output_head(base_model)))


# --- through `gate run` and `gate check` ---------------------------------------------------------


def write_config(world, path, extra="", suite_extra="", gates=""):
    path.write_text(
        f"base: {world.base}\n{extra}"
        "suites:\n"
        f"  - {{name: text, path: {world.suites / 'text.jsonl'}{suite_extra}}}\n"
        f"  - {{name: long, path: {world.suites / 'long.jsonl'}}}\n"
        + gates
    )
    return path


def run_gate(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


DRIFT_GATES = (
    "gates:\n"
    "  - {suite: text, metric: perplexity, max_increase: 50%}\n"
    "  - {suite: text, metric: kl, max: 0.05, min_items: 5}\n"
    "  - {suite: text, metric: top1, min: 0.9, min_items: 5}\n"
)
# min_items: the text suite has 13 documents, below the bootstrap's default minimum of 20.


@pytest.fixture(scope="module")
def drift_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("drift-run")
    config = write_config(world, out / "gate.yaml", suite_extra=", drift: true, drift_k: 16", gates=DRIFT_GATES)
    result = run_gate("run", world.checkpoints, "--config", config, "--out", out / "reports")
    return out, config, result


def test_run_reports_drift_per_checkpoint(drift_run, world, base_model, tuned, tokenizer, tol):
    out, _, result = drift_run
    assert result.exit_code in (0, 1), result.output
    results = json.loads((out / "reports/results.json").read_text())
    assert {s["name"]: s["drift_k"] for s in results["suites"]} == {"text": 16, "long": None}
    assert "kl" not in results["base"]["scores"]["text"]
    by_name = {c["name"]: c for c in results["checkpoints"]}
    untrained = by_name["untrained"]["scores"]["text"]
    assert untrained["kl"] == 0.0 and untrained["top1"] == 1.0  # B = 0: the base itself
    assert "kl" not in by_name["untrained"]["scores"]["long"]
    trained = by_name["run-a/checkpoint-4"]["scores"]["text"]
    docs = encode_suite(load_suite("text", world.suites / "text.jsonl", drift_k=16), tokenizer)
    expected = [independent(base_model, tuned, d, 16) for d in docs]
    tokens = sum(d.n_scored for d in docs)
    assert trained["kl"] == pytest.approx(sum(e[1].sum() for e in expected) / tokens, rel=0, abs=tol)  # nats per token
    assert trained["top1"] == pytest.approx(sum(e[2].sum() for e in expected) / tokens)
    per_token = np.concatenate([e[1] for e in expected])
    assert trained["drift"] == {"k": 16, "kl_p99": pytest.approx(float(np.percentile(per_token, 99)), rel=0, abs=tol)}
    for doc in trained["documents"]:
        assert {"kl_sum", "top1_matches", "drifted"} <= set(doc)


def test_drift_gates_decide_as_floors(drift_run):
    out, _, _ = drift_run
    verdict = json.loads((out / "reports/verdict.json").read_text())
    checks = {(c["name"], k["metric"]): k for c in verdict["checkpoints"] for k in c["checks"]}
    # The untrained adapter is the base: zero KL and full agreement on every document. A floor
    # certifies nothing from a sample without spread (degenerate), so it is inconclusive, never a pass.
    for metric in ("kl", "top1"):
        assert checks[("untrained", metric)]["outcome"] == "inconclusive" and checks[("untrained", metric)]["degenerate"]
    for metric in ("kl", "top1"):
        assert checks[("untrained", metric)]["kind"] == "floor"
    summary = (out / "reports/summary.md").read_text()
    assert "text.kl max 0.05" in summary and "text.top1 min 0.9" in summary


def test_check_applies_drift_gates_without_a_model(drift_run, world, tmp_path):
    out, _, _ = drift_run
    results = json.loads((out / "reports/results.json").read_text())
    trained = {c["name"]: c["scores"]["text"] for c in results["checkpoints"]}["run-a/checkpoint-4"]
    strict = write_config(
        world, tmp_path / "strict.yaml", suite_extra=", drift: true, drift_k: 16",
        gates=f"gates:\n  - {{suite: text, metric: kl, max: {trained['kl'] / 100}, min_items: 5}}\n",
    )
    reports = tmp_path / "reports"
    shutil.copytree(out / "reports", reports)
    result = run_gate("check", reports, "--config", strict)
    assert result.exit_code == 1, result.output  # nothing may ship (the untrained adapter: no spread to certify)
    verdict = json.loads((reports / "verdict.json").read_text())
    outcome = {c["name"]: c["checks"][0]["outcome"] for c in verdict["checkpoints"]}
    assert outcome["run-a/checkpoint-4"] == "fail"
    assert outcome["untrained"] == "inconclusive"


def test_rerun_reuses_drift_and_the_key_names_the_base_score(drift_run, world):
    out, config, _ = drift_run
    again = run_gate("run", world.checkpoints, "--config", config, "--out", out / "reports")
    assert again.exit_code in (0, 1)
    import sqlite3

    conn = sqlite3.connect(out / "reports/gate.sqlite")
    identities = [json.loads(r[0]) for r in conn.execute("SELECT identity_json FROM suite_scores")]
    base_keys = {r[0] for r in conn.execute("SELECT score_key FROM drift_references")}
    assert len(base_keys) == 1
    refs = [i["settings"].get("drift_reference") for i in identities if "drift_reference" in i["settings"]]
    assert len(refs) == 3 and set(refs) == base_keys  # every checkpoint's drift names the base's score
    references = conn.execute("SELECT k, length(logprobs), length(indices), length(rest) FROM drift_references").fetchall()
    for k, lp, ix, rest in references:
        assert (k, lp, ix) == (16, rest // 8 * 16 * 4, rest // 8 * 16 * 4)


@pytest.fixture(scope="module")
def exact_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("exact-run")
    config = write_config(world, out / "gate.yaml", extra="drift: true\n")
    result = run_gate("run", world.checkpoints, "--config", config, "--out", out / "reports")
    return out, config, result


def test_run_with_drift_true_is_exact(exact_run, world, base_model, tuned, tokenizer, tol):
    out, _, result = exact_run
    assert result.exit_code in (0, 1), result.output
    results = json.loads((out / "reports/results.json").read_text())
    assert {s["name"]: s["drift_k"] for s in results["suites"]} == {"text": 0, "long": 0}
    by_name = {c["name"]: c for c in results["checkpoints"]}
    untrained = by_name["untrained"]["scores"]["text"]
    assert untrained["kl"] <= 1e-6 and untrained["top1"] == 1.0
    trained = by_name["run-a/checkpoint-4"]["scores"]["text"]
    docs = encode_suite(load_suite("text", world.suites / "text.jsonl"), tokenizer)
    expected = [independent(base_model, tuned, d, 1) for d in docs]
    tokens = sum(d.n_scored for d in docs)
    assert trained["kl"] == pytest.approx(sum(e[0].sum() for e in expected) / tokens, rel=0, abs=tol)  # nats per token
    assert trained["top1"] == pytest.approx(sum(e[2].sum() for e in expected) / tokens)
    per_token = np.concatenate([e[0] for e in expected])
    assert trained["drift"] == {"k": 0, "kl_p99": pytest.approx(float(np.percentile(per_token, 99)), rel=0, abs=tol)}
    for doc, e in zip(trained["documents"], expected):  # per-document sums: what the bootstrap resamples
        assert doc["kl_sum"] == pytest.approx(e[0].sum(), rel=0, abs=len(e[0]) * tol)
        assert doc["top1_matches"] == e[2].sum()
    html = (out / "reports/report.html").read_text()
    assert "drift exact" in html


def test_exact_rerun_reuses_the_hidden_states_and_scores(exact_run, world, drift_run):
    import sqlite3

    out, config, _ = exact_run
    store = out / "reports/gate.sqlite"
    before = sqlite3.connect(store).execute("SELECT key, created_at FROM suite_scores ORDER BY key").fetchall()
    again = run_gate("run", world.checkpoints, "--config", config, "--out", out / "reports")
    assert again.exit_code in (0, 1)
    conn = sqlite3.connect(store)
    assert conn.execute("SELECT key, created_at FROM suite_scores ORDER BY key").fetchall() == before  # nothing rescored
    width = AutoModelForCausalLM.from_pretrained(world.base).config.hidden_size
    hidden = conn.execute(
        "SELECT h.dtype, h.width, length(h.hidden), d.tokens FROM drift_hidden h JOIN document_scores d "
        "ON d.score_key = h.score_key AND d.position = h.position"
    ).fetchall()
    assert len(hidden) == conn.execute("SELECT COUNT(*) FROM drift_hidden").fetchone()[0] > 0
    # Per token: the hidden state (float32), m (float32), s (float64) and the base's top-1 (int32).
    assert all((dtype, w, size) == ("float32+expected", width, tokens * (8 * width + 12)) for dtype, w, size, tokens in hidden)
    assert conn.execute("SELECT COUNT(*) FROM drift_references").fetchone() == (0,)
    base_keys = {r[0] for r in conn.execute("SELECT DISTINCT score_key FROM drift_hidden")}
    refs = [json.loads(r[0])["settings"].get("drift_reference") for r in conn.execute("SELECT identity_json FROM suite_scores")]
    assert len(base_keys) == 2 and set(filter(None, refs)) == base_keys  # each checkpoint's drift names the base score
    # The method is part of the key: the top-k run (drift_k 16) has other base scores for suite text.
    topk = sqlite3.connect(drift_run[0] / "reports/gate.sqlite")
    assert not {r[0] for r in topk.execute("SELECT score_key FROM drift_references")} & base_keys


def test_exact_drift_refuses_a_base_with_soft_capped_logits(world, tmp_path):
    base = tmp_path / "capped"
    shutil.copytree(world.base, base)
    config_json = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config_json, "final_logit_softcapping": 30.0}))
    config = tmp_path / "gate.yaml"
    config.write_text(f"base: {base}\ndrift: true\nsuites:\n  - {{name: text, path: {world.suites / 'text.jsonl'}}}\n")
    result = run_gate("run", world.checkpoints, "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "suite 'text': exact drift recomputes the base's logits as lm_head(hidden state)" in result.output
    assert "its config.json sets final_logit_softcapping" in result.output and "set `drift_k: 32`" in result.output


def test_drift_gate_on_a_suite_without_drift_is_bad_input(world, tmp_path):
    config = write_config(world, tmp_path / "gate.yaml", gates="gates:\n  - {suite: long, metric: kl, max: 0.05}\n")
    result = run_gate("run", world.checkpoints, "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "gates[0]: metric 'kl' is drift from the base, and suite 'long' does not measure it" in result.output


def test_drift_gate_must_be_a_floor(world, tmp_path):
    config = write_config(
        world, tmp_path / "gate.yaml", extra="drift: true\n", gates="gates:\n  - {suite: text, metric: kl, max_increase: 5%}\n"
    )
    result = run_gate("run", world.checkpoints, "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "gate it as a floor, e.g. max: 0.05" in result.output


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_is_bad_input(world, tmp_path, k):
    config = write_config(world, tmp_path / "gate.yaml", suite_extra=f", drift_k: {k}")
    result = run_gate("run", world.checkpoints, "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert f"drift_k: must be at least 1 (the size of the base's top-k reference), not {k}" in result.output


def test_k_above_the_vocabulary_is_bad_input(world, tmp_path, base_model):
    vocab = base_model.config.vocab_size
    config = write_config(world, tmp_path / "gate.yaml", extra=f"drift_k: {vocab + 1}\n")
    result = run_gate("run", world.checkpoints, "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert f"drift_k {vocab + 1} exceeds the base's vocabulary ({vocab} tokens); lower drift_k" in result.output


def test_drift_on_a_checkpoint_with_another_vocabulary_is_bad_input(world, tmp_path):
    """Full checkpoints: a copy of the base drifts by exactly 0; one with resized embeddings is refused."""
    run = tmp_path / "full-run"
    shutil.copytree(world.base, run / "checkpoint-1")
    resized = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    resized.resize_token_embeddings(resized.config.vocab_size + 8)
    resized.save_pretrained(run / "checkpoint-2")
    AutoTokenizer.from_pretrained(world.base).save_pretrained(run / "checkpoint-2")
    config = write_config(world, tmp_path / "gate.yaml", extra="drift: true\n")
    result = run_gate("run", run, "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    results = json.loads((tmp_path / "out/results.json").read_text())
    same, other = results["checkpoints"]
    assert same["scores"]["text"]["kl"] == 0.0 and same["scores"]["long"]["top1"] == 1.0
    assert other["status"] == "error" and other["error_code"] == 2
    vocab = AutoModelForCausalLM.from_pretrained(world.base).config.vocab_size
    assert f"its vocabulary has {vocab + 8} tokens but the base's has {vocab}" in other["reason"]


def test_reports_show_drift_by_step_and_where_it_moved(drift_run, world, tmp_path):
    """Without drift gates, summary.md still lists kl and top1, and report.html plots them by step and
    shows, per checkpoint, the documents and tokens that moved most."""
    out, _, _ = drift_run
    reports = tmp_path / "reports"
    shutil.copytree(out / "reports", reports)
    plain = write_config(
        world, tmp_path / "plain.yaml", suite_extra=", drift: true, drift_k: 16",
        gates="gates:\n  - {suite: text, metric: perplexity, max_increase: 50%}\n",
    )
    assert run_gate("check", reports, "--config", plain).exit_code == 1  # 13 tiny documents: too small, no candidate
    results = json.loads((reports / "results.json").read_text())
    trained = {c["name"]: c["scores"]["text"] for c in results["checkpoints"]}["run-a/checkpoint-4"]
    summary = (reports / "summary.md").read_text()
    assert "| text kl | text top1 |" in summary
    assert f"| {trained['kl']:.4g} | {trained['top1']:.1%} |" in summary
    html = (reports / "report.html").read_text()
    assert "text: KL(base ‖ checkpoint) per token, nats by training step" in html
    assert "text: top-1 agreement with the base by training step" in html
    assert "text: documents where the predictions moved most from the base's" in html
    worst = max(trained["documents"], key=lambda d: d["kl_sum"] / d["tokens"])
    assert f"<code>{worst['id']}</code>" in html
    token = worst["drifted"][0]
    assert f"{token['kl']:.3f}</li>" in html


def test_check_refuses_a_drift_gate_on_results_scored_without_drift(drift_run, world, tmp_path):
    out, _, _ = drift_run
    reports = tmp_path / "reports"
    shutil.copytree(out / "reports", reports)
    config = write_config(world, tmp_path / "gate.yaml", extra="drift: true\n", gates="gates:\n  - {suite: long, metric: top1, min: 0.9}\n")
    result = run_gate("check", reports, "--config", config)
    assert result.exit_code == 2, result.output
    assert "suite 'long' was scored without drift, so it has no 'top1'; add `drift: true` to it and re-run `gate run`" in result.output


# --- the drift floors' statistics, by simulation (documents drawn from a population) -------------


def _drift_results(kl_sums, matches, tokens):
    from gate.results import DocumentScore, Drift, ModelResult, Results, RunSettings, SuiteInfo, SuiteScore

    def docs(with_drift):
        return [
            DocumentScore(f"d{i}", 2.0 * t, int(t), 4 * int(t), *((float(kl), int(m)) if with_drift else ()))
            for i, (kl, m, t) in enumerate(zip(kl_sums, matches, tokens))
        ]

    base = ModelResult("base", "base", "base", scores={"s": SuiteScore.from_documents("s", docs(False))})
    ckpt = ModelResult("c", "lora", "c", step=1, scores={"s": SuiteScore.from_documents("s", docs(True), Drift(16, 0.0))})
    suite = SuiteInfo("s", "perplexity", "", "", "", len(tokens), True, drift_k=16)
    return Results(1, "0", "", "", {}, RunSettings("cpu", "float32", 8, 128, 64, "ppl-1", "t"), base, [ckpt], [suite])


def _simulate(metric, limit, truth, reps=250, n=150, seed=21):
    """Outcomes of one drift floor over repeated draws of n documents whose population value is ``truth``."""
    from gate.config import Gate, Policy
    from gate.policy import evaluate

    rng = np.random.default_rng(seed)
    gate = Gate("s", metric, "max" if metric == "kl" else "min", limit)
    outcomes = []
    for _ in range(reps):
        tokens = rng.integers(20, 200, n)
        if metric == "kl":  # skewed per-document KL per token, independent of length: population ratio = truth
            per_token = rng.gamma(2.0, truth / 2.0, n)
            kl, matches = per_token * tokens, tokens
        else:  # per-document agreement rates around truth, then binomial tokens
            rate = rng.beta(truth * 20, (1 - truth) * 20, n)
            kl, matches = np.zeros(n), rng.binomial(tokens, rate)
        verdict = evaluate(Policy([gate], bootstrap_iterations=1000), _drift_results(kl, matches, tokens), rng)
        outcomes.append(verdict.checkpoints[0].checks[0].outcome)
    return np.array(outcomes)


@pytest.mark.parametrize("metric,limit", [("kl", 0.05), ("top1", 0.9)])
def test_simulation_drift_at_the_limit_rarely_passes(metric, limit):
    """Population drift exactly at the limit: the floor passes at most about alpha of the time."""
    outcomes = _simulate(metric, limit, truth=limit)
    alpha, reps = 0.05, len(outcomes)
    assert (outcomes == "pass").mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)


@pytest.mark.parametrize("metric,limit,truth", [("kl", 0.05, 0.035), ("top1", 0.9, 0.93)])
def test_simulation_drift_well_inside_the_limit_passes_and_well_outside_fails(metric, limit, truth):
    inside = _simulate(metric, limit, truth, reps=60)
    assert (inside == "pass").mean() >= 0.8 and (inside == "fail").sum() == 0
    outside = _simulate(metric, limit, 2 * limit - truth, reps=60)
    assert (outside == "fail").mean() >= 0.8 and (outside == "pass").sum() == 0


def test_exact_kl_counts_tokens_the_base_rules_out_as_zero():
    """A base logit of -inf (p = 0): 0 log 0 = 0 whatever the checkpoint says; a NaN from the checkpoint stays NaN."""
    from gate.runner.perplexity import _compare_exact

    base = torch.tensor([[2.0, 1.0, -math.inf, 0.5], [0.1, 0.2, 0.3, 0.4]])
    logp = torch.log_softmax(torch.tensor([[1.0, 1.5, 3.0, 0.0], [0.0, 0.0, 0.0, math.nan]]), dim=-1)
    kl, match, top, base_top = _compare_exact(logp, base)
    b = torch.log_softmax(base[0].double(), dim=-1)[:2].tolist() + [None, torch.log_softmax(base[0].double(), -1)[3].item()]
    c = logp[0].double().tolist()
    expected = sum(math.exp(bi) * (bi - ci) for bi, ci in zip(b, c) if bi is not None)
    assert kl[0].item() == pytest.approx(expected, rel=1e-6)
    assert math.isnan(kl[1].item())
    assert base_top.tolist()[0] == 0 and top.tolist()[0] == 2 and not match[0]
