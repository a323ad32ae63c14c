"""What a run is asked to do, prepared without torch: config + scan + suites -> RunRequest."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gate.config import GateConfig
from gate.errors import BaseModelError, SuiteError
from gate.scan import ScanReport
from gate.suites import Suite, load_suite


@dataclass
class RunRequest:
    """Everything the runner needs; built by the CLI (or a library user) before any model loads."""

    scan: ScanReport
    """The checkpoints found (valid ones are scored, invalid ones are reported)."""
    suites: list[Suite]
    """Loaded, validated suites."""
    base: str
    """Base model: a local folder or a hub id."""
    out_dir: Path
    """Output folder: results.json and the results store live here."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_length: int | None = None
    """Tokens per scored window; None: the model's context, capped at 2048."""
    stride: int | None = None
    """Sliding-window step; None: max_length // 2."""
    allow_pickle: bool = False
    """Permit pickled (.bin) weights, which can run code when loaded."""
    trust_remote_code: bool = False
    """Permit model code shipped with the base (runs that code)."""
    online: bool = False
    """Permit the Hugging Face hub to be contacted to resolve a hub id."""
    command: str = ""
    """Command line recorded in results.json."""
    warnings: list[str] = field(default_factory=list)
    """Warnings gathered while preparing the run."""


def choose_base(flag: str | None, config: GateConfig, scan: ScanReport) -> str:
    """--base, else gate.yaml's base, else the base that the valid adapters name."""
    if flag:
        return flag
    if config.base:
        return config.base
    named = Counter(c.base_model for c in scan.valid if c.kind == "lora" and c.base_model)
    if len(named) == 1:
        return next(iter(named))
    if not named:
        raise BaseModelError(
            "no base model: the checkpoints name none; pass --base MODEL or set `base:` in gate.yaml"
        )
    listing = ", ".join(f"{b!r} ({n})" for b, n in named.most_common())
    raise BaseModelError(f"adapters name different bases ({listing}); pass --base MODEL to choose one")


def load_suites(config: GateConfig) -> list[Suite]:
    """Load every suite of the config; report all broken suites at once."""
    suites, problems = [], []
    for spec in config.suites:
        try:
            suites.append(
                load_suite(spec.name, spec.path, chat_template=spec.chat_template, max_documents=spec.max_documents)
            )
        except SuiteError as err:
            problems.append(str(err))
    if problems:
        raise SuiteError("\n".join(problems))
    return suites
