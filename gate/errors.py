"""Domain errors. Each carries the exit code the CLI maps it to and a message that says what to do.

Exit codes (documented in README.md):
  0  success
  2  invalid input or configuration (the message names the file/flag and the fix)
  3  runtime failure (scoring could not be completed)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INVALID_INPUT = 2
EXIT_RUNTIME_FAILURE = 3


class GateError(Exception):
    """Base of all errors a user can cause or act on. ``str(err)`` is the message to show."""

    exit_code: int = EXIT_INVALID_INPUT


class ConfigError(GateError):
    """gate.yaml or command-line settings are invalid. ``problems`` lists every problem found."""

    def __init__(self, path: str | None, problems: list[str]):
        self.path = path
        self.problems = list(problems)
        where = f"{path}: " if path else ""
        if len(self.problems) == 1:
            super().__init__(f"{where}{self.problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{where}{len(self.problems)} problems:\n{lines}")


class SuiteError(GateError):
    """A suite's data cannot be used (missing file, bad line, no usable documents)."""


class CheckpointError(GateError):
    """A checkpoint folder cannot be used (missing or corrupt files, wrong base, no checkpoints)."""


class BaseModelError(GateError):
    """The base model cannot be found or loaded."""


class RunFailure(GateError):
    """Scoring failed at run time (out of memory at batch size 1, non-finite numbers, ...)."""

    exit_code = EXIT_RUNTIME_FAILURE


class StoreError(RunFailure):
    """The results store cannot be written (disk full...): it stops the whole run, never one checkpoint."""
