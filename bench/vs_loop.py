"""gate against the usual loop: one `lm_eval --model hf --model_args pretrained=BASE,peft=CKPT` per
checkpoint plus one for the base, against one `gate run`, on the same suites (a perplexity set as an
lm-eval loglikelihood_rolling task, and the multiple-choice arith task, 0-shot).

    python bench/vs_loop.py --regime small      # tiny model, 20 documents: start-up dominates
    python bench/vs_loop.py --regime compute    # SmolLM2-135M, 200 wikitext-2 paragraphs

Checks that both give the same numbers (per-document log-likelihoods, per-item accuracy), then
prints the wall-time ratio gate / loop. Targets: small <= 0.25x, compute <= 0.8x.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE,
    device_note,
    gate_cmd,
    known_good_documents,
    lm_eval_cmd,
    make_adapters,
    measure,
    ratio,
    smollm2_base,
    tiny_base,
    wikitext_documents,
    write_workload,
)

REGIMES = {
    "small": {"model": "tiny", "documents": 20, "arith_items": 20, "target": 0.25},
    "compute": {"model": "smollm2", "documents": 200, "arith_items": None, "target": 0.8},
}


def lm_eval_samples(out: Path, task: str) -> list[dict]:
    [path] = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"])


def compare(gate_results: dict, loop_dirs: dict[str, Path]) -> tuple[float, int]:
    """Largest relative difference of per-document log-likelihoods; number of arith items that differ."""
    models = {"base": gate_results["base"], **{c["name"]: c for c in gate_results["checkpoints"]}}
    worst, flips = 0.0, 0
    for name, out in loop_dirs.items():
        mine = models[name]
        docs = {d["id"]: d["nll"] for d in mine["scores"]["ppl"]["documents"]}
        for row in lm_eval_samples(out, "bench_ppl"):
            theirs = -float(row["filtered_resps"][0] if not isinstance(row["filtered_resps"][0], list) else row["filtered_resps"][0][0])
            ours = docs[f"doc-{row['doc_id']}"]
            worst = max(worst, abs(ours - theirs) / max(abs(theirs), 1e-9))
        items = {i["id"]: i["values"]["acc"] for i in mine["tasks"]["arith"]["items"]}
        for row in lm_eval_samples(out, "gate_arith"):
            flips += int(items[str(row["doc_id"])] != row["acc"])
    return worst, flips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=sorted(REGIMES), default="small")
    parser.add_argument("--checkpoints", type=int, default=6)
    args = parser.parse_args()
    regime = REGIMES[args.regime]
    base = tiny_base() if regime["model"] == "tiny" else smollm2_base()
    if regime["model"] == "tiny":
        documents = known_good_documents(regime["documents"])
        source = "suites/known-good.jsonl"
    else:
        documents = wikitext_documents(regime["documents"], 30, 80)
        source = "wikitext-2 test paragraphs of 30-80 words"
        if documents is None:
            documents = known_good_documents(30)
            source = "suites/known-good.jsonl (../shared/data/wikitext-2 not found)"
    work_dir = CACHE / f"vs-loop-{args.regime}"
    adapters = make_adapters(base, CACHE / f"adapters-{regime['model']}-{args.checkpoints}", args.checkpoints)
    work = write_workload(work_dir / "suites", documents, arith_items=regime["arith_items"])
    print(f"# gate run vs the lm_eval loop, regime {args.regime}")
    print(device_note())
    print(f"model: {base.name}; {len(adapters)} LoRA checkpoints + base; perplexity set: {len(documents)} documents ({source});"
          f" arith: {regime['arith_items'] or 100} items, 0-shot")

    loop_dirs: dict[str, Path] = {}
    loop_seconds = 0.0
    for name, adapter in [("base", None), *((f"run/{a.name}", a) for a in adapters)]:
        out = work_dir / "lm-eval" / name.replace("/", "_")
        shutil.rmtree(out, ignore_errors=True)
        m = measure(lm_eval_cmd(base, adapter, work, out))
        loop_seconds += m.seconds
        loop_dirs[name] = out
        print(f"  lm_eval {name:<20} {m.seconds:7.1f} s")

    gate_out = work_dir / "gate-out"
    shutil.rmtree(gate_out, ignore_errors=True)
    m = measure(gate_cmd("run", adapters[0].parent.parent, "--config", work.gate_yaml, "--base", base, "--out", gate_out, "-q"))
    print(f"  gate run (all {len(adapters) + 1} models)  {m.seconds:7.1f} s")
    results = json.loads((gate_out / "results.json").read_text())
    worst, flips = compare(results, loop_dirs)
    same = worst < 1e-4 and flips == 0
    print(f"same numbers: {'yes' if same else 'NO'} (largest relative difference of a document log-likelihood {worst:.1e};"
          f" arith items that differ: {flips})")
    value = m.seconds / loop_seconds
    print(f"RESULT vs-loop[{args.regime}]: gate / loop wall time = {ratio(m.seconds, loop_seconds)}"
          f" (target <= {regime['target']}x: {'met' if value <= regime['target'] else 'NOT met'})")
    if not same or not math.isfinite(value):
        sys.exit(1)


if __name__ == "__main__":
    main()
