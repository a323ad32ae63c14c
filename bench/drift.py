"""Drift on a real model: gate's KL (exact, and top-k) against the full-vocabulary KL, and what drift costs.

    python bench/drift.py                   # SmolLM2-135M-Instruct on 10 wikitext-2 paragraphs (CPU here)
    python bench/drift.py --model tiny      # quick
    python bench/drift.py --k 8 --k 32 --k 128 --documents 30

For each model that moved from the base (the base with bfloat16-rounded weights: noise over the whole
vocabulary; LoRA adapters with random B at two strengths) it prints, side by side in one run:

* the mean KL(base || model) per token over the vocabulary, computed independently (one document at
  a time, float64 log-softmax of both models' full distributions), gate's exact KL (the default:
  the base's stored hidden states, its logits recomputed with its lm_head) and gate's (k+1)-bucket
  KL from the stored top-k reference, each with its relative error (full - gate) / full
  (target < 2% at the default); top-1 agreement (gate's must equal the independent count);
* the cost of scoring a checkpoint with drift against scoring it without (target <= 1.25x), and of
  scoring the base while capturing its reference against scoring it plainly, for both methods
  (interleaved repeats, the fastest of each kept);
* storage of the reference per million scored tokens, for both methods.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, device_note, known_good_documents, smollm2_base, tiny_base, wikitext_documents  # noqa: E402

STRENGTHS = {"gentle": (0.004, ("q_proj", "v_proj")), "strong": (0.01, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"))}


def make_adapter(base: Path, folder: Path, std: float, targets: tuple[str, ...], seed: int = 0) -> Path:
    """A LoRA adapter with random B (std) on the given modules: a checkpoint that moved from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (folder / "adapter_model.safetensors").is_file():
        return folder
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)
    peft_model.save_pretrained(folder)
    return folder


def full_kl(base, model, docs, device) -> tuple[float, int, int]:
    """Independent: summed full-vocabulary KL over scored tokens, top-1 agreements, tokens."""
    import torch

    total, agree, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for doc in docs:
            ids = torch.tensor([doc.input_ids], device=device)
            lb = torch.log_softmax(base(ids).logits[0].double(), dim=-1)
            lc = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            rows = torch.tensor([p - 1 for p, s in enumerate(doc.scored) if s], device=device)
            b, c = lb[rows], lc[rows]
            total += float((b.exp() * (b - c)).sum())
            agree += int((b.argmax(-1) == c.argmax(-1)).sum())
            tokens += len(rows)
    return total, agree, tokens


def timed(fn, device) -> float:
    import torch

    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gate.runner.perplexity import DRIFT_EXACT, DriftRun, base_output_head, encode_suite, head_is_base, score_documents
    from gate.suites import load_suite

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model folder")
    parser.add_argument("--documents", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=256, help="documents longer than this (in tokens) are left out")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--k", type=int, action="append", help="top-k sizes (default 32)")
    parser.add_argument("--adapters", default="gentle", help="comma-separated: gentle, strong ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ks = args.k or [32]
    RECOMPUTE = -1  # the exact method forced to recompute the base's logits (as for LoRA on lm_head, full checkpoints)
    methods = [DRIFT_EXACT, RECOMPUTE, *ks]
    label = lambda m: {DRIFT_EXACT: "exact", RECOMPUTE: "exact-recompute"}.get(m, f"k={m}")  # noqa: E731

    path = {"smollm2": smollm2_base, "tiny": tiny_base}.get(args.model, lambda: Path(args.model))()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = wikitext_documents(4 * args.documents, 40, 180) or known_good_documents(4 * args.documents)
    texts = [t for t in texts if len(tokenizer(t, add_special_tokens=False)["input_ids"]) < args.max_length][: args.documents]
    folder = CACHE / f"drift-{path.name}"
    folder.mkdir(parents=True, exist_ok=True)
    suite_file = folder / "docs.jsonl"
    suite_file.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    docs = encode_suite(load_suite("bench", suite_file), tokenizer)
    n_tokens = sum(d.n_scored for d in docs)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    score = lambda model, drift=None: score_documents(  # noqa: E731
        model, docs, max_length=args.max_length, stride=args.max_length // 2, batch_size=args.batch_size,
        device=device, pad_id=pad, drift=drift,
    )[0]
    lm_head = sum(p.numel() for p in base.get_output_embeddings().parameters())
    params = sum(p.numel() for p in base.parameters())
    print(
        f"model: {path.name} ({base.config.vocab_size} tokens of vocabulary, hidden size {base.config.hidden_size}, "
        f"lm_head {lm_head / params:.0%} of {params / 1e6:.0f}M parameters), {len(docs)} documents, {n_tokens} scored tokens"
    )
    print(device_note())

    references = {}
    kind = lambda m: DRIFT_EXACT if m == RECOMPUTE else m  # noqa: E731
    capture_run = lambda m: DriftRun(kind(m), head=base_output_head(base) if kind(m) == DRIFT_EXACT else None)  # noqa: E731
    for m in methods:
        if m != RECOMPUTE:
            capture = capture_run(m)
            score(base, capture)
            references[m] = capture.captured
    references[RECOMPUTE] = references[DRIFT_EXACT]

    def checkpoint_run(m, model):
        # As gate runs it: an adapter that leaves lm_head alone takes the m . h path; otherwise the base's
        # logits are recomputed with the base's lm_head (base in memory here).
        head = base_output_head(base) if kind(m) == DRIFT_EXACT else None
        shared = m == DRIFT_EXACT and isinstance(model, PeftModel) and head_is_base(model)
        return DriftRun(kind(m), reference=references[m], tokenizer=tokenizer, head=head, shared_head=shared)

    print("\naccuracy (mean nats per token; relative error = (full - gate) / full)")
    print(f"{'model':<10} {'full KL':>10} " + " ".join(f"{label(m):>10} {'rel.err':>8}" for m in methods) + f" {'top1':>8}")
    names = ["base-bf16", *[a for a in args.adapters.split(",") if a]]
    models = {}
    errors = {m: 0.0 for m in methods}
    for name in names:
        if name == "base-bf16":  # the base against itself with bf16-rounded weights: numerical noise
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(torch.bfloat16).float().to(device).eval()
        else:
            std, targets = STRENGTHS[name]
            adapter = make_adapter(path, folder / f"adapter-{name}", std, tuple(t for t in targets if hasattr_module(base, t)))
            base_copy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            model = PeftModel.from_pretrained(base_copy, adapter).to(device).eval()
        models[name] = model
        total, agree, tokens = full_kl(base, model, docs, device)
        cells = []
        for m in methods:
            records = score(model, checkpoint_run(m, model))
            kl = sum(r.kl_sum for r in records)
            matches = sum(r.top1_matches for r in records)
            assert matches == agree, f"{label(m)}: top-1 agreement differs: gate {matches}, independent {agree}"
            errors[m] = max(errors[m], abs(total - kl) / total)
            cells.append(f"{kl / tokens:>10.6f} {(total - kl) / total:>8.3%}")
        print(f"{name:<10} {total / tokens:>10.6f} " + " ".join(cells) + f" {agree / tokens:>8.1%}")

    model = models[names[-1]]
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so that machine load hits every side alike
        for m in methods:
            times.setdefault("checkpoint", []).append(timed(lambda: score(model), device))
            times.setdefault(f"checkpoint {label(m)}", []).append(timed(lambda: score(model, checkpoint_run(m, model)), device))
            times.setdefault("base", []).append(timed(lambda: score(base), device))
            times.setdefault(f"base {label(m)}", []).append(timed(lambda: score(base, capture_run(m)), device))
    best = {key: min(values) for key, values in times.items()}
    print(f"\ncost on {names[-1]} (fastest of {args.repeats} interleaved repeats; without drift: checkpoint "
          f"{best['checkpoint']:.2f} s, base {best['base']:.2f} s)")
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    for m in methods:
        # Per repeat, each side against the plain pass run just before it: robust to load that changes between repeats.
        j, n = methods.index(m), len(methods)
        pairs = {side: [d / p for d, p in zip(times[f"{side} {label(m)}"], times[side][j::n])] for side in ("checkpoint", "base")}
        print(
            f"{label(m):<6} checkpoint with drift {best[f'checkpoint {label(m)}']:.2f} s: "
            f"{best[f'checkpoint {label(m)}'] / best['checkpoint']:.2f}x (target <= 1.25x; median of per-repeat ratios "
            f"{median(pairs['checkpoint']):.2f}x); base capturing {best[f'base {label(m)}']:.2f} s: "
            f"{best[f'base {label(m)}'] / best['base']:.2f}x (median {median(pairs['base']):.2f}x)"
        )
    print("all timings (s): " + "; ".join(f"{key} " + " ".join(f"{t:.2f}" for t in values) for key, values in times.items()))

    hidden = base.config.hidden_size
    print("\nstorage of the reference per scored token (per million scored tokens)")
    f32, bf16 = 8 * hidden + 12, 6 * hidden + 12  # hidden state (compute dtype) + m (float32) + s + top-1
    print(f"exact  {f32} bytes float32 ({f32 * 1e6 / 2**30:.2f} GiB), {bf16} bytes bfloat16 ({bf16 * 1e6 / 2**30:.2f} GiB)")
    for k in ks:
        print(f"k={k:<4} {8 * k + 8} bytes ({(8 * k + 8) * 1e6 / 2**20:.0f} MiB)")
    for m in methods:
        ratio = best[f"checkpoint {label(m)}"] / best["checkpoint"]
        print(
            f"RESULT {label(m)}: largest relative error {errors[m]:.3%} ({'met' if errors[m] < 0.02 else 'NOT met'}: < 2%); "
            f"cost {ratio:.2f}x ({'met' if ratio <= 1.25 else 'NOT met'}: <= 1.25x)"
        )


def hasattr_module(model, name: str) -> bool:
    return any(n.endswith(name) for n, _ in model.named_modules())


if __name__ == "__main__":
    main()
