"""Perplexity throughput against the hardware's ceiling: gate's scoring of a suite against a bare
forward-pass loop over the same batches on the same model (no gate code: tokenize, sort by length,
pad, forward under inference_mode, nothing else).

    python bench/ceiling.py                 # SmolLM2-135M on wikitext-2 paragraphs (CPU here)
    python bench/ceiling.py --model tiny    # quick
    python bench/ceiling.py --model PATH --dtype bfloat16   # on a GPU: a >= 1B model in bf16

Prints tokens/s of both, their ratio (target >= 0.85x), padding waste, and on CUDA the model FLOPs
utilisation (2 x parameters x tokens / time / peak; peak from --peak-tflops).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, device_note, known_good_documents, smollm2_base, tiny_base, wikitext_documents  # noqa: E402


def bare_loop(model, tokenizer, texts: list[str], batch_size: int, device) -> tuple[int, int, int]:
    """Forward passes only; returns (tokens, padded positions, batches)."""
    import torch

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = sorted(([start, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts), key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = padded = batches = 0
    with torch.inference_mode():
        for i in range(0, len(encoded), batch_size):
            batch = encoded[i : i + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            tokens += sum(map(len, batch))
            padded += width * len(batch)
            batches += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, padded, batches


def gate_scoring(model, tokenizer, suite_path: Path, batch_size: int, device) -> tuple[int, float]:
    """gate's own path: load_suite -> encode_suite -> score_documents. Returns (tokens, seconds)."""
    import torch

    from gate.runner.perplexity import encode_suite, score_documents
    from gate.suites import load_suite

    docs = encode_suite(load_suite("bench", suite_path), tokenizer)
    began = time.perf_counter()
    score_documents(model, docs, max_length=2048, stride=1024, batch_size=batch_size, device=device, pad_id=tokenizer.pad_token_id or 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(d.input_ids) for d in docs), time.perf_counter() - began


def main() -> None:
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model folder")
    parser.add_argument("--documents", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 SXM dense bf16: 989)")
    args = parser.parse_args()

    path = {"smollm2": smollm2_base, "tiny": tiny_base}.get(args.model, lambda: Path(args.model))()
    texts = wikitext_documents(args.documents, 30, 300) or known_good_documents(30)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    suite = CACHE / "ceiling.jsonl"
    suite.parent.mkdir(parents=True, exist_ok=True)
    suite.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))

    print("# perplexity throughput: gate vs a bare forward loop")
    print(device_note())
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {path.name} ({params / 1e6:.0f}M parameters, {args.dtype}); {len(texts)} documents; batch size {args.batch_size}")
    bare_times, gate_times = [], []
    for _ in range(args.repeats):  # interleaved, best of each: the machine is shared
        began = time.perf_counter()
        tokens, padded, batches = bare_loop(model, tokenizer, texts, args.batch_size, device)
        bare_times.append(time.perf_counter() - began)
        gate_tokens, seconds = gate_scoring(model, tokenizer, suite, args.batch_size, device)
        gate_times.append(seconds)
    bare_rate, gate_rate = tokens / min(bare_times), gate_tokens / min(gate_times)
    print(f"bare loop: {bare_rate:,.0f} tokens/s ({batches} batches); padding waste {1 - tokens / padded:.1%} of positions")
    print(f"gate:      {gate_rate:,.0f} tokens/s")
    if device.type == "cuda":
        mfu = 2 * params * gate_rate / (args.peak_tflops * 1e12)
        print(f"model FLOPs utilisation (gate): {mfu:.1%} of {args.peak_tflops:g} TFLOP/s")
    ok = gate_rate / bare_rate >= 0.85
    print(f"RESULT ceiling: gate / bare forward throughput = {gate_rate / bare_rate:.2f}x (target >= 0.85x: {'met' if ok else 'NOT met'})")


if __name__ == "__main__":
    main()
