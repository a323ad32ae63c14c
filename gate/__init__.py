"""gate: evaluation and regression gating for fine-tuned LLM checkpoints.

The public library surface. Importing ``gate`` never imports torch: the runner
(``gate.runner``) is loaded only by the commands that score models.
"""

__version__ = "0.1.0"

from gate.api import Run, apply_policy, check, merge, report, run
from gate.config import GateConfig, SuiteSpec, load_config
from gate.errors import CheckpointError, ConfigError, GateError, RunFailure, SuiteError
from gate.results import DocumentScore, ModelResult, Results, SuiteScore, load_results, read_results
from gate.scan import Checkpoint, ScanReport, scan
from gate.suites import Document, Suite, load_suite

__all__ = [
    "Run",
    "apply_policy",
    "check",
    "merge",
    "report",
    "run",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "Document",
    "DocumentScore",
    "GateConfig",
    "GateError",
    "ModelResult",
    "Results",
    "RunFailure",
    "ScanReport",
    "Suite",
    "SuiteError",
    "SuiteScore",
    "SuiteSpec",
    "__version__",
    "load_config",
    "load_results",
    "load_suite",
    "read_results",
    "scan",
]
