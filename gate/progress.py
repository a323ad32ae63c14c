"""Progress events the runner emits; the CLI renders them. No printing happens outside the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gate.kinds import ProgressKind


@dataclass
class ProgressEvent:
    """One step of a long run."""

    kind: ProgressKind
    """``stage`` (a message), ``start`` (a model x suite begins), ``advance`` (documents done), ``done``."""
    message: str = ""
    """What is happening, for ``stage`` events."""
    model: str = ""
    """Model being scored: ``base`` or a checkpoint name."""
    suite: str = ""
    """Suite being scored."""
    done: int = 0
    """Documents finished so far in this model x suite."""
    total: int = 0
    """Documents in this model x suite."""
    unit: str = "documents"
    """What ``done`` and ``total`` count (``documents``; ``steps`` for training)."""


ProgressFn = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """A ProgressFn that shows nothing (library use, tests)."""
