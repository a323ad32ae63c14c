"""What the reports show, computed once from results.json + verdict.json (no torch, no I/O)."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field

from gate.config import LOWER_IS_BETTER
from gate.overlap import Overlap
from gate.results import DriftToken, ModelResult, Results, TaskScore
from gate.scan import run_of
from gate.verdict import Check, CheckpointVerdict, Verdict

MARKS = {
    "pass": ("✓", "pass"),
    "fail": ("✗", "FAIL"),
    "inconclusive": ("?", "inconclusive"),
    "skipped": ("–", "skipped"),
    "error": ("!", "ERROR"),
}


@dataclass
class Column:
    """One check of the policy, as a column of the summary table."""

    key: tuple
    """(against, suite, metric, bound) identifying the check across checkpoints."""
    title: str
    """Header text, e.g. ``known-good.perplexity max increase 2%``."""
    informational: bool
    """Reported only."""
    relative: bool = False
    """The margin is relative to the base's value."""


@dataclass
class Cell:
    """One checkpoint x check."""

    outcome: str
    """pass | fail | inconclusive | skipped | error (or '' when the check is absent)."""
    mark: str
    """A text mark that does not rely on colour."""
    value: str
    """The checkpoint's value and its change: '3.62 (+4.6% [+4.2%, +5.0%])'."""
    reason: str
    """The check's one-line reason."""


@dataclass
class Row:
    """One checkpoint of the summary table."""

    name: str
    step: int | None
    verdict: str
    mark: str
    reason: str
    selected: bool
    cells: list[Cell]
    weights_hash: str | None
    p_all_pass: str = "—"
    """Chance every gate passes at the family's level (Check.power multiplied), or '—'."""
    drift: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Drift suite -> (kl, top1) of this checkpoint, when computed."""


@dataclass
class DocumentChange:
    """A perplexity document, base vs checkpoint."""

    id: str
    excerpt: str
    base: float
    """Base NLL per token."""
    checkpoint: float
    """Checkpoint NLL per token."""

    @property
    def delta(self) -> float:
        return self.checkpoint - self.base


@dataclass
class DocumentDrift:
    """A document of a drift suite: how far the checkpoint's predictions moved from the base's there."""

    id: str
    excerpt: str
    kl: float
    """Mean KL(base || checkpoint) per scored token, nats."""
    top1: float
    """Share of its scored tokens where the two models' most likely next tokens agree."""
    tokens: list[DriftToken]
    """The tokens that drifted most, largest KL first."""


@dataclass
class ItemFlip:
    """An lm-eval item whose correctness changed."""

    id: str
    excerpt: str


@dataclass
class CheckMark:
    """One check of a probe (or an lm-eval generation item's headline metric), base vs checkpoint."""

    kind: str
    """Check kind (``contains``, ``abstains``...) or the lm-eval metric."""
    expected: str
    """What the check asks for, as written in the suite (``contains: Paris``)."""
    base: bool | None
    """Whether the base's output passed (None: not measured)."""
    checkpoint: bool | None
    """Whether the checkpoint's output passed."""


@dataclass
class OutputPair:
    """One prompt: what the base and the checkpoint said, side by side."""

    id: str
    prompt: str
    base: str
    """The base's output, verbatim."""
    checkpoint: str
    """The checkpoint's output, verbatim."""
    checks: list[CheckMark]
    outcome: str
    """``lost`` (passed for the base, fails now), ``gained``, ``same`` (both pass or both fail) or ``unchecked``."""
    base_diff: list[tuple[str, str]]
    """The base's output as (op, text) pieces: op ``same`` or ``del`` (not in the checkpoint's output)."""
    checkpoint_diff: list[tuple[str, str]]
    """The checkpoint's output as (op, text) pieces: op ``same`` or ``ins`` (not in the base's output)."""

    @property
    def identical(self) -> bool:
        return self.base == self.checkpoint

    @property
    def flipped(self) -> bool:
        return self.outcome in ("lost", "gained")


@dataclass
class SideBySide:
    """One generation suite of one checkpoint against the base: flipped items first."""

    suite: str
    checkpoint: str
    pairs: list[OutputPair]
    """Shown items: flipped (lost, then gained), then differing outputs, then identical ones."""
    total: int
    """Items compared (``pairs`` may be cut to a limit)."""

    @property
    def lost(self) -> list[OutputPair]:
        return [p for p in self.pairs if p.outcome == "lost"]

    @property
    def gained(self) -> list[OutputPair]:
        return [p for p in self.pairs if p.outcome == "gained"]

    @property
    def identical(self) -> int:
        return sum(p.identical for p in self.pairs)


@dataclass
class DrillDown:
    """Why a checkpoint is where it is: its worst documents and flipped items."""

    name: str
    verdict: str
    reason: str
    documents: dict[str, list[DocumentChange]] = field(default_factory=dict)
    """Perplexity suite -> documents whose NLL per token rose most."""
    lost: dict[str, list[ItemFlip]] = field(default_factory=dict)
    """lm-eval suite -> items right for the base, wrong for the checkpoint."""
    gained: dict[str, list[ItemFlip]] = field(default_factory=dict)
    """lm-eval suite -> items wrong for the base, right for the checkpoint."""
    outputs: list[SideBySide] = field(default_factory=list)
    """Generation suites (generate, lm-eval generation tasks): base and checkpoint outputs side by side."""
    drift: dict[str, list[DocumentDrift]] = field(default_factory=dict)
    """Drift suite -> documents whose next-token distributions moved most (KL per token)."""


@dataclass
class Sizing:
    """What one gate can detect at the suite's size, and what it would need (worst over checkpoints)."""

    title: str
    """The gate, as its column is titled."""
    mde: str
    """Minimum detectable effect at the family's level (80% power), formatted on the gate's scale."""
    items: int | None
    """Paired items (or clusters) the suite has."""
    needed: int | None
    """Items (clusters) needed for 80% power at the family's level; None: no size can (true effect on the threshold)."""
    short: bool = False
    """Some checkpoint's check of this gate is inconclusive and the suite has fewer items than needed."""


@dataclass
class ReportView:
    """Everything the HTML, Markdown and JUnit reports show."""

    verdict: Verdict
    results: Results
    columns: list[Column]
    rows: list[Row]
    drilldowns: list[DrillDown]
    notes: list[str]
    provenance: list[tuple[str, str]]
    overlaps: list[Overlap]
    """The contamination check's findings, one per suite x training file (empty: not configured)."""
    sizing: list[Sizing] = field(default_factory=list)
    """Per gate: MDE and items needed at the family's level."""
    family_level: float | None = None
    """alpha / K: the level MDE and items needed are computed at (K checkpoints in the family)."""
    drift_suites: list[str] = field(default_factory=list)
    """Suites with drift computed (each adds kl and top1 columns to the summary table)."""

    def contaminated_examples(self, o: Overlap, limit: int = 10) -> list[tuple[str, float, str]]:
        """The most contaminated documents of one finding: (id, share, excerpt)."""
        suite = next((s for s in self.results.suites if s.name == o.suite), None)
        return [(i, share, suite.excerpts.get(i, "") if suite else "") for i, share in o.worst(limit)]


def build_view(results: Results, verdict: Verdict, top: int = 5, flips: int = 10) -> ReportView:
    columns = _columns(verdict)
    rows = [_row(v, results, columns, verdict.selected) for v in verdict.checkpoints]
    by_name = {c.name: c for c in results.checkpoints}
    drilldowns = [_drilldown(v, results.base, by_name[v.name], results, top, flips) for v in verdict.checkpoints if v.name in by_name]
    overlaps = [o for s in results.suites for o in s.overlap]
    drift_suites = [s.name for s in results.suites if s.drift_k is not None]
    view = ReportView(
        verdict,
        results,
        columns,
        rows,
        drilldowns,
        _notes(results, verdict),
        _provenance(results, verdict),
        overlaps,
        drift_suites=drift_suites,
    )
    view.sizing = sizing(verdict, columns)
    family = verdict.policy.get("family")
    view.family_level = verdict.alpha / family if family else None
    return view


def sizing(verdict: Verdict, columns: list[Column] | None = None) -> list[Sizing]:
    """Per gate, the largest MDE and items needed over the checkpoints (the suite must serve them all).

    A check that failed needed no more items (its change is established beyond the margin), and a
    far-gone checkpoint's spread says nothing about what the suite needs to judge the others: the
    figures come from the checks that did not fail, and only when every check failed from them all.
    """
    out = []
    for column in columns if columns is not None else _columns(verdict):
        every = [c for v in verdict.checkpoints for c in v.checks if _key(c) == column.key and c.mde is not None]
        checks = [c for c in every if c.outcome != "fail"] or every
        if not checks:
            continue
        mde = max(c.mde for c in checks)
        needed = [c.items_needed for c in checks]
        worst = None if any(n is None for n in needed) else max(needed)
        text = f"{mde * 100:.2f}%" if column.relative else f"{mde:.3g}"
        items = max(c.units for c in checks)
        short = worst is not None and worst > items and any(c.outcome == "inconclusive" for c in checks)
        out.append(Sizing(column.title, text, items, worst, short))
    return out


def p_all_pass(v: CheckpointVerdict) -> str:
    """The checkpoint's chance to pass every gate (see Check.power), formatted, or '—'."""
    return "—" if v.p_all_pass is None else f"{v.p_all_pass:.2f}"


def _columns(verdict: Verdict) -> list[Column]:
    seen: dict[tuple, Column] = {}
    for v in verdict.checkpoints:
        for c in v.checks:
            key = _key(c)
            if key not in seen:
                margin = f"{c.margin * 100:g}%" if c.relative else f"{c.margin:g}"
                against = "" if c.against == "base" else f" vs {c.against}"
                title = f"{c.suite}.{c.metric} {c.bound.replace('_', ' ')} {margin}{against}"
                seen[key] = Column(key, title, c.informational, c.relative)
    return list(seen.values())


def _key(c: Check) -> tuple:
    return (c.against, c.suite, c.metric, c.bound, c.margin)


def _row(v: CheckpointVerdict, results: Results, columns: list[Column], selected: str | None) -> Row:
    checks = {_key(c): c for c in v.checks}
    cells = []
    for column in columns:
        c = checks.get(column.key)
        if c is None:
            cells.append(Cell("", "", "—", "not checked"))
            continue
        cells.append(Cell(c.outcome, MARKS[c.outcome][0], format_value(c), c.reason))
    ckpt = next((m for m in results.checkpoints if m.name == v.name), None)
    return Row(
        name=v.name,
        step=v.step,
        verdict=v.verdict,
        mark=MARKS.get(v.verdict, ("", v.verdict))[0],
        reason=v.reason,
        selected=v.name == selected,
        cells=cells,
        weights_hash=ckpt.weights_hash if ckpt else None,
        p_all_pass=p_all_pass(v),
        drift={name: (score.kl, score.top1) for name, score in (ckpt.scores.items() if ckpt else ()) if score.drift is not None},
    )


def format_value(c: Check) -> str:
    """Value, change and the bounds the decision used (at the check's level); '?' where none exists."""
    if c.value is None:
        return "—"

    def fmt(x: float | None, spec: str) -> str:
        return "?" if x is None else format(x, spec)

    if c.kind == "floor":
        return f"{c.value:.4g} [{fmt(c.low, '.4g')}, {fmt(c.high, '.4g')}]"
    if c.relative:
        scaled = [None if x is None else x * 100 for x in (c.effect, c.low, c.high)]
        change = f"{fmt(scaled[0], '+.1f')}% [{fmt(scaled[1], '+.1f')}%, {fmt(scaled[2], '+.1f')}%]"
    else:
        change = f"{fmt(c.effect, '+.3g')} [{fmt(c.low, '+.3g')}, {fmt(c.high, '+.3g')}]"
    return f"{c.value:.4g} ({change})"


def _drilldown(v: CheckpointVerdict, base: ModelResult, ckpt: ModelResult, results: Results, top: int, flips: int) -> DrillDown:
    down = DrillDown(v.name, v.verdict, v.reason)
    suites = {s.name: s for s in results.suites}
    for name, score in ckpt.scores.items():
        if name not in base.scores:
            continue
        base_docs = {d.id: d for d in base.scores[name].documents}
        changes = [
            DocumentChange(d.id, suites[name].excerpts.get(d.id, ""), base_docs[d.id].nll / d.tokens, d.nll / d.tokens)
            for d in score.documents
            if d.id in base_docs and d.tokens
        ]
        changes.sort(key=lambda c: c.delta, reverse=True)
        down.documents[name] = [c for c in changes[:top] if c.delta > 0]
    for name, score in ckpt.scores.items():
        if score.drift is None:
            continue
        drifted = [
            DocumentDrift(d.id, suites[name].excerpts.get(d.id, ""), d.kl_sum / d.tokens, d.top1_matches / d.tokens, d.drifted)
            for d in score.documents
            if d.tokens and d.kl_sum
        ]
        drifted.sort(key=lambda d: d.kl, reverse=True)
        down.drift[name] = drifted[:top]
    for name, task in ckpt.tasks.items():
        if name in base.tasks and any(i.output for i in task.items):
            down.outputs.append(side_by_side(name, v.name, base.tasks[name], task, suites[name].checks if name in suites else {}))
    for name, task in ckpt.tasks.items():
        reference = base.tasks.get(name)
        metric = task.metric
        if reference is None or metric in LOWER_IS_BETTER or (name in suites and suites[name].type == "generate"):
            continue
        base_items = {i.id: i for i in reference.items}
        lost, gained = [], []
        for item in task.items:
            b = base_items.get(item.id)
            if b is None or metric not in item.values or metric not in b.values:
                continue
            if b.values[metric] == 1 and item.values[metric] == 0:
                lost.append(ItemFlip(item.id, item.excerpt))
            elif b.values[metric] == 0 and item.values[metric] == 1:
                gained.append(ItemFlip(item.id, item.excerpt))
        down.lost[name], down.gained[name] = lost[:flips], gained[:flips]
    return down


MAX_PAIRS = 200  # per suite and checkpoint: the report stays readable and small


def side_by_side(suite: str, name: str, base: TaskScore, ckpt: TaskScore, checks: dict, limit: int = MAX_PAIRS) -> SideBySide:
    """Pair base and checkpoint outputs by item id; flipped items first, identical ones last."""
    base_items = {i.id: i for i in base.items}
    pairs = []
    for item in ckpt.items:
        b = base_items.get(item.id)
        if b is None or not item.output or not b.output:
            continue
        before, after = output_text(b.output), output_text(item.output)
        marks = _marks(checks.get(item.id), b.values, item.values, ckpt.metric)
        head = "ok" if "ok" in item.values or "ok" in b.values else ckpt.metric
        outcome = _outcome(b.values.get(head), item.values.get(head)) if marks else "unchecked"
        base_diff, ckpt_diff = word_diff(before, after)
        pairs.append(OutputPair(item.id, item.excerpt, before, after, marks, outcome, base_diff, ckpt_diff))
    rank = {"lost": 0, "gained": 1}
    pairs.sort(key=lambda p: (rank.get(p.outcome, 2), p.identical))
    return SideBySide(suite, name, pairs[:limit], len(pairs))


def output_text(output: dict) -> str:
    """The text to show: a generate suite's output, or an lm-eval item's raw response."""
    text = output.get("text", output.get("raw"))
    return text if isinstance(text, str) else ""


def _outcome(base: float | None, ckpt: float | None) -> str:
    if base is None or ckpt is None:
        return "unchecked"
    if base >= 1 and ckpt < 1:
        return "lost"
    if base < 1 and ckpt >= 1:
        return "gained"
    return "same"


def _marks(checks: dict | None, base: dict, ckpt: dict, metric: str) -> list[CheckMark]:
    def passed(values: dict, key: str) -> bool | None:
        return None if key not in values else values[key] >= 1

    if checks:
        out = []
        for kind, expected in checks.items():
            if kind == "json_keys":
                continue
            if kind == "json" and "json_keys" in checks:
                expected = f"keys {', '.join(checks['json_keys'])}"
            shown = (
                ", ".join(expected)
                if isinstance(expected, list)
                else str(expected).lower()
                if isinstance(expected, bool)
                else str(expected)
            )
            out.append(CheckMark(kind, f"{kind}: {shown}", passed(base, kind), passed(ckpt, kind)))
        return out
    if metric in base and metric in ckpt and {base[metric], ckpt[metric]} <= {0.0, 1.0}:
        return [CheckMark(metric, metric, passed(base, metric), passed(ckpt, metric))]  # an lm-eval item
    return []


def word_diff(before: str, after: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Word-level difference (difflib): the base's pieces (same/del) and the checkpoint's (same/ins)."""
    a, b = re.findall(r"\s+|\S+", before), re.findall(r"\s+|\S+", after)
    left: list[tuple[str, str]] = []
    right: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            left.append(("same", "".join(a[i1:i2])))
            right.append(("same", "".join(b[j1:j2])))
            continue
        if i2 > i1:
            left.append(("del", "".join(a[i1:i2])))
        if j2 > j1:
            right.append(("ins", "".join(b[j1:j2])))
    return left, right


def _notes(results: Results, verdict: Verdict) -> list[str]:
    notes = []
    if results.partial:
        notes.append("Partial results: suites were capped by a limit; these numbers are for a quick look only.")
    if verdict.selected:
        chosen = next(c for c in results.checkpoints if c.name == verdict.selected)
        run = run_of(chosen.name)
        steps = sorted(c.step for c in results.checkpoints if run_of(c.name) == run and c.step is not None)
        if chosen.step is not None and len(steps) > 1:
            if chosen.step == steps[-1]:
                notes.append(
                    f"The selected checkpoint is the last one its run saved (step {chosen.step}): the run may still be "
                    "improving. Train longer or save more checkpoints to find the best one."
                )
            elif chosen.step == steps[0]:
                notes.append(
                    f"The selected checkpoint is the first one its run saved (step {chosen.step}): later ones regressed, and "
                    "an earlier one may be better still. Save checkpoints more often early in training."
                )
    skipped = sorted({s for c in results.checkpoints for s in c.skipped})
    if skipped:
        notes.append(f"The funnel skipped {', '.join(skipped)} on some checkpoints; they cannot pass gates on those suites.")
    return notes


def _provenance(results: Results, verdict: Verdict) -> list[tuple[str, str]]:
    s = results.settings
    rows = [
        ("base model", f"{results.base.path}"),
        ("base weights sha256", results.base.weights_hash or "—"),
        ("tokenizer sha256", s.tokenizer_hash),
        ("device / dtype", f"{s.device} / {s.dtype}"),
        ("batch size / max length / stride", f"{s.batch_size} / {s.max_length} / {s.stride}"),
        ("scoring", s.scoring),
        ("seeds", ", ".join(f"{k}={v}" for k, v in s.seeds.items()) or "—"),
        ("policy seed / bootstrap", f"{verdict.policy.get('seed')} / {verdict.policy.get('bootstrap_iterations')} replicates"),
        ("versions", ", ".join(f"{k} {v}" for k, v in {"gate": results.gate_version, **results.versions}.items())),
        ("results written", results.created_at),
        ("verdict written", str(verdict.provenance.get("created_at", "—"))),
        ("command", results.command or "—"),
    ]
    for suite in results.suites:
        detail = f"{suite.type}, {suite.documents} documents, data sha256 {suite.data_hash[:16]}…"
        if suite.num_fewshot is not None:
            detail += f", {suite.num_fewshot}-shot"
        if suite.limit is not None:
            detail += f", limit {suite.limit}"
        if suite.drift_k is not None:
            detail += f", drift top-{suite.drift_k}" if suite.drift_k else ", drift exact"
        rows.append((f"suite {suite.name}", detail))
    return rows


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
