"""The verdict.json schema: what the policy decided for every checkpoint, and which one ships."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from gate.results import read_versioned_json, write_json_atomic

VERDICT_SCHEMA_VERSION = 1
OUTCOMES = ("selected", "no_candidate", "not_certified", "no_policy")


@dataclass
class Check:
    """One gate applied to one checkpoint."""

    suite: str
    """Suite name."""
    metric: str
    """Metric name."""
    kind: str
    """guardrail | objective | floor."""
    bound: str
    """max_increase | max_drop | min_decrease | min_gain | min | max."""
    margin: float
    """The gate's margin (or the floor's limit)."""
    relative: bool
    """Margin and effect are relative to the base's value (effect = value / base - 1)."""
    informational: bool
    """Reported, never decides."""
    outcome: str
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
    """One-sided lower confidence bound of the effect (level alpha)."""
    high: float | None = None
    """One-sided upper confidence bound of the effect (level alpha)."""
    p_value: float | None = None
    """Holm-adjusted p-value of the test that would pass the check (pass when <= alpha)."""
    p_fail: float | None = None
    """p-value of the test that would fail it (the bound shows the margin is exceeded)."""
    mcnemar_p: float | None = None
    """McNemar's exact two-sided p-value of 'no difference' (0/1 metrics)."""
    mde: float | None = None
    """Minimum detectable effect at this suite's size (80% power, level alpha), on the effect's scale."""
    underpowered: bool = False
    """The margin is below the MDE: the suite is too small to tell."""
    n: int = 0
    """Paired items."""
    method: str = ""
    """bootstrap | mcnemar | binomial."""
    against: str = "base"
    """What the checkpoint is compared with: ``base``, or the reference (``release:NAME``, a checkpoint name)."""


@dataclass
class CheckpointVerdict:
    """The policy's decision for one checkpoint."""

    name: str
    """Checkpoint name."""
    step: int | None
    """Training step."""
    verdict: str
    """pass | fail | inconclusive | error."""
    reason: str
    """One line: why."""
    checks: list[Check] = field(default_factory=list)
    """Every check, in policy order."""
    certification: list[Check] = field(default_factory=list)
    """With `confirm`: the candidate's checks on the held-out half of the items."""


@dataclass
class Verdict:
    """The whole verdict.json document."""

    schema_version: int
    """Version of this schema."""
    selected: str | None
    """The release candidate, or None."""
    outcome: str
    """selected | no_candidate | not_certified | no_policy."""
    reason: str
    """One line for people."""
    alpha: float
    """Family-wise significance level."""
    policy: dict
    """The policy applied: gates (one line each), select, alpha, confirm, seed, bootstrap iterations."""
    checkpoints: list[CheckpointVerdict]
    """Every checkpoint, in results order."""
    provenance: dict = field(default_factory=dict)
    """results.json it came from, gate version, time."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Verdict:
        checkpoints = [
            CheckpointVerdict(
                **{
                    **c,
                    "checks": [Check(**k) for k in c["checks"]],
                    "certification": [Check(**k) for k in c.get("certification", [])],
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
        path, VERDICT_SCHEMA_VERSION, "not found; run `gate run` or `gate check` first", "re-run `gate check` to rewrite it"
    )
    return Verdict.from_json(obj)
