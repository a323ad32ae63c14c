"""Drift on a real model: the bucketed KL against the full-vocabulary KL, and what drift costs.

    python bench/drift.py                   # SmolLM2-135M-Instruct on wikitext-2 paragraphs (CPU here)
    python bench/drift.py --model tiny      # quick
    python bench/drift.py --k 8 --k 32 --k 128

For each adapter (LoRA with random B at two strengths) it prints, side by side in one run:

* the mean KL(base || checkpoint) per token over the vocabulary (independent: one document at a
  time, float64 log-softmax of both models' full distributions), gate's (k+1)-bucket KL from the
  stored top-k reference, and the relative error (full - bucketed) / full (target < 2% at k = 32);
  top-1 agreement both ways (gate's must equal the independent count);
  the base itself with its weights rounded to bfloat16 is the first row: what rounding alone does;
* the cost of scoring a checkpoint with drift against scoring it without (target <= 1.25x), and of
  scoring the base while capturing its reference against scoring it plainly (interleaved repeats,
  the fastest of each kept);
* storage of the reference per million scored tokens.
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

    from gate.runner.perplexity import DriftRun, encode_suite, score_documents
    from gate.suites import load_suite

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model folder")
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, action="append", help="top-k sizes (default 8, 32, 128)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ks = args.k or [8, 32, 128]

    path = {"smollm2": smollm2_base, "tiny": tiny_base}.get(args.model, lambda: Path(args.model))()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = wikitext_documents(args.documents, 40, 250) or known_good_documents(args.documents)
    folder = CACHE / f"drift-{path.name}"
    folder.mkdir(parents=True, exist_ok=True)
    suite_file = folder / "docs.jsonl"
    suite_file.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    tokenizer = AutoTokenizer.from_pretrained(path)
    docs = encode_suite(load_suite("bench", suite_file), tokenizer)
    n_tokens = sum(d.n_scored for d in docs)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    score = lambda model, drift=None: score_documents(  # noqa: E731
        model, docs, max_length=2048, stride=1024, batch_size=args.batch_size, device=device, pad_id=pad, drift=drift
    )[0]
    print(f"model: {path.name} ({base.config.vocab_size} tokens of vocabulary), {len(docs)} documents, {n_tokens} scored tokens")
    print(device_note())

    references = {}
    for k in ks:
        capture = DriftRun(k)
        score(base, capture)
        references[k] = capture.captured
    print("\naccuracy of the bucketed KL (mean nats per token; relative error = (full - bucketed) / full)")
    print(f"{'adapter':<10} {'full KL':>10} " + " ".join(f"{f'k={k}':>10} {'rel.err':>8}" for k in ks) + f" {'top1':>8}")
    adapters = {}
    worst_error = 0.0
    for name in ["base-bf16", *STRENGTHS]:
        if name == "base-bf16":  # the base against itself with bf16-rounded weights: numerical noise
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(torch.bfloat16).float().to(device).eval()
        else:
            std, targets = STRENGTHS[name]
            adapter = make_adapter(path, folder / f"adapter-{name}", std, tuple(t for t in targets if hasattr_module(base, t)))
            base_copy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            model = PeftModel.from_pretrained(base_copy, adapter).to(device).eval()
        adapters[name] = model
        total, agree, tokens = full_kl(base, model, docs, device)
        cells = []
        for k in ks:
            run = DriftRun(k, reference=references[k], tokenizer=tokenizer)
            records = score(model, run)
            bucketed = sum(r.kl_sum for r in records)
            matches = sum(r.top1_matches for r in records)
            assert matches == agree, f"top-1 agreement differs: gate {matches}, independent {agree}"
            cells.append(f"{bucketed / tokens:>10.5f} {(total - bucketed) / total:>8.2%}")
            if k == 32:
                worst_error = max(worst_error, (total - bucketed) / total)
        print(f"{name:<10} {total / tokens:>10.5f} " + " ".join(cells) + f" {agree / tokens:>8.1%}")

    k = 32 if 32 in ks else ks[0]
    model = adapters["gentle"]
    plain_ckpt, drift_ckpt, plain_base, capture_base = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so that machine load hits both sides alike
        plain_ckpt.append(timed(lambda: score(model), device))
        drift_ckpt.append(timed(lambda: score(model, DriftRun(k, reference=references[k], tokenizer=tokenizer)), device))
        plain_base.append(timed(lambda: score(base), device))
        capture_base.append(timed(lambda: score(base, DriftRun(k)), device))
    print(f"\ncost at k={k} (fastest of {args.repeats} interleaved repeats)")
    print(f"checkpoint: {min(plain_ckpt):.2f} s without drift, {min(drift_ckpt):.2f} s with: {min(drift_ckpt) / min(plain_ckpt):.2f}x (target <= 1.25x)")
    print(f"base:       {min(plain_base):.2f} s plain, {min(capture_base):.2f} s capturing the reference: {min(capture_base) / min(plain_base):.2f}x")
    per_token = 8 * k + 8
    print(f"\nstorage of the reference: {per_token} bytes per scored token = {per_token * 1e6 / 2**20:.0f} MiB per million scored tokens")
    ratio = min(drift_ckpt) / min(plain_ckpt)
    if 32 in ks:
        print(f"RESULT accuracy: largest relative error at k=32 {worst_error:.2%} ({'met' if worst_error < 0.02 else 'NOT met'}: < 2%)")
    print(f"RESULT cost: {ratio:.2f}x scoring with drift / without ({'met' if ratio <= 1.25 else 'NOT met'}: <= 1.25x)")


def hasattr_module(model, name: str) -> bool:
    return any(n.endswith(name) for n, _ in model.named_modules())


if __name__ == "__main__":
    main()
