"""Scale-out on Ray: slices of the work list fan out to long-lived workers, one GPU each (one CPU without CUDA).

The driver plans once (``gate.work.plan``), writes work.json and sends each model's missing items
to a worker. Each worker is a Ray actor with its own ``Runner`` (which keeps its base model loaded
between jobs) and a worker-local store; it executes the items and returns the new store rows, which
the driver writes into the one results store as they come. Once the perplexity items are in, the
driver applies the funnel and sends the lm-eval items it keeps; then it assembles results.json once,
with exactly the code a single-machine run uses, so numbers, verdict and reports are identical.

A worker that dies loses only the job in flight: the driver starts a fresh worker and submits the
job again (``RETRIES`` times); everything already returned is in the store.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from gate.assemble import RunOutcome, assemble, rescoring
from gate.errors import GateError, RunFailure
from gate.flow import finish, funnel_scores, skipped_by_funnel, split_funnel
from gate.progress import ProgressEvent, ProgressFn, no_progress
from gate.request import RunRequest
from gate.store import STORE_NAME, ResultsStore
from gate.work import WORK_NAME, Failure, WorkItem, WorkList, funnel_keep, missing, plan, write_work

RETRIES = 2
INSTALL_HINT = "Ray is not installed: pip install 'gate[ray]' (or pip install 'ray>=2.9')"


class ScoringWorker:
    """One worker: a private output folder and store, and a ``Runner`` that keeps its base loaded."""

    def __init__(self, request: RunRequest):
        from gate.runner.recipe import Runner

        self._dir = Path(tempfile.mkdtemp(prefix="gate-worker-"))
        self._runner = Runner(dataclasses.replace(request, out_dir=self._dir))
        self._exported: set[str] = set()

    def score(self, work: WorkList, items: list[WorkItem]) -> dict:
        """Execute one model's items; returns the new store rows, what was computed, and failures."""
        _injected_fault(items[0].model)
        with ResultsStore(self._dir / STORE_NAME) as store:
            done = self._runner.execute(work, items, store)
            new = store.keys() - self._exported
            rows = store.export(new) if new else {}
        self._exported |= new
        return {"rows": rows, "computed": done.computed, "failures": done.failures, "base_loads": done.base_loads}


FAULT_ENV = "GATE_FAULT_INJECT_WORKER_EXIT"


def _injected_fault(model: str) -> None:
    """Tests only: GATE_FAULT_INJECT_WORKER_EXIT=NAME:MARKER kills the worker once, on NAME's job."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, marker = spec.partition(":")
    if name == model and marker and not Path(marker).exists():
        Path(marker).write_text("died once")
        os._exit(1)  # a hard death, as on a lost machine: no cleanup, no exception


def run_on_ray(
    request: RunRequest, address: str | None = None, progress: ProgressFn = no_progress, workers: int | None = None
) -> RunOutcome:
    """The distributed run: same inputs and results as ``gate.flow.run``."""
    try:
        import ray
    except ImportError:
        raise GateError(INSTALL_HINT) from None
    from gate.runner.recipe import Runner

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    wanted_gpu = request.options.device in ("auto", "cuda") or request.options.device.startswith("cuda")
    per_worker = {"num_gpus": 1} if gpus and wanted_gpu else {"num_cpus": 1}
    size = workers or (gpus if per_worker.get("num_gpus") else max(1, int(ray.cluster_resources().get("CPU", 1)) - 1))
    actor = ray.remote(max_restarts=0, **per_worker)(ScoringWorker)
    spawn = lambda: actor.remote(request)  # noqa: E731 - workers start only when there is work
    pool: list = []
    progress(ProgressEvent("stage", message=f"ray: {size} worker(s), {'1 GPU' if per_worker.get('num_gpus') else '1 CPU'} each"))

    with ResultsStore(request.out_dir / STORE_NAME) as store:
        # The one plan: identities, keys and what is missing (the driver loads no model).
        work = plan(request, Runner(request).environment(store.hash_cache, progress))
        write_work(request.out_dir / WORK_NAME, work)
        todo = missing(work, store.keys())
        note = rescoring(todo, store)
        work_ref = ray.put(work)
        collected = _Collected()

        # Phase A: the base on every suite; each checkpoint on the perplexity and generate suites (for the funnel).
        first, later = split_funnel(todo)
        _dispatch(ray, pool, size, spawn, _by_model(first), work_ref, store, collected, progress)

        # Phase B: lm-eval suites on the checkpoints the funnel keeps (all of them without a funnel).
        failed = {f.model for f in collected.failures}
        later = [i for i in later if i.model not in failed]
        kept = funnel_keep(work, later, funnel_scores(work, store, failed))
        _dispatch(ray, pool, size, spawn, _by_model(kept), work_ref, store, collected, progress)

        results = assemble(work, store, collected.failures, skipped_by_funnel(later, kept))
    return finish(work, results, request.out_dir, collected.computed, collected.base_loads, note)


def _by_model(items: list[WorkItem]) -> list[list[WorkItem]]:
    """One job per model: its items, in list order (the base's first)."""
    jobs: dict[str, list[WorkItem]] = {}
    for item in items:
        jobs.setdefault(item.model, []).append(item)
    return list(jobs.values())


@dataclasses.dataclass
class _Collected:
    computed: list = dataclasses.field(default_factory=list)
    failures: list[Failure] = dataclasses.field(default_factory=list)
    base_loads: int = 0


def _dispatch(ray, pool, size: int, spawn, jobs, work_ref, store: ResultsStore, collected: _Collected, progress: ProgressFn) -> None:
    """Run jobs on the pool as workers free up; store each answer as it arrives; retry lost jobs.

    A worker that dies is replaced by a fresh one (which loads the base again) and only its job is
    submitted again. ``pool`` holds the idle workers between phases; at most ``size`` run at once.
    """
    queue = list(jobs)
    attempts: dict[str, int] = {}
    running: dict = {}
    idle = pool
    while queue or running:
        while queue and not idle and len(running) < size:
            idle.append(spawn())
        while queue and idle:
            worker = idle.pop()
            job = queue.pop(0)
            running[worker.score.remote(work_ref, job)] = (worker, job)
        done, _ = ray.wait(list(running), num_returns=1)
        worker, job = running.pop(done[0])
        model = job[0].model
        try:
            answer = ray.get(done[0])
        except ray.exceptions.RayActorError:
            attempts[model] = attempts.get(model, 0) + 1
            if attempts[model] > RETRIES:
                raise RunFailure(f"ray: the worker scoring {model} died {RETRIES + 1} times; see the Ray logs") from None
            queue.append(job)  # only the job in flight is lost; a fresh worker takes it
            continue
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, GateError):
                raise cause from None  # a domain error keeps its message and exit code
            raise RunFailure(f"ray: scoring {model} failed: {cause or err}") from None
        idle.append(worker)
        if answer["rows"]:
            store.import_rows(answer["rows"])
        collected.computed += [tuple(pair) for pair in answer["computed"]]
        collected.base_loads += answer["base_loads"]
        collected.failures += answer["failures"]
        progress(ProgressEvent("stage", message=f"ray: {model} scored on {', '.join(i.suite for i in job)}"))
