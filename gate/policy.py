"""The policy engine, pure: (policy, results, rng) -> verdict. No I/O, no clock, no torch.

For every checkpoint and gate, the base and the checkpoint are compared item by item (gate.stats).
Each gate is a one-sided test whose rejection means "this gate holds":

* guardrail (max_increase / max_drop): H0 "the harm reaches the margin" (non-inferiority);
* objective (min_decrease / min_gain): H0 "the improvement does not exceed the required gain";
* floor (min / max): H0 "the checkpoint's own value is beyond the limit".

**One guarantee.** A checkpoint may ship only when every one of its non-informational checks
passes: an intersection-union test (Berger 1982) whose p-value is the largest of its checks'.
Holm's step-down procedure (Holm 1979) runs over these per-checkpoint p-values, one family of
all checkpoints (guardrails, objectives and floors together, against the base and the
reference). So P(some checkpoint that violates any gate passes) <= alpha, and since only a
passing checkpoint can be selected, P(shipping a checkpoint that violates a gate) <= alpha.
Holm tests checkpoint j at level alpha / (K - r + 1) (K checkpoints, r its step); every check of
j is decided, and its bounds shown, at that level: pass when its p-value is <= the level (its
one-sided bound lies inside the margin), **fail** when the opposite one-sided test rejects at the
same level (the other bound lies beyond it), else **inconclusive**. Fails protect nothing and
need no correction; deciding them at the same level keeps one interval per check.
With ``confirm``, checks and ranking use one part of the items, and only the chosen checkpoint is
certified, at alpha, on the held-out part: its held-out checks are its headline.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from gate.config import DRIFT_METRICS, GATE_BOUNDS, LOWER_IS_BETTER, Gate, Policy, known_direction
from gate.errors import GateError
from gate.kinds import CheckOutcome, CheckpointOutcome
from gate.results import ModelResult, Results
from gate.stats import (
    BinomialValue,
    PairedBinary,
    PairedBootstrap,
    ValueBootstrap,
    holm,
    holm_levels,
    items_needed,
    minimum_detectable_effect,
    power_at,
    ratio_value,
)
from gate.verdict import VERDICT_SCHEMA_VERSION, Check, CheckpointVerdict, Verdict

ROLLING = {"word_perplexity": ("words", "exp"), "byte_perplexity": ("bytes", "exp"), "bits_per_byte": ("bytes", "bits")}
LOG_LIKELIHOOD_AGGREGATIONS = {"perplexity"}
"""lm-eval aggregations whose per-item values are log-likelihoods (lambada's ``perplexity``):
the suite's value is exp(-mean log-likelihood), a corpus perplexity, never a mean of the items."""
MIN_ITEMS_BINARY = 10
"""Default minimum items of a 0/1 check (the score test's size is enumerated from n = 10)."""
MIN_ITEMS_BOOTSTRAP = 20
"""Default minimum items (or clusters) of a bootstrap check (its size is simulated from n = 20)."""
REPLICATES_PER_STEP = 20
"""Bootstrap replicates are at least 20 K / alpha: the smallest p-value, 1 / (B + 1), stays far
below Holm's smallest level alpha / K, so resolution never decides a check."""


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
    clusters: np.ndarray | None = None
    """Per item, the cluster it belongs to (the gate's ``cluster:`` field), or None: items are independent."""

    def subset(self, keep: np.ndarray) -> Paired:
        clusters = None if self.clusters is None else self.clusters[keep]
        ids = [i for i, k in zip(self.ids, keep) if k]
        return Paired(ids, self.base[keep], self.checkpoint[keep], self.weights[keep], self.transform, clusters)

    @property
    def units(self) -> int:
        """Independent units: clusters when clustered, else items."""
        return len(self.ids) if self.clusters is None else len(set(self.clusters.tolist()))


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
            problems.append(
                f"{where}: suite {suite!r} was scored without drift, so it has no {metric!r}; add `drift: true` to it and re-run `gate run`"
            )
            continue
        if suites[suite].type in ("lm_eval", "generate"):
            available = set()
            for model in (results.base, *results.checkpoints):
                if suite in model.tasks:
                    available |= set(model.tasks[suite].metrics)
            if available and metric not in available:
                problems.append(f"{where}: suite {suite!r} has no metric {metric!r} (it has: {', '.join(sorted(available))})")
                continue
        problems += _direction_problems(policy, results, where, suite, metric)
    return problems


def _direction_problems(policy: Policy, results: Results, where: str, suite: str, metric: str) -> list[str]:
    """An unknown direction, or a bound that points the wrong way for the metric's direction."""
    gate = policy.gates[int(where[6:-1])] if where.startswith("gates[") else None
    lower = _direction_of(policy, results, suite, metric, gate)
    if lower is None:
        return [_unknown_direction(where, suite, metric)]
    wants_lower = GATE_BOUNDS[gate.bound][1] if gate is not None else None
    if wants_lower is not None and wants_lower != lower:
        fitting = "max_increase / min_decrease" if lower else "max_drop / min_gain"
        return [f"{where}.{gate.bound}: {suite}.{metric} is better when {'lower' if lower else 'higher'}; use {fitting}"]
    return []


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
    """Apply the policy to results.json's numbers (and to the blessed release, when it is the reference).

    The verdict records the policy itself (``policy_spec``), so it can be applied again without gate.yaml.
    """
    verdict = _evaluate(policy, results, rng, release)
    verdict.policy_spec = policy.to_json()
    return verdict


def _evaluate(policy: Policy, results: Results, rng: np.random.Generator, release=None) -> Verdict:
    summary = _policy_summary(policy)
    if not policy.gates:
        return Verdict(
            VERDICT_SCHEMA_VERSION, None, "no_policy", "no gates configured: add `gates:` to gate.yaml", policy.alpha, summary, []
        )
    lower = directions(policy, results)
    part = "select" if policy.confirm else None
    refs = references(policy, results, release)
    family = sum(1 for c in results.checkpoints if c.status == "ok")
    summary["family"] = family
    summary["bootstrap_iterations"] = replicates(policy, family)
    verdicts, tests = [], {}
    for ckpt in results.checkpoints:
        verdict, found = _checkpoint(policy, refs, ckpt, rng, part, lower, family, results.base)
        verdicts.append(verdict)
        tests.update(found)
    _decide(policy, [v for v, c in zip(verdicts, results.checkpoints) if c.status == "ok"], tests, family)
    for v in verdicts:
        _conclude(v)
    passing = [(v, ckpt) for v, ckpt in zip(verdicts, results.checkpoints) if v.verdict == "pass"]
    suite, metric = policy.ranking
    if not passing:
        return Verdict(VERDICT_SCHEMA_VERSION, None, "no_candidate", _no_candidate_reason(verdicts), policy.alpha, summary, verdicts)
    lower_rank = _direction_of(policy, results, suite, metric)
    ranked = sorted(passing, key=lambda vc: _rank_key(policy, results.base, vc[1], suite, metric, part, lower_rank))
    best, best_result = ranked[0]
    if policy.confirm:
        # Only the chosen checkpoint is tested on the held-out items: a family of one, at alpha.
        certified, found = _checkpoint(policy, refs, best_result, rng, "certify", lower, 1, results.base)
        _decide(policy, [certified], found, 1)
        _conclude(certified)
        best.selection, best.checks = best.checks, certified.checks
        best.p_value, best.p_adjusted, best.level, best.p_all_pass = (
            certified.p_value,
            certified.p_adjusted,
            certified.level,
            certified.p_all_pass,
        )
        if certified.verdict != "pass":
            best.verdict = certified.verdict
            best.reason = f"held-out items: {certified.reason} (it passed on the selection items)"
            reason = f"{best.name} was the best on the selection items but did not pass on the held-out items: {certified.reason}"
            return Verdict(VERDICT_SCHEMA_VERSION, None, "not_certified", reason, policy.alpha, summary, verdicts)
        best.reason = "every gate passes on the held-out items"
    reason = f"{best.name} passes every gate and ranks first by {suite}.{metric}"
    return Verdict(VERDICT_SCHEMA_VERSION, best.name, "selected", reason, policy.alpha, summary, verdicts)


def replicates(policy: Policy, family: int) -> int:
    """Bootstrap replicates for a family of ``family`` checkpoints: at least 20 K / alpha."""
    return max(policy.bootstrap_iterations, math.ceil(REPLICATES_PER_STEP * max(family, 1) / policy.alpha))


def directions(policy: Policy, results: Results) -> list[bool]:
    """Per gate: is its metric better when lower? Raises PolicyError naming every gate it cannot tell."""
    found, problems = [], []
    for i, gate in enumerate(policy.gates):
        lower = _direction_of(policy, results, gate.suite, gate.metric, gate)
        if lower is None:
            problems.append(_unknown_direction(f"gates[{i}]", gate.suite, gate.metric))
        found.append(bool(lower))
    if problems:
        raise PolicyError("; ".join(problems))
    return found


def _unknown_direction(where: str, suite: str, metric: str) -> str:
    return (
        f"{where}: the direction of {suite}.{metric} is unknown (lm-eval did not record higher_is_better for it); "
        "set `higher_is_better: true` or `false` in the gate"
    )


def _direction_of(policy: Policy, results: Results, suite: str, metric: str, gate: Gate | None = None) -> bool | None:
    """lower-is-better: the gate's own setting, else the suite type's, else lm-eval's higher_is_better."""
    if gate is None:
        gate = next((g for g in policy.gates if (g.suite, g.metric) == (suite, metric) and g.higher_is_better is not None), None)
    if gate is not None and gate.higher_is_better is not None:
        return not gate.higher_is_better
    info = next((s for s in results.suites if s.name == suite), None)
    if info is not None and info.type == "perplexity":
        return metric not in DRIFT_METRICS or metric in LOWER_IS_BETTER  # top1 agreement: higher is better
    if info is not None and info.type == "generate":
        # Probes: checks passed, `ok` and `ended` are better high; `words` and `repetition` low.
        return metric in LOWER_IS_BETTER
    for model in (results.base, *results.checkpoints):
        task = model.tasks.get(suite)
        name = metric.split(",")[0]  # "exact_match,strict-match": lm-eval keys directions by metric
        if task is not None and name in task.higher_is_better:
            return not task.higher_is_better[name]
        if task is not None and info is not None and name == "perplexity":
            return None  # lm-eval's per-item `perplexity` is a log-likelihood: only the task can say how it aggregates
    return known_direction(metric)


def _checkpoint(policy, refs, ckpt: ModelResult, rng, part, lower: list[bool], family: int, groups: ModelResult | None = None):
    """One checkpoint's checks, undecided, and the tests behind them (by id of the check)."""
    verdict = CheckpointVerdict(name=ckpt.name, step=ckpt.step, verdict="", reason="")
    tests = {}
    if ckpt.status != "ok":
        verdict.verdict, verdict.reason = "error", f"{ckpt.status}: {ckpt.reason}"
        return verdict, tests
    iterations = replicates(policy, family)
    for ref in refs:
        for gate, lower_better in zip(policy.gates, lower):
            if gate.kind == "floor" and ref.label != "base":
                continue  # a floor is about the checkpoint alone: checked once
            check, test = _check(policy, gate, lower_better, ref, ckpt, rng, part, iterations, groups)
            verdict.checks.append(check)
            if test is not None:
                tests[id(check)] = test
    return verdict, tests


def _check(policy: Policy, gate: Gate, lower_better: bool, ref: Reference, ckpt: ModelResult, rng, part, iterations: int, groups=None):
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
        lower_is_better=lower_better,
        threshold=threshold(gate.kind, lower_better, gate.margin),
        cluster=gate.cluster,
    )
    if gate.suite in ref.incomparable:
        check.outcome = "error"
        check.reason = (
            f"{ref.label} was scored on other data or settings for suite {gate.suite!r}; bless it again after a run that scores it"
        )
        return check, None
    if gate.suite in ckpt.skipped:
        check.outcome, check.reason = "skipped", f"not run on this checkpoint ({ckpt.skipped[gate.suite]})"
        return check, None
    try:
        data = paired(gate.suite, gate.metric, ref.model, ckpt, cluster=gate.cluster, groups=groups)
        if part is not None:
            data = data.subset(_part_mask(data.ids, policy.confirm, part))
            if len(data.ids) == 0:
                raise PolicyError(f"the {part} part of suite {gate.suite!r} has no items; lower `confirm` or add items")
    except PolicyError as err:
        check.outcome, check.reason = "error", str(err)
        return check, None
    check.n = len(data.ids)
    check.units = data.units
    if ref.label != "base" and _same_model(ref.model, ckpt):
        # Not a statistical question: the reference is this very checkpoint.
        check.outcome, check.p_value, check.p_fail = "pass", 0.0, 1.0
        check.reason = f"the same weights as {ref.label}: nothing changed"
        return check, None
    binary = data.transform == "binary" and data.clusters is None
    minimum = gate.min_items or (MIN_ITEMS_BINARY if binary else MIN_ITEMS_BOOTSTRAP)
    check.min_items = minimum
    if data.units < minimum:
        # Too few items to certify anything; a regression can still be clear enough to fail.
        what = "clusters" if data.clusters is not None else "items"
        check.too_small = (
            f"too small: {data.units} {what}, at least {minimum} needed for this check; add {what} (or lower the gate's min_items)"
        )
    try:
        test = _test(gate, data, rng, iterations)
    except ValueError:
        # A relative change needs a base value above 0: base accuracy 0 has no "5% of it".
        check.outcome = "inconclusive"
        check.base_value = float(ratio_value(data.base, data.weights, data.transform))
        check.reason = (
            f"the {ref.label}'s {gate.metric} is {check.base_value:g} on these items, so a change relative to it is undefined; "
            f"give the gate an absolute margin instead of a percentage"
        )
        return check, None
    t = threshold(gate.kind, lower_better, gate.margin)
    # "passing" means: the effect is established on the good side of the threshold.
    wants_below = lower_better if gate.kind != "floor" else gate.bound == "max"
    check.p_value = test.p_below(t) if wants_below else test.p_above(t)
    check.p_fail = test.p_above(t) if wants_below else test.p_below(t)
    if check.too_small:
        check.p_value = 1.0
    return check, test


def _same_model(reference: ModelResult, ckpt: ModelResult) -> bool:
    if reference.weights_hash and ckpt.weights_hash:
        return reference.weights_hash == ckpt.weights_hash
    return reference.name == ckpt.name


def _plan(c: Check, estimate, family_level: float) -> None:
    """MDE, items needed and the chance to pass, at the family's level alpha / K (the hardest Holm step)."""
    c.mde = minimum_detectable_effect(estimate.se, family_level)
    t = threshold(c.kind, c.lower_is_better, c.margin)
    wants_below = c.lower_is_better if c.kind != "floor" else c.bound == "max"
    # Guardrails assume no true change; objectives and floors the change observed.
    where = 0.0 if c.kind == "guardrail" else estimate.effect
    distance = (t - where) if wants_below else (where - t)
    c.items_needed = items_needed(estimate.dispersion, distance, family_level)
    c.power = 0.0 if (c.too_small or estimate.degenerate) else power_at(distance, estimate.se, family_level)
    c.underpowered = c.items_needed is not None and c.items_needed > c.units


def _limit(c: Check) -> float | None:
    """The check's threshold on the metric's own scale (floors: the limit itself); None without a base value."""
    if c.kind == "floor":
        return c.margin
    if c.base_value is None or c.threshold is None:
        return None
    return c.base_value * (1 + c.threshold) if c.relative else c.base_value + c.threshold


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
        if data.transform == "binary" and data.clusters is None:
            return BinomialValue(data.checkpoint)
        return ValueBootstrap(data.checkpoint, data.weights, data.transform, rng, iterations, data.clusters)
    if data.transform == "binary" and data.clusters is None:
        return PairedBinary(data.base, data.checkpoint, relative=gate.relative)
    # Clustered 0/1 items are not independent: the cluster bootstrap of the mean replaces the score test.
    transform = "identity" if data.transform == "binary" else data.transform
    return PairedBootstrap(data.base, data.checkpoint, data.weights, transform, gate.relative, rng, iterations, data.clusters)


def paired(
    suite: str, metric: str, base: ModelResult, ckpt: ModelResult, cluster: str | None = None, groups: ModelResult | None = None
) -> Paired:
    """Align base and checkpoint per item for one suite metric; refuse anything that does not pair.

    ``cluster`` names the item field that groups items (a passage id, a subject): each item's value
    of it is read from the records of ``groups`` (the base model of results.json, whose records
    carry it; default: ``base``) and kept in ``Paired.clusters``.
    """
    data = _paired(suite, metric, base, ckpt)
    if cluster is not None:
        data.clusters = _clusters(suite, cluster, groups or base, data.ids)
    return data


def _clusters(suite: str, field: str, base: ModelResult, ids: list[str]) -> np.ndarray:
    records = base.scores[suite].documents if suite in base.scores else (base.tasks[suite].items if suite in base.tasks else [])
    groups = {r.id: r.groups.get(field) for r in records}
    missing = [i for i in ids if groups.get(i) is None]
    if missing:
        raise PolicyError(
            f"suite {suite!r}: item {missing[0]!r} has no {field!r} field to cluster by ({len(missing)} items lack it); "
            f"fix the gate's `cluster:` or re-run `gate run` so that the field is recorded"
        )
    return np.array([str(groups[i]) for i in ids])


def _paired(suite: str, metric: str, base: ModelResult, ckpt: ModelResult) -> Paired:
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
                raise PolicyError(
                    f"suite {suite!r}: document {i!r} has {b[i].tokens} scored tokens for the base but {c[i].tokens} for {ckpt.name}"
                )
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
    aggregation = base.tasks[suite].aggregation.get(metric) or ckpt.tasks[suite].aggregation.get(metric)
    if aggregation in LOG_LIKELIHOOD_AGGREGATIONS and metric not in ROLLING:
        # Per-item log-likelihoods (lambada's "perplexity"): the suite's value is exp(-mean ll).
        _require(suite, metric, b, c, ids)
        return Paired(
            ids,
            np.array([-b[i].values[metric] for i in ids]),
            np.array([-c[i].values[metric] for i in ids]),
            np.ones(len(ids)),
            "exp",
        )
    if metric in ROLLING:
        weight, transform = ROLLING[metric]
        return Paired(
            ids,
            np.array([-b[i].values["loglikelihood"] for i in ids]),
            np.array([-c[i].values["loglikelihood"] for i in ids]),
            np.array([b[i].values[weight] for i in ids], dtype=float),
            transform,
        )
    # An item that has the metric on neither side is not counted (a generate probe without that
    # check); one side only means the two were scored differently.
    ids = [i for i in ids if metric in b[i].values or metric in c[i].values] or ids
    _require(suite, metric, b, c, ids)
    base_values = np.array([b[i].values[metric] for i in ids])
    ckpt_values = np.array([c[i].values[metric] for i in ids])
    binary = np.isin(base_values, (0.0, 1.0)).all() and np.isin(ckpt_values, (0.0, 1.0)).all()
    return Paired(ids, base_values, ckpt_values, np.ones(len(ids)), "binary" if binary else "identity")


def _require(suite: str, metric: str, b: dict, c: dict, ids: list[str]) -> None:
    missing = [i for i in ids if metric not in b[i].values or metric not in c[i].values]
    if missing:
        available = ", ".join(sorted(next(iter(b.values())).values)) if b else "none"
        raise PolicyError(f"suite {suite!r} has no per-item metric {metric!r} (available: {available}); fix the gate's metric")


def _drift_paired(suite: str, metric: str, ckpt: ModelResult, ids: list[str], docs: dict) -> Paired:
    """Drift is the checkpoint's own number (against the base, measured once): kl = sum kl_sum / sum tokens,
    top1 = sum top1_matches / sum tokens, each a ratio of per-document sums resampled by document."""
    if ckpt.scores[suite].drift is None:
        raise PolicyError(f"suite {suite!r} has no drift for {ckpt.name}; add `drift: true` to the suite and re-run `gate run`")
    numerator = [docs[i].kl_sum if metric == "kl" else docs[i].top1_matches for i in ids]
    return Paired(
        ids, np.zeros(len(ids)), np.array(numerator, dtype=float), np.array([docs[i].tokens for i in ids], dtype=float), "identity"
    )


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


def _decide(policy: Policy, verdicts: list[CheckpointVerdict], tests: dict, family: int) -> None:
    """One family: each checkpoint's p is its checks' largest (intersection-union); Holm over checkpoints.

    Every check of a checkpoint is then decided at the level Holm tested that checkpoint at, and its
    bounds are computed at that level, so the bounds shown are the ones the decision used.
    """
    for v in verdicts:
        deciding = [c for c in v.checks if not c.informational]
        v.p_value = max((1.0 if c.p_value is None else c.p_value for c in deciding), default=1.0)
    if not verdicts:
        return
    adjusted = holm([v.p_value for v in verdicts])
    levels = holm_levels([v.p_value for v in verdicts], policy.alpha)
    family_level = policy.alpha / max(family, 1)
    for v, p_adjusted, level in zip(verdicts, adjusted, levels):
        v.p_adjusted, v.level = p_adjusted, level
        for c in v.checks:
            c.level = policy.alpha if c.informational else level
            test = tests.get(id(c))
            if test is None:
                continue
            estimate = test.estimate(c.level, threshold(c.kind, c.lower_is_better, c.margin))
            c.base_value = None if math.isnan(estimate.base) else estimate.base  # floors have no base value
            c.limit = _limit(c)
            c.value = estimate.value
            c.delta = estimate.value - estimate.base if c.kind != "floor" else None
            c.effect, c.low, c.high = estimate.effect, estimate.low, estimate.high
            c.mcnemar_p, c.n, c.method = estimate.mcnemar_p, estimate.n, estimate.method
            c.degenerate = estimate.degenerate
            _plan(c, estimate, family_level)
            if c.too_small and not (c.p_fail is not None and c.p_fail <= c.level and not estimate.degenerate):
                c.outcome, c.reason = "inconclusive", c.too_small
                continue
            if estimate.degenerate:
                c.outcome = "inconclusive"
                c.reason = (
                    f"{c.metric} {_fmt(c)(c.effect)}: every {'cluster' if c.units < c.n else 'item'} changed by the same amount, "
                    "so its uncertainty cannot be estimated and nothing is certified; add items"
                )
                continue
            if c.p_value <= c.level:
                c.outcome = "pass"
            elif c.p_fail <= c.level:
                c.outcome = "fail"
            else:
                c.outcome = "inconclusive"
            c.reason = _reason(c)


def _conclude(v: CheckpointVerdict) -> None:
    if v.verdict == "error" and not v.checks:
        return
    deciding = [c for c in v.checks if not c.informational]
    powers = [c.power for c in deciding]
    v.p_all_pass = math.prod(powers) if powers and all(p is not None for p in powers) else None
    worst: tuple[tuple[CheckOutcome, CheckpointOutcome], ...] = (
        ("error", "error"),
        ("fail", "fail"),
        ("inconclusive", "inconclusive"),
        ("skipped", "inconclusive"),
    )
    for outcome, verdict in worst:
        hit = [c for c in deciding if c.outcome == outcome]
        if hit:
            v.verdict = verdict
            v.reason = f"{_prefix(hit[0])}{hit[0].suite}.{hit[0].metric}: {hit[0].reason}"
            return
    v.verdict, v.reason = "pass", "every gate passes"


def _prefix(c: Check) -> str:
    return "" if c.against == "base" else f"vs {c.against}: "


def _rank_key(policy: Policy, base: ModelResult, ckpt: ModelResult, suite: str, metric: str, part: str | None, lower_better):
    data = paired(suite, metric, base, ckpt)
    if part is not None:
        data = data.subset(_part_mask(data.ids, policy.confirm, part))
    value = ratio_value(data.checkpoint, data.weights, data.transform)
    signed = value if lower_better else -value
    return (signed, ckpt.step if ckpt.step is not None else math.inf, ckpt.name)


def _fmt(c: Check):
    return _fmt_relative if c.relative else _fmt_absolute


def _reason(c: Check) -> str:
    """One line that says what the decision used: the bounds at the check's level, against the margin."""
    level = f"{(1 - 2 * c.level) * 100:.4g}% CI"
    fmt = _fmt(c)
    if c.kind == "floor":
        what = f"{c.metric} {c.value:.4g} ({level} {_num(c.low)} to {_num(c.high)})"
        limit = f"the {'minimum' if c.bound == 'min' else 'maximum'} {c.margin:g}"
        text = {
            "pass": f"{what} is within {limit}",
            "fail": f"{what} is beyond {limit}",
        }.get(c.outcome, f"{what}: cannot tell whether it is within {limit}")
    else:
        what = f"{c.metric} {fmt(c.effect)} ({level} {fmt(c.low)} to {fmt(c.high)})"
        margin = fmt(threshold(c.kind, c.lower_is_better, c.margin))
        if c.kind == "guardrail":
            text = {
                "pass": f"{what} stays within the {margin} margin",
                "fail": f"{what} exceeds the {margin} margin",
            }.get(c.outcome, f"{what}: the interval reaches past the {margin} margin, so a change beyond it is not ruled out")
        else:
            text = {
                "pass": f"{what} improves beyond the required {margin}",
                "fail": f"{what} falls short of the required {margin}",
            }.get(c.outcome, f"{what}: the interval reaches below the required {margin}, so the improvement is not established")
    if c.outcome == "inconclusive" and c.underpowered:
        what = "clusters" if c.units < c.n else "items"
        text += f"; too small: about {c.items_needed} {what} needed to settle it at the family's level (it has {c.units})"
    return text


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


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
        "multiple_comparisons": "intersection-union within a checkpoint, holm across checkpoints (one family)",
        "reference": policy.reference,
    }
