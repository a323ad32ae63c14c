"""Generation probes, measured: gate's batched greedy generation against a bare `model.generate`
loop over the same batches; one `gate run` with a probe suite against lm-eval's `generate_until`
(one `lm_eval` run per model) on the same prompts and checkpoints; determinism across re-runs and
batch sizes.

    python bench/generate.py --model tiny                 # ~3 min on 2 CPU cores
    python bench/generate.py --model smollm2 --skip-lm-eval   # the demo's SmolLM2-135M-Instruct base

Prints RESULT lines: throughput ratio (target >= 0.9x), the wall-time ratio against lm-eval,
whether re-runs are identical, and how many outputs change with the batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, ROOT, BIN, device, device_note, gate_cmd, make_adapters, measure, ratio, smollm2_base, tiny_base  # noqa: E402

SUITES = ("false-premise", "benign-requests", "json-format", "instructions")


def probe_file(folder: Path) -> Path:
    """The four built-in probe suites as one file (44 prompts)."""
    rows = []
    for name in SUITES:
        rows += [json.loads(line) for line in (ROOT / "suites" / "probes" / f"{name}.jsonl").read_text().splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "probes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bare_loop(model, batches, config, device) -> tuple[int, list[list[int]]]:
    """model.generate over the given batches of token ids, left-padded; nothing else."""
    import torch

    new_tokens, outputs = 0, []
    stops = set(config.eos_token_id)
    with torch.inference_mode():
        for batch in batches:
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row in out[:, width:].tolist():
                cut = next((k for k, t in enumerate(row) if t in stops), len(row))
                outputs.append(row[:cut])
                new_tokens += cut
    return new_tokens, outputs


def in_process(path: Path, probes: Path, max_new_tokens: int, batch_size: int, repeats: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from gate.probes import load_probe_suite
    from gate.runner import generate as gen
    from gate.runner.model import load_tokenizer

    dev = torch.device(device())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    tokenizer = load_tokenizer(path, False)
    suite = load_probe_suite("probes", probes, max_new_tokens=max_new_tokens)
    encoded = gen.encode_probes(suite, tokenizer, None)
    stops = gen.stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = gen.generation_config(suite, stops, pad)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
    ids = [encoded[i].input_ids for i in order]
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    print(f"model: {path.name}; {len(encoded)} prompts; max_new_tokens {max_new_tokens}; batch size {batch_size}")

    def gate_once():
        began = time.perf_counter()
        outputs, _ = gen.generate(model, encoded, suite, tokenizer, batch_size=batch_size, device=dev, stops=stops)
        score = gen.probe_score(suite, encoded, outputs, tokenizer, stops)
        return time.perf_counter() - began, outputs, score

    bare_times, gate_times, gate_runs = [], [], []
    for _ in range(repeats):  # interleaved, best of each: the machine is shared
        began = time.perf_counter()
        tokens, bare_out = bare_loop(model, batches, config, dev)
        bare_times.append(time.perf_counter() - began)
        seconds, outputs, score = gate_once()
        gate_times.append(seconds)
        gate_runs.append(score)
    gate_tokens = sum(len(t) for t, _ in outputs)
    bare_rate, gate_rate = tokens / min(bare_times), gate_tokens / min(gate_times)
    same_as_bare = [outputs[i][0] for i in order] == bare_out
    print(f"bare model.generate loop: {bare_rate:,.1f} new tokens/s; gate: {gate_rate:,.1f} new tokens/s; same tokens: {same_as_bare}")
    ok = gate_rate / bare_rate >= 0.9
    print(f"RESULT throughput: gate / bare generate loop = {gate_rate / bare_rate:.2f}x (target >= 0.9x: {'met' if ok else 'NOT met'})")

    texts = [[i.output["text"] for i in s.items] for s in gate_runs]
    print(f"RESULT determinism: {len(gate_runs)} re-runs at batch size {batch_size} identical: {all(t == texts[0] for t in texts)}")
    for other in (1, 4, 16):
        if other == batch_size:
            continue
        outputs, _ = gen.generate(model, encoded, suite, tokenizer, batch_size=other, device=dev, stops=stops)
        other_texts = [i.output["text"] for i in gen.probe_score(suite, encoded, outputs, tokenizer, stops).items]
        differ = [k for k, (a, b) in enumerate(zip(texts[0], other_texts)) if a != b]
        first = ""
        if differ:
            a, b = texts[0][differ[0]], other_texts[differ[0]]
            at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first = f"; first difference in item {suite.probes[differ[0]].id!r} at character {at} of {len(a)}"
        print(f"RESULT batch size {other} vs {batch_size}: {len(differ)} of {len(texts[0])} outputs differ{first}")


GEN_YAML = """\
task: bench_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: ""
generation_kwargs:
  until: []
  max_gen_toks: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


def against_lm_eval(path: Path, probes: Path, max_new_tokens: int, batch_size: int, adapters: int, work: Path) -> None:
    """One `gate run` against one `lm_eval` generate_until run per model (base + adapters)."""
    ckpts = make_adapters(path, work / "ckpts", adapters)
    prompts = [json.loads(line) for line in probes.read_text().splitlines()]
    data = work / "lm_eval_prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in prompts))
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "bench_generate.yaml").write_text(GEN_YAML.format(data=data, max_new_tokens=max_new_tokens))
    config = work / "gate.yaml"
    config.write_text(
        f"base: {path}\nbatch_size: {batch_size}\nsuites:\n"
        f"  - {{name: probes, type: generate, path: {probes}, max_new_tokens: {max_new_tokens}}}\n"
        "gates:\n  - {suite: probes, metric: ok, max_drop: 0.1}\n"
    )
    out = work / "gate-out"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    gate = measure(gate_cmd("run", work / "ckpts", "--config", config, "--out", out, "--device", device()))
    lm_seconds = 0.0
    lm_outputs = {}
    for adapter in [None, *ckpts]:
        model_args = f"pretrained={path},dtype=float32" + (f",peft={adapter}" if adapter else "")
        target = work / "lm-eval-out" / (adapter.name if adapter else "base")
        run = measure([
            str(BIN / "lm_eval"), "--model", "hf", "--model_args", model_args, "--tasks", "bench_generate",
            "--include_path", str(tasks), "--batch_size", str(batch_size), "--device", device(),
            "--apply_chat_template", "--output_path", str(target), "--log_samples",
        ])
        lm_seconds += run.seconds
        samples = sorted(target.rglob("samples_bench_generate_*.jsonl"))
        rows = [json.loads(line) for line in samples[-1].read_text().splitlines()] if samples else []
        lm_outputs[adapter.parent.name + "/" + adapter.name if adapter else "base"] = {r["doc_id"]: r["resps"][0][0] for r in rows}
    results = json.loads((out / "results.json").read_text())
    same = total = 0
    for model in [results["base"], *results["checkpoints"]]:
        theirs = lm_outputs.get(model["name"], {})
        for k, item in enumerate(model["tasks"]["probes"]["items"]):
            total += 1
            same += theirs.get(k) == item["output"]["text"]
    print(f"gate run: {gate.seconds:.1f} s; {adapters + 1} lm_eval generate_until runs: {lm_seconds:.1f} s")
    print(f"RESULT vs lm-eval generate_until: gate / lm-eval wall time = {ratio(gate.seconds, lm_seconds)}; same outputs for {same} of {total} (model, prompt) pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2 or a model folder")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--skip-lm-eval", action="store_true")
    args = parser.parse_args()
    path = {"smollm2": smollm2_base, "tiny": tiny_base}.get(args.model, lambda: Path(args.model))()
    work = CACHE / f"generate-{path.name}"
    probes = probe_file(work)
    print("# generation probes: gate vs a bare model.generate loop, vs lm-eval generate_until")
    print(device_note())
    in_process(path, probes, args.max_new_tokens, args.batch_size, args.repeats)
    if not args.skip_lm_eval:
        against_lm_eval(path, probes, args.max_new_tokens, args.batch_size, args.adapters, work)


if __name__ == "__main__":
    main()
