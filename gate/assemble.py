"""Assembly: results.json from the results store and the work list, with no torch; and what a run did.

The store is the single source of truth: whoever scored a pair (this machine, a Ray worker, a
shard), ``assemble`` builds the same document from the same rows.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gate
from gate.errors import EXIT_RUNTIME_FAILURE
from gate.results import SCHEMA_VERSION, ModelResult, Results, unpaired_items
from gate.store import ResultsStore
from gate.work import Failure, WorkItem, WorkList, funnel_reason


@dataclass
class RunOutcome:
    """What a run did: the results, where they are, and exactly what was computed."""

    results_path: Path
    """Where results.json is written."""
    results: Results | None = None
    """The results.json document (set once the run has assembled it)."""
    computed: list[tuple[str, str]] = field(default_factory=list)
    """(model, suite) pairs scored in this run."""
    reused: list[tuple[str, str]] = field(default_factory=list)
    """(model, suite) pairs taken from the results store."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(model, suite) pairs not run on purpose (the funnel)."""
    problems: list[tuple[str, int]] = field(default_factory=list)
    """(message, exit code) for each checkpoint that is invalid or failed."""
    base_loads: int = 0
    """How many times the base model was loaded (0 when everything was in the store)."""
    rescoring: str | None = None
    """Why scores stored by an earlier run are computed again under this run's library versions
    (one line for the user), or None when none are."""
    notices: list[str] = field(default_factory=list)
    """Warnings about how this run was asked to go (e.g. a shard ignores the funnel); not in results.json."""

    @property
    def exit_code(self) -> int:
        return max((code for _, code in self.problems), default=0)


def assemble(
    work: WorkList,
    store: ResultsStore,
    failures: Sequence[Failure] = (),
    skipped: Sequence[WorkItem] = (),
    created_at: str | None = None,
) -> Results:
    """results.json from the store: every item's score under its key, failures and funnel skips marked.

    ``work`` is not changed. Pairs whose items saw other prompts than the base's are dropped and
    their checkpoint marked failed (base and checkpoint must be compared item by item).
    """
    models = [copy.deepcopy(m) for m in work.models]
    by_name = {m.name: m for m in models}
    for failure in failures:
        model = by_name[failure.model]
        model.status, model.reason, model.error_code = "error", failure.reason, failure.exit_code
    for item in skipped:
        by_name[item.model].skipped[item.suite] = funnel_reason(work.funnel) if work.funnel else "skipped"
    for item in work.items:
        model = by_name[item.model]
        if model.status != "ok" or item.suite in model.skipped:
            continue
        score = store.get(item.key)
        if score is not None:
            model.scores[item.suite] = score
        task_score = store.get_task(item.key)
        if task_score is not None:
            # Scores stored before gate recorded metric semantics get them from the task itself.
            semantics = work.semantics.get(item.suite)
            if semantics is not None:
                task_score.higher_is_better = task_score.higher_is_better or dict(semantics["higher_is_better"])
                task_score.aggregation = task_score.aggregation or dict(semantics["aggregation"])
            model.tasks[item.suite] = task_score
    _check_pairing(models)
    _record_groups(work, models[0])
    return Results(
        schema_version=SCHEMA_VERSION,
        gate_version=gate.__version__,
        created_at=created_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=work.command,
        versions=dict(work.library_versions),
        settings=copy.deepcopy(work.settings),
        base=models[0],
        checkpoints=models[1:],
        suites=copy.deepcopy(work.suites),
        warnings=list(work.warnings),
        config=work.config,
    )


def _check_pairing(models: list[ModelResult]) -> None:
    """Base and checkpoint must have seen the same prompts, item by item, before they are compared."""
    base = models[0]
    for model in models[1:]:
        for suite, score in list(model.tasks.items()):
            reference = base.tasks.get(suite)
            if reference is None:
                continue
            mismatched = unpaired_items(reference, score)
            if mismatched:
                del model.tasks[suite]
                model.status, model.error_code = "error", EXIT_RUNTIME_FAILURE
                model.reason = (
                    f"{model.name} on suite {suite!r}: {len(mismatched)} item(s) saw other prompts than the base "
                    f"(first: {mismatched[0]}); its scores are dropped: delete the output folder's gate.sqlite and re-run"
                )


def _record_groups(work: WorkList, base: ModelResult) -> None:
    """Give the base's records the fields gates cluster by (JSONL ``meta``, lm-eval document fields)."""
    for suite, fields in work.groups.items():
        records = base.scores[suite].documents if suite in base.scores else (base.tasks[suite].items if suite in base.tasks else [])
        for record in records:
            record.groups = dict(fields.get(record.id, {}))


def outcome(
    work: WorkList,
    results: Results,
    results_path: Path,
    computed: Sequence[tuple[str, str]] = (),
    base_loads: int = 0,
    rescoring: str | None = None,
) -> RunOutcome:
    """What the run did, from the work list and the assembled results."""
    done = set(computed)
    models = {m.name: m for m in [results.base, *results.checkpoints]}
    reused = sorted(
        (i.model, i.suite)
        for i in work.items
        if (i.model, i.suite) not in done
        and i.suite not in models[i.model].skipped
        and (i.suite in models[i.model].scores or i.suite in models[i.model].tasks)
    )
    return RunOutcome(
        results_path=results_path,
        results=results,
        computed=list(computed),
        reused=reused,
        skipped=sorted((m.name, s) for m in models.values() for s in m.skipped),
        problems=[(c.reason or c.name, c.error_code or EXIT_RUNTIME_FAILURE) for c in results.checkpoints if c.status != "ok"],
        base_loads=base_loads,
        rescoring=rescoring,
    )


def rescoring(items: list[WorkItem], store: ResultsStore) -> str | None:
    """One line saying which of ``items`` (missing from the store) are computed again because library versions changed."""
    changes: dict[str, set[str]] = {}
    count = 0
    for item in items:
        stored = store.other_versions(item.identity)
        if not stored:
            continue
        count += 1
        for old in stored:
            for package, new in item.identity.versions.items():
                if old.get(package) != new:
                    changes.setdefault(package, set()).add(f"{old.get(package, 'unrecorded')} -> {new}")
    if not count:
        return None
    what = ", ".join(f"{package} {' / '.join(sorted(c))}" for package, c in sorted(changes.items()))
    return (
        f"rescoring {count} model x suite score(s) stored under other library versions ({what}): "
        "scores computed under other versions are never compared"
    )
