"""The policy engine, pure: (policy, results, rng) -> verdict. No I/O, no clock, no torch.

For every checkpoint and gate, the base and the checkpoint are compared item by item (gate.stats).
Each check is three-valued:

* guardrail (max_increase / max_drop): **pass** when the non-inferiority test rejects "the harm
  is at least the margin" (its one-sided bound stays inside the margin), with Holm's correction
  over the family of all guardrails x checkpoints, so more checkpoints never mean more false
  passes; **fail** when the opposite one-sided test shows the margin is exceeded; else
  **inconclusive**;
* objective (min_decrease / min_gain): **pass** when the improvement beyond the required gain is
  established (Holm over the objective family); **fail** when it is established that the
  improvement falls short; else **inconclusive**;
* floor (min / max): the same, on the checkpoint's own value against a fixed limit (guardrail family).

A checkpoint passes when every non-informational check passes; it fails when any fails. The
release candidate is the best passing checkpoint by ``select`` (ties: the earlier step). With
``confirm``, items are split by a stable hash of their id: checks and ranking use one part, and the
candidate is certified on the other, so picking the best of many does not inflate its numbers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from gate.config import DRIFT_METRICS, LOWER_IS_BETTER, Gate, Policy
from gate.errors import GateError
from gate.results import ModelResult, Results
from gate.stats import BinomialValue, PairedBinary, PairedBootstrap, ValueBootstrap, holm, minimum_detectable_effect, ratio_value
from gate.verdict import VERDICT_SCHEMA_VERSION, Check, CheckpointVerdict, Verdict

ROLLING = {"word_perplexity": ("words", "exp"), "byte_perplexity": ("bytes", "exp"), "bits_per_byte": ("bytes", "bits")}


class PolicyError(GateError):
    """The policy cannot be applied to these results (a metric the suite lacks, unpaired items)."""


@dataclass
class Paired:
    """Per-item numbers of one suite metric for base and checkpoint, aligned by item id."""

    ids: list[str]
    base: np.ndarray
    checkpoint: np.ndarray
    weights: np.ndarray
    transform: str  # exp | bits | identity | binary

    def subset(self, keep: np.ndarray) -> Paired:
        return Paired([i for i, k in zip(self.ids, keep) if k], self.base[keep], self.checkpoint[keep], self.weights[keep], self.transform)


def validate(policy: Policy, results: Results) -> list[str]:
    """Problems that make the policy inapplicable to these results (each names the gate), or []."""
    problems = []
    suites = {s.name: s for s in results.suites}
    named = [(f"gates[{i}]", g.suite, g.metric) for i, g in enumerate(policy.gates)]
    if policy.select:
        named.append(("select", *policy.select))
    if policy.reference not in (None, "release") and not any(c.name == policy.reference for c in results.checkpoints):
        problems.append(f"reference: no checkpoint named {policy.reference!r} in results.json; use `release` or a checkpoint's name")
    for where, suite, metric in named:
        if suite not in suites:
            problems.append(f"{where}: suite {suite!r} is not in results.json (suites: {', '.join(suites)}); re-run `gate run` with it")
            continue
        if metric in DRIFT_METRICS and suites[suite].type == "perplexity" and suites[suite].drift_k is None:
            problems.append(f"{where}: suite {suite!r} was scored without drift, so it has no {metric!r}; add `drift: true` to it and re-run `gate run`")
            continue
        if suites[suite].type == "lm_eval":
            available = set()
            for model in (results.base, *results.checkpoints):
                if suite in model.tasks:
                    available |= set(model.tasks[suite].metrics)
            if available and metric not in available:
                problems.append(f"{where}: suite {suite!r} has no metric {metric!r} (it has: {', '.join(sorted(available))})")
    return problems


@dataclass
class Reference:
    """What checkpoints are compared with: the base, and optionally a release or another checkpoint."""

    label: str
    """``base``, ``release:NAME`` or a checkpoint name (recorded as each check's ``against``)."""
    model: ModelResult
    """Its per-item scores."""
    incomparable: set[str]
    """Suites it was scored on under another identity (other data or settings): not paired."""


def references(policy: Policy, results: Results, release=None) -> list[Reference]:
    """The base, plus the policy's ``reference`` (``release`` needs the blessed release record)."""
    refs = [Reference("base", results.base, set())]
    if policy.reference == "release":
        if release is None:
            raise PolicyError("reference: release, but no release is blessed; run `gate bless NAME` first")
        changed = {s.name for s in results.suites if release.suites.get(s.name) != s.identity}
        refs.append(Reference(f"release:{release.name}", release.model, changed))
    elif policy.reference:
        found = next((c for c in results.checkpoints if c.name == policy.reference and c.status == "ok"), None)
        if found is None:
            raise PolicyError(f"reference: no scored checkpoint named {policy.reference!r} in results.json")
        refs.append(Reference(found.name, found, set()))
    return refs


def evaluate(policy: Policy, results: Results, rng: np.random.Generator, release=None) -> Verdict:
    """Apply the policy to results.json's numbers (and to the blessed release, when it is the reference)."""
    summary = _policy_summary(policy)
    if not policy.gates:
        return Verdict(VERDICT_SCHEMA_VERSION, None, "no_policy", "no gates configured: add `gates:` to gate.yaml", policy.alpha, summary, [])
    part = "select" if policy.confirm else None
    refs = references(policy, results, release)
    verdicts = [_checkpoint(policy, refs, ckpt, rng, part) for ckpt in results.checkpoints]
    _decide(policy, [v for v in verdicts if v.verdict != "error"])
    for v in verdicts:
        _conclude(v)
    passing = [(v, ckpt) for v, ckpt in zip(verdicts, results.checkpoints) if v.verdict == "pass"]
    suite, metric = policy.ranking
    if not passing:
        return Verdict(VERDICT_SCHEMA_VERSION, None, "no_candidate", _no_candidate_reason(verdicts), policy.alpha, summary, verdicts)
    ranked = sorted(passing, key=lambda vc: _rank_key(policy, results.base, vc[1], suite, metric, part))
    best, best_result = ranked[0]
    if policy.confirm:
        certified = _checkpoint(policy, refs, best_result, rng, "certify")
        _decide(policy, [certified])
        _conclude(certified)
        best.certification = certified.checks
        if certified.verdict != "pass":
            reason = f"{best.name} was the best on the selection half but did not pass on the held-out half: {certified.reason}"
            return Verdict(VERDICT_SCHEMA_VERSION, None, "not_certified", reason, policy.alpha, summary, verdicts)
    reason = f"{best.name} passes every gate and ranks first by {suite}.{metric}"
    return Verdict(VERDICT_SCHEMA_VERSION, best.name, "selected", reason, policy.alpha, summary, verdicts)


def _checkpoint(policy: Policy, refs: list[Reference], ckpt: ModelResult, rng, part: str | None) -> CheckpointVerdict:
    verdict = CheckpointVerdict(name=ckpt.name, step=ckpt.step, verdict="", reason="")
    if ckpt.status != "ok":
        verdict.verdict, verdict.reason = "error", f"{ckpt.status}: {ckpt.reason}"
        return verdict
    for ref in refs:
        for gate in policy.gates:
            if gate.kind == "floor" and ref.label != "base":
                continue  # a floor is about the checkpoint alone: checked once
            verdict.checks.append(_check(policy, gate, ref, ckpt, rng, part))
    if any(c.outcome == "error" for c in verdict.checks if not c.informational):
        verdict.verdict = "error"
    return verdict


def _check(policy: Policy, gate: Gate, ref: Reference, ckpt: ModelResult, rng, part: str | None) -> Check:
    check = Check(
        suite=gate.suite,
        metric=gate.metric,
        kind=gate.kind,
        bound=gate.bound,
        margin=gate.margin,
        relative=gate.relative,
        informational=gate.informational,
        outcome="",
        reason="",
        against=ref.label,
    )
    if gate.suite in ref.incomparable:
        check.outcome = "error"
        check.reason = f"{ref.label} was scored on other data or settings for suite {gate.suite!r}; bless it again after a run that scores it"
        return check
    if gate.suite in ckpt.skipped:
        check.outcome, check.reason = "skipped", f"not run on this checkpoint ({ckpt.skipped[gate.suite]})"
        return check
    try:
        data = paired(gate.suite, gate.metric, ref.model, ckpt)
        if part is not None:
            data = data.subset(_part_mask(data.ids, policy.confirm, part))
            if len(data.ids) == 0:
                raise PolicyError(f"the {part} part of suite {gate.suite!r} has no items; lower `confirm` or add items")
    except PolicyError as err:
        check.outcome, check.reason = "error", str(err)
        return check
    test = _test(gate, data, rng, policy.bootstrap_iterations)
    estimate = test.estimate(policy.alpha)
    threshold = _threshold(gate)
    lower_better = gate.lower_is_better
    # "passing" means: the effect is established on the good side of the threshold.
    wants_below = lower_better if gate.kind != "floor" else gate.bound == "max"
    check.p_value = test.p_below(threshold) if wants_below else test.p_above(threshold)
    check.p_fail = test.p_above(threshold) if wants_below else test.p_below(threshold)
    check.base_value, check.value = estimate.base, estimate.value
    check.delta = estimate.value - estimate.base
    if gate.kind == "floor" and not math.isfinite(estimate.base):
        check.base_value = check.delta = None  # a floor has no base value (and JSON has no NaN)
    check.effect, check.low, check.high = estimate.effect, estimate.low, estimate.high
    check.mcnemar_p, check.n, check.method = estimate.mcnemar_p, estimate.n, estimate.method
    if gate.kind != "floor":
        scale = estimate.base if (gate.relative and data.transform == "binary") else 1.0
        check.mde = minimum_detectable_effect(estimate.se, policy.alpha, estimate.n, data.transform == "binary", scale or 1.0)
        check.underpowered = gate.margin > 0 and gate.margin < check.mde
    return check


def _threshold(gate: Gate) -> float:
    return threshold(gate.kind, gate.lower_is_better, gate.margin)


def threshold(kind: str, lower_is_better: bool, margin: float) -> float:
    """A gate as a threshold on the effect; passing means the effect is established beyond it.

    Guardrails: harm may reach the margin (+margin for lower-is-better metrics, -margin else).
    Objectives: improvement must exceed it (-margin for lower-is-better, +margin else).
    Floors: the limit itself, on the checkpoint's own value.
    """
    if kind == "floor":
        return margin
    if kind == "guardrail":
        return margin if lower_is_better else -margin
    return -margin if lower_is_better else margin


def _test(gate: Gate, data: Paired, rng, iterations: int):
    if gate.kind == "floor":
        # A floor tests the checkpoint's own value against a fixed limit, not against the base.
        if data.transform == "binary":
            return BinomialValue(data.checkpoint)
        return ValueBootstrap(data.checkpoint, data.weights, data.transform, rng, iterations)
    if data.transform == "binary":
        return PairedBinary(data.base, data.checkpoint, relative=gate.relative)
    return PairedBootstrap(data.base, data.checkpoint, data.weights, data.transform, gate.relative, rng, iterations)


def paired(suite: str, metric: str, base: ModelResult, ckpt: ModelResult) -> Paired:
    """Align base and checkpoint per item for one suite metric; refuse anything that does not pair."""
    if suite in base.scores or suite in ckpt.scores:
        if suite not in base.scores or suite not in ckpt.scores:
            raise PolicyError(f"suite {suite!r} has no score for {'the base' if suite not in base.scores else ckpt.name}")
        b = {d.id: d for d in base.scores[suite].documents}
        c = {d.id: d for d in ckpt.scores[suite].documents}
        ids = _same_ids(suite, b, c)
        if metric in DRIFT_METRICS:
            return _drift_paired(suite, metric, ckpt, ids, c)
        weight = "tokens" if metric == "perplexity" else "bytes"
        for i in ids:
            if b[i].tokens != c[i].tokens:
                raise PolicyError(f"suite {suite!r}: document {i!r} has {b[i].tokens} scored tokens for the base but {c[i].tokens} for {ckpt.name}")
        return Paired(
            ids,
            np.array([b[i].nll for i in ids]),
            np.array([c[i].nll for i in ids]),
            np.array([getattr(b[i], weight) for i in ids], dtype=float),
            "exp" if metric == "perplexity" else "bits",
        )
    if suite not in base.tasks or suite not in ckpt.tasks:
        who = "the base" if suite not in base.tasks else ckpt.name
        raise PolicyError(f"suite {suite!r} has no score for {who}")
    b = {item.id: item for item in base.tasks[suite].items}
    c = {item.id: item for item in ckpt.tasks[suite].items}
    ids = _same_ids(suite, b, c)
    if any(b[i].prompt_hash != c[i].prompt_hash for i in ids):
        raise PolicyError(f"suite {suite!r}: the base and {ckpt.name} saw different prompts; re-run both with the same settings")
    if metric in ROLLING:
        weight, transform = ROLLING[metric]
        return Paired(
            ids,
            np.array([-b[i].values["loglikelihood"] for i in ids]),
            np.array([-c[i].values["loglikelihood"] for i in ids]),
            np.array([b[i].values[weight] for i in ids], dtype=float),
            transform,
        )
    missing = [i for i in ids if metric not in b[i].values or metric not in c[i].values]
    if missing:
        available = ", ".join(sorted(next(iter(b.values())).values)) if b else "none"
        raise PolicyError(f"suite {suite!r} has no per-item metric {metric!r} (available: {available}); fix the gate's metric")
    base_values = np.array([b[i].values[metric] for i in ids])
    ckpt_values = np.array([c[i].values[metric] for i in ids])
    binary = np.isin(base_values, (0.0, 1.0)).all() and np.isin(ckpt_values, (0.0, 1.0)).all()
    return Paired(ids, base_values, ckpt_values, np.ones(len(ids)), "binary" if binary else "identity")


def _drift_paired(suite: str, metric: str, ckpt: ModelResult, ids: list[str], docs: dict) -> Paired:
    """Drift is the checkpoint's own number (against the base, measured once): kl = sum kl_sum / sum tokens,
    top1 = sum top1_matches / sum tokens, each a ratio of per-document sums resampled by document."""
    if ckpt.scores[suite].drift is None:
        raise PolicyError(f"suite {suite!r} has no drift for {ckpt.name}; add `drift: true` to the suite and re-run `gate run`")
    numerator = [docs[i].kl_sum if metric == "kl" else docs[i].top1_matches for i in ids]
    return Paired(ids, np.zeros(len(ids)), np.array(numerator, dtype=float), np.array([docs[i].tokens for i in ids], dtype=float), "identity")


def _same_ids(suite: str, base: dict, ckpt: dict) -> list[str]:
    if set(base) != set(ckpt):
        only = sorted(set(base) ^ set(ckpt))
        raise PolicyError(f"suite {suite!r}: base and checkpoint scored different items (e.g. {only[0]!r}); re-run them together")
    if not base:
        raise PolicyError(f"suite {suite!r} has no items")
    return sorted(base)


def _part_mask(ids: list[str], fraction: float, part: str) -> np.ndarray:
    """Stable split of items: an item's half depends only on its id, never on the run."""
    position = np.array([int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") / 2**64 for i in ids])
    return position < fraction if part == "select" else position >= fraction


def _decide(policy: Policy, verdicts: list[CheckpointVerdict]) -> None:
    """Three-valued outcomes with Holm's correction per family (guardrails + floors; objectives)."""
    for family in (("guardrail", "floor"), ("objective",)):
        members = [c for v in verdicts for c in v.checks if c.kind in family and c.outcome == "" and not c.informational]
        for check, adjusted in zip(members, holm([c.p_value for c in members])):
            check.p_value = adjusted
    for v in verdicts:
        for c in v.checks:
            if c.outcome:
                continue
            if c.p_value <= policy.alpha:
                c.outcome = "pass"
            elif c.p_fail <= policy.alpha:
                c.outcome = "fail"
            else:
                c.outcome = "inconclusive"
            c.reason = _reason(c, policy.alpha)


def _conclude(v: CheckpointVerdict) -> None:
    if v.verdict == "error" and not v.checks:
        return
    deciding = [c for c in v.checks if not c.informational]
    for outcome in ("error", "fail", "inconclusive", "skipped"):
        hit = [c for c in deciding if c.outcome == outcome]
        if hit:
            v.verdict = "inconclusive" if outcome == "skipped" else outcome
            v.reason = f"{_prefix(hit[0])}{hit[0].suite}.{hit[0].metric}: {hit[0].reason}"
            return
    v.verdict, v.reason = "pass", "every gate passes"


def _prefix(c: Check) -> str:
    return "" if c.against == "base" else f"vs {c.against}: "


def _rank_key(policy: Policy, base: ModelResult, ckpt: ModelResult, suite: str, metric: str, part: str | None):
    data = paired(suite, metric, base, ckpt)
    if part is not None:
        data = data.subset(_part_mask(data.ids, policy.confirm, part))
    value = ratio_value(data.checkpoint, data.weights, data.transform)
    signed = value if metric in LOWER_IS_BETTER else -value
    return (signed, ckpt.step if ckpt.step is not None else math.inf, ckpt.name)


def _reason(c: Check, alpha: float) -> str:
    level = f"{(1 - 2 * alpha) * 100:g}% CI"
    fmt = _fmt_relative if c.relative else _fmt_absolute
    what = f"{c.metric} {fmt(c.effect)} ({level} {fmt(c.low)} to {fmt(c.high)})"
    if c.kind == "floor":
        what = f"{c.metric} {c.value:.4g} ({level} {c.low:.4g} to {c.high:.4g})"
        limit = f"the {'minimum' if c.bound == 'min' else 'maximum'} {c.margin:g}"
        return {
            "pass": f"{what} is within {limit}",
            "fail": f"{what} is beyond {limit}",
        }.get(c.outcome, f"{what}: cannot tell whether it is within {limit}")
    margin = fmt(threshold(c.kind, c.metric in LOWER_IS_BETTER, c.margin))
    if c.kind == "guardrail":
        text = {
            "pass": f"{what} stays within the {margin} margin",
            "fail": f"{what} exceeds the {margin} margin",
        }.get(c.outcome, f"{what}: cannot rule out a change beyond {margin}")
    else:
        text = {
            "pass": f"{what} improves beyond the required {margin}",
            "fail": f"{what} falls short of the required {margin}",
        }.get(c.outcome, f"{what}: the improvement beyond {margin} is not established")
    if c.underpowered and c.outcome != "fail":
        text += f"; the suite is too small to see a change of {fmt(c.margin).lstrip('+')} (it detects about {fmt(c.mde).lstrip('+')}): add items"
    return text


def _fmt_relative(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.2f}%"


def _fmt_absolute(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4g}"


def _no_candidate_reason(verdicts: list[CheckpointVerdict]) -> str:
    counts = {}
    for v in verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    listing = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return f"no checkpoint passes every gate ({listing or 'no checkpoints'})"


def _policy_summary(policy: Policy) -> dict:
    suite, metric = policy.ranking if policy.gates else (None, None)
    return {
        "gates": [g.describe() for g in policy.gates],
        "select": f"{suite}.{metric}" if suite else None,
        "alpha": policy.alpha,
        "confirm": policy.confirm,
        "seed": policy.seed,
        "bootstrap_iterations": policy.bootstrap_iterations,
        "multiple_comparisons": "holm (guardrails and floors; objectives)",
        "reference": policy.reference,
    }
