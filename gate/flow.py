"""The run's flow, one way: request -> facts -> work list (work.json) -> execute what is missing ->
funnel -> execute -> assemble -> results.json. The runner (torch) is imported only to execute.

A local run, a shard and (gate.runner.distributed) a Ray run differ only in who executes which
slice of the one list; each ends in the same assembly from the store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from gate.assemble import RunOutcome, assemble, outcome, rescoring
from gate.progress import ProgressFn, no_progress
from gate.request import RunRequest
from gate.results import write_results
from gate.store import STORE_NAME, ResultsStore
from gate.work import WORK_NAME, WorkItem, WorkList, funnel_keep, missing, parse_shard, plan, shard, write_work

RESULTS_NAME = "results.json"
FUNNEL_WITH_SHARDS = "the funnel needs every checkpoint's perplexity; a shard runs every suite on its checkpoints"


def run(request: RunRequest, progress: ProgressFn = no_progress, *, shard_of: str | None = None) -> RunOutcome:
    """Score what the store lacks of the work list (of share ``shard_of`` "I/N"), then write results.json."""
    from gate.runner.recipe import Runner  # torch is imported here

    notices = []
    index_count = parse_shard(shard_of) if shard_of else None
    if index_count and request.funnel is not None:
        notices.append(FUNNEL_WITH_SHARDS)
        request = dataclasses.replace(request, funnel=None)
    runner = Runner(request)
    try:
        with ResultsStore(request.out_dir / STORE_NAME) as store:
            work = plan(request, runner.environment(store.hash_cache, progress))
            write_work(request.out_dir / WORK_NAME, work)
            todo = missing(work, store.keys())
            note = rescoring(todo, store)
            if index_count:
                todo = shard(work, *index_count, todo)
            first, later = split_funnel(todo)
            done = runner.execute(work, first, store, progress)
            failed = {f.model for f in done.failures}
            later = [i for i in later if i.model not in failed]
            kept = funnel_keep(work, later, funnel_scores(work, store, failed))
            again = runner.execute(work, kept, store, progress)
            failures = done.failures + again.failures
            results = assemble(work, store, failures, skipped_by_funnel(later, kept))
    finally:
        runner.release()
    return finish(work, results, request.out_dir, done.computed + again.computed, done.base_loads + again.base_loads, note, notices)


def split_funnel(items: list[WorkItem]) -> tuple[list[WorkItem], list[WorkItem]]:
    """(everything but the checkpoints' lm-eval items, those): lm-eval runs after the funnel has ranked."""
    later = [i for i in items if i.kind == "lm_eval" and i.model != "base"]
    return [i for i in items if not (i.kind == "lm_eval" and i.model != "base")], later


def funnel_scores(work: WorkList, store: ResultsStore, failed: set[str]) -> dict:
    """Checkpoint -> its stored score on the funnel's suite (failed checkpoints: none, never selected)."""
    if work.funnel is None:
        return {}
    return {i.model: store.get(i.key) for i in work.items if i.suite == work.funnel.suite and i.model != "base" and i.model not in failed}


def skipped_by_funnel(items: list[WorkItem], kept: list[WorkItem]) -> list[WorkItem]:
    kept_pairs = {(i.model, i.suite) for i in kept}
    return [i for i in items if (i.model, i.suite) not in kept_pairs]


def finish(
    work: WorkList,
    results,
    out_dir: Path,
    computed: list,
    base_loads: int,
    note: str | None,
    notices: Sequence[str] = (),
) -> RunOutcome:
    """Write results.json and say what the run did."""
    path = Path(out_dir) / RESULTS_NAME
    write_results(path, results)
    done = outcome(work, results, path, computed, base_loads, note)
    done.notices = list(notices)
    return done
