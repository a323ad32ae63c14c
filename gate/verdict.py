"""The verdict.json schema: what the policy decided for every checkpoint, and which one ships."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from gate.kinds import Bound, CheckOutcome, CheckpointOutcome, GateKind, VerdictOutcome
from gate.results import read_versioned_json, write_json_atomic

VERDICT_SCHEMA_VERSION = 3
OUTCOMES = ("selected", "no_candidate", "not_certified", "no_policy")


@dataclass
class Check:
    """One gate applied to one checkpoint."""

    suite: str
    """Suite name."""
    metric: str
    """Metric name."""
    kind: GateKind
    """guardrail | objective | floor."""
    bound: Bound
    """max_increase | max_drop | min_decrease | min_gain | min | max."""
    margin: float
    """The gate's margin (or the floor's limit)."""
    relative: bool
    """Margin and effect are relative to the base's value (effect = value / base - 1)."""
    informational: bool
    """Reported, never decides."""
    outcome: CheckOutcome
    """pass | fail | inconclusive | skipped | error."""
    reason: str
    """One line a person can read."""
    base_value: float | None = None
    """The base's value on the paired items."""
    value: float | None = None
    """The checkpoint's value on the same items."""
    delta: float | None = None
    """value - base_value."""
    effect: float | None = None
    """The change on the margin's scale (relative or absolute)."""
    low: float | None = None
    """One-sided lower confidence bound of the effect at ``level`` (None: the data cannot give one)."""
    high: float | None = None
    """One-sided upper confidence bound of the effect at ``level`` (None: the data cannot give one)."""
    level: float | None = None
    """One-sided level the check was decided at, and its bounds computed at: Holm's level for its checkpoint."""
    p_value: float | None = None
    """Unadjusted p-value of the test that would pass the check (it passes when p_value <= level)."""
    p_fail: float | None = None
    """Unadjusted p-value of the test that would fail it (it fails when p_fail <= level)."""
    mcnemar_p: float | None = None
    """McNemar's exact two-sided p-value of 'no difference' (0/1 metrics)."""
    mde: float | None = None
    """Minimum detectable effect at the family's level alpha / K (80% power), on the effect's scale."""
    items_needed: int | None = None
    """Items (clusters when clustered) for 80% power at the family's level, from the observed dispersion
    (guardrails: assuming no true change; objectives and floors: the change observed). None: no size can."""
    power: float | None = None
    """Chance this check passes at the family's level, under the same assumption (normal approximation)."""
    underpowered: bool = False
    """The suite has fewer items than ``items_needed``: too small to tell."""
    too_small: str = ""
    """Set when the suite has fewer items than the check's minimum: it cannot pass (it may still fail)."""
    degenerate: bool = False
    """Every item changed by the same amount: the bootstrap has no spread, nothing is certified."""
    n: int = 0
    """Paired items."""
    units: int = 0
    """Independent units: clusters when the gate clusters items, else ``n``."""
    method: str = ""
    """score (Tango) | mcnemar | bootstrap-t | binomial."""
    lower_is_better: bool = False
    """The metric's direction (the gate's ``higher_is_better``, the suite type's, or lm-eval's)."""
    against: str = "base"
    """What the checkpoint is compared with: ``base``, or the reference (``release:NAME``, a checkpoint name)."""
    threshold: float | None = None
    """The gate on the effect's scale (signed, like ``effect``): it passes when the effect is established
    beyond it (guardrails: +margin for lower-is-better metrics, -margin else; objectives: the opposite;
    floors: the limit on the checkpoint's own value)."""
    limit: float | None = None
    """The threshold on the metric's own scale, where the reports draw it: base_value x (1 + threshold)
    (relative) or base_value + threshold; floors: the limit. None when there is no base value."""
    min_items: int | None = None
    """The fewest items (clusters) the check needed to pass: the gate's ``min_items`` or gate.policy's default."""
    cluster: str | None = None
    """The item field the check resampled by (the gate's ``cluster:``); None: items are independent."""


@dataclass
class CheckpointVerdict:
    """The policy's decision for one checkpoint."""

    name: str
    """Checkpoint name."""
    step: int | None
    """Training step."""
    verdict: CheckpointOutcome
    """pass | fail | inconclusive | error."""
    reason: str
    """One line: why."""
    checks: list[Check] = field(default_factory=list)
    """Every check, in policy order (with `confirm`, for the selected checkpoint: on the held-out items)."""
    selection: list[Check] = field(default_factory=list)
    """With `confirm`, for the checkpoint certified: its checks on the selection items."""
    p_value: float | None = None
    """Intersection-union p-value: the largest of its non-informational checks' (1 for any that cannot pass)."""
    p_adjusted: float | None = None
    """Holm-adjusted p_value over the family of checkpoints (it passes when <= alpha)."""
    level: float | None = None
    """The level Holm tested it at (alpha / (K - step + 1)); its checks are decided at it."""
    p_all_pass: float | None = None
    """Chance every check passes at the family's level: the product of the checks' ``power``
    (an approximation that treats the checks as independent)."""


@dataclass
class Verdict:
    """The whole verdict.json document."""

    schema_version: int
    """Version of this schema."""
    selected: str | None
    """The release candidate, or None."""
    outcome: VerdictOutcome
    """selected | no_candidate | not_certified | no_policy."""
    reason: str
    """One line for people."""
    alpha: float
    """P(a checkpoint that violates any gate passes) is at most alpha (see gate.policy)."""
    policy: dict
    """The policy applied: gates (one line each), select, alpha, confirm, seed, bootstrap iterations."""
    checkpoints: list[CheckpointVerdict]
    """Every checkpoint, in results order."""
    provenance: dict = field(default_factory=dict)
    """results.json it came from, gate version, time."""
    policy_spec: dict = field(default_factory=dict)
    """The policy applied, field by field (gate.config.Policy.to_json): what `gate check` re-applies when
    the run's gate.yaml is gone and no --config is given."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Verdict:
        checkpoints = [
            CheckpointVerdict(
                **{
                    **c,
                    "checks": [Check(**k) for k in c["checks"]],
                    "selection": [Check(**k) for k in c.get("selection", [])],
                }
            )
            for c in obj["checkpoints"]
        ]
        return cls(**{**obj, "checkpoints": checkpoints})

    @property
    def exit_code(self) -> int:
        """0 when a candidate is selected (or no policy is set), 1 when none may ship."""
        return 0 if self.selected is not None or self.outcome == "no_policy" else 1


def write_verdict(path: str | Path, verdict: Verdict) -> None:
    """Write verdict.json atomically."""
    write_json_atomic(path, verdict.to_json())


def read_verdict(path: str | Path) -> Verdict:
    obj = read_versioned_json(
        path, VERDICT_SCHEMA_VERSION, "not found; run `gate run` or `gate check` first", "re-run `gate check` to rewrite it", Verdict
    )
    return Verdict.from_json(obj)
