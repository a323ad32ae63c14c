"""Incremental runs: after a full run, add one checkpoint and run again; then run with nothing new.

    python bench/incremental.py                # SmolLM2-135M, 60 wikitext-2 paragraphs + arith
    python bench/incremental.py --model tiny   # quick

Prints the re-run's wall time against (a) the time gate itself spent scoring that checkpoint (its
per-score timings in the results store; target <= 1.3x) and (b) one `lm_eval` run of that
checkpoint alone (what the usual loop pays for it), and the no-op re-run against the full run.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
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


def score_seconds(store: Path) -> dict[str, float]:
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT key, seconds FROM suite_scores UNION ALL SELECT key, seconds FROM task_scores").fetchall()
    return dict(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints in the first run")
    args = parser.parse_args()
    base = smollm2_base() if args.model == "smollm2" else tiny_base()
    documents = wikitext_documents(60, 30, 80) or known_good_documents(30)
    work_dir = CACHE / f"incremental-{args.model}"
    shutil.rmtree(work_dir, ignore_errors=True)
    adapters = make_adapters(base, CACHE / f"adapters-{args.model}-{args.checkpoints + 1}", args.checkpoints + 1)
    work = write_workload(work_dir / "suites", documents, arith_items=None)
    folder = work_dir / "checkpoints" / "run"
    folder.mkdir(parents=True)
    for a in adapters[:-1]:
        shutil.copytree(a, folder / a.name)
    out = work_dir / "out"
    run = gate_cmd("run", folder.parent, "--config", work.gate_yaml, "--base", base, "--out", out, "-q")

    print("# incremental re-runs")
    print(device_note())
    print(f"model: {base.name}; suites: {len(documents)} perplexity documents + arith (100 items, 0-shot)")
    full = measure(run)
    print(f"full run, base + {args.checkpoints} checkpoints: {full.seconds:.1f} s")
    before = score_seconds(out / "gate.sqlite")
    shutil.copytree(adapters[-1], folder / adapters[-1].name)
    added = measure(run)
    new = {k: v for k, v in score_seconds(out / "gate.sqlite").items() if k not in before}
    scoring = sum(new.values())
    print(f"re-run with one new checkpoint: {added.seconds:.1f} s; gate's scoring of that checkpoint: {scoring:.1f} s ({len(new)} scores)")
    alone = measure(lm_eval_cmd(base, adapters[-1], work, work_dir / "lm-eval-one"))
    print(f"lm_eval on that checkpoint alone: {alone.seconds:.1f} s")
    nothing = measure(run)
    reused = "computed 0 model x suite score(s)" in nothing.output
    print(f"re-run with nothing new: {nothing.seconds:.1f} s ({'no model work' if reused else 'SOMETHING WAS RECOMPUTED'})")
    value = added.seconds / scoring
    print(f"RESULT incremental: re-run / scoring one checkpoint = {ratio(added.seconds, scoring)}"
          f" (target <= 1.3x: {'met' if value <= 1.3 else 'NOT met'}); re-run / lm_eval on it alone = {ratio(added.seconds, alone.seconds)}")
    print(f"RESULT no-op: re-run with nothing new / full run = {ratio(nothing.seconds, full.seconds)}")


if __name__ == "__main__":
    main()
