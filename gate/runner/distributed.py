"""Scale-out on Ray: checkpoints fan out to long-lived workers, one GPU each (one CPU without CUDA).

Each worker is a Ray actor that keeps its base model loaded between jobs and scores one model's
share of suites per job (the same recipe as a local run, restricted with ``RunRequest.only``, into
a worker-local store). The scores come back as store rows, and the driver writes them into the one
results store. Then the driver runs the recipe with ``only={}``: nothing is computed, and
results.json is assembled by exactly the code a single-machine run uses, so numbers, verdict and
reports are identical.

A worker that dies loses only the job in flight: Ray restarts the actor and the driver submits the
job again (``RETRIES`` times); everything already returned is in the store.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from gate.errors import GateError, RunFailure
from gate.request import RunRequest, funnel_selection
from gate.progress import ProgressEvent, ProgressFn, no_progress
from gate.store import STORE_NAME, ResultsStore

RETRIES = 2
INSTALL_HINT = "Ray is not installed: pip install 'gate[ray]' (or pip install 'ray>=2.9')"


class ScoringWorker:
    """One worker: a private output folder and store, and (through the recipe) a kept base model."""

    def __init__(self, request: RunRequest):
        self._dir = Path(tempfile.mkdtemp(prefix="gate-worker-"))
        self._request = dataclasses.replace(request, out_dir=self._dir, keep_base_loaded=True, failures={})
        self._exported: set[str] = set()

    def score(self, model: str, suites: list[str]) -> dict:
        """Score one model's suites; returns the new store rows, what was computed, and failures."""
        from gate.runner.recipe import run

        _injected_fault(model)
        outcome = run(dataclasses.replace(self._request, only={model: suites}))
        record = outcome.results.base if model == "base" else next(c for c in outcome.results.checkpoints if c.name == model)
        with ResultsStore(self._dir / STORE_NAME) as store:
            new = store.keys() - self._exported
            rows = store.export(new) if new else {}
        self._exported |= new
        failure = (record.reason, record.error_code) if record.status == "error" else None
        return {"rows": rows, "computed": outcome.computed, "failure": failure, "base_loads": outcome.base_loads}


FAULT_ENV = "GATE_FAULT_INJECT_WORKER_EXIT"


def _injected_fault(model: str) -> None:
    """Tests only: GATE_FAULT_INJECT_WORKER_EXIT=NAME:MARKER kills the worker once, on NAME's job."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, marker = spec.partition(":")
    if name == model and marker and not Path(marker).exists():
        Path(marker).write_text("died once")
        os._exit(1)  # a hard death, as on a lost machine: no cleanup, no exception


def run_on_ray(request: RunRequest, address: str | None = None, progress: ProgressFn = no_progress, workers: int | None = None):
    """The distributed run: same inputs and results as ``gate.runner.run``."""
    try:
        import ray
    except ImportError:
        raise GateError(INSTALL_HINT) from None
    from gate.runner.recipe import run

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    wanted_gpu = request.device in ("auto", "cuda") or request.device.startswith("cuda")
    per_worker = {"num_gpus": 1} if gpus and wanted_gpu else {"num_cpus": 1}
    size = workers or (gpus if per_worker.get("num_gpus") else max(1, int(ray.cluster_resources().get("CPU", 1)) - 1))
    actor = ray.remote(max_restarts=0, **per_worker)(ScoringWorker)
    spawn = lambda: actor.remote(request)  # noqa: E731 - workers start only when there is work
    pool: list = []
    progress(ProgressEvent("stage", message=f"ray: {size} worker(s), {'1 GPU' if per_worker.get('num_gpus') else '1 CPU'} each"))

    # Phase A: the base on every suite; each checkpoint on the perplexity suites (cheap, for the funnel).
    plan = run(dataclasses.replace(request, only={}))  # identities and what is missing; computes nothing
    perplexity = [s.name for s in request.suites] + [s.name for s in request.probe_suites]  # generate suites too
    tasks = [s.name for s in request.task_specs]
    valid = [c.name for c in plan.results.checkpoints if c.status == "ok"]
    collected = _Collected()
    jobs = _missing(plan.results, [("base", perplexity + tasks)] + [(name, perplexity) for name in valid])
    _dispatch(ray, pool, size, spawn, jobs, request, collected, progress)

    # Phase B: lm-eval suites on the checkpoints the funnel keeps (all of them without a funnel).
    if tasks:
        ranked = run(dataclasses.replace(request, only={}, failures=collected.failures))
        keep = _funnel_keep(request, ranked.results)
        jobs = _missing(ranked.results, [(name, tasks) for name in valid if name in keep and name not in collected.failures])
        _dispatch(ray, pool, size, spawn, jobs, request, collected, progress)

    final = run(dataclasses.replace(request, only={}, failures=collected.failures), progress)
    final.computed = collected.computed
    final.base_loads = collected.base_loads
    computed = set(final.computed)
    final.reused = [pair for pair in final.reused if pair not in computed]
    return final


def _missing(results, jobs: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Only what the results store lacks: a re-run sends no work to any worker."""
    models = {m.name: m for m in [results.base, *results.checkpoints]}
    out = []
    for name, suites in jobs:
        model = models[name]
        missing = [s for s in suites if s not in model.scores and s not in model.tasks]
        if missing:
            out.append((name, missing))
    return out


@dataclasses.dataclass
class _Collected:
    computed: list = dataclasses.field(default_factory=list)
    failures: dict = dataclasses.field(default_factory=dict)
    base_loads: int = 0


def _dispatch(ray, pool, size: int, spawn, jobs, request: RunRequest, collected: _Collected, progress: ProgressFn) -> None:
    """Run jobs on the pool as workers free up; store each answer as it arrives; retry lost jobs.

    A worker that dies is replaced by a fresh one (which loads the base again) and only its job is
    submitted again. ``pool`` holds the idle workers between phases; at most ``size`` run at once.
    """
    queue = list(jobs)
    attempts: dict[str, int] = {}
    running: dict = {}
    idle = pool
    with ResultsStore(request.out_dir / STORE_NAME) as store:
        while queue or running:
            while queue and not idle and len(running) < size:
                idle.append(spawn())
            while queue and idle:
                worker = idle.pop()
                job = queue.pop(0)
                running[worker.score.remote(*job)] = (worker, job)
            done, _ = ray.wait(list(running), num_returns=1)
            worker, job = running.pop(done[0])
            try:
                answer = ray.get(done[0])
            except ray.exceptions.RayActorError:
                attempts[job[0]] = attempts.get(job[0], 0) + 1
                if attempts[job[0]] > RETRIES:
                    raise RunFailure(f"ray: the worker scoring {job[0]} died {RETRIES + 1} times; see the Ray logs") from None
                queue.append(job)  # only the job in flight is lost; a fresh worker takes it
                continue
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, GateError):
                    raise cause from None  # a domain error keeps its message and exit code
                raise RunFailure(f"ray: scoring {job[0]} failed: {cause or err}") from None
            idle.append(worker)
            if answer["rows"]:
                store.import_rows(answer["rows"])
            collected.computed += [tuple(pair) for pair in answer["computed"]]
            collected.base_loads += answer["base_loads"]
            if answer["failure"]:
                collected.failures[job[0]] = tuple(answer["failure"])
            progress(ProgressEvent("stage", message=f"ray: {job[0]} scored on {', '.join(job[1])}"))


def _funnel_keep(request: RunRequest, results) -> set[str]:
    ok = [c for c in results.checkpoints if c.status == "ok"]
    if request.funnel is None:
        return {c.name for c in ok}
    return funnel_selection(request.funnel, [(c.name, c.step, c.scores.get(request.funnel.suite)) for c in ok])
