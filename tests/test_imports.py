"""Layering: only gate.runner (scoring) and gate.train (the demo's and tests' training) import torch,
transformers, peft or lm_eval; scoring never imports training."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gate

HEAVY = ("torch", "transformers", "peft", "lm_eval")


def test_cpu_side_modules_load_no_torch():
    code = (
        "import sys, gate, gate.cli, gate.config, gate.request, gate.results, gate.scan, gate.store, gate.suites\n"
        "import gate.policy, gate.stats, gate.verdict, gate.release, gate.reports, gate.reports.html\n"
        "import gate.work, gate.assemble, gate.flow, gate.api\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_the_runner_imports_heavy_libraries():
    package = Path(gate.__file__).parent
    pattern = re.compile(rf"^\s*(import|from)\s+({'|'.join(HEAVY)})\b", re.M)
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "runner" not in path.parts and "train" not in path.parts and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_scoring_never_imports_training():
    """The runner scores what training wrote, as it scores a user's folders: it holds no builders."""
    package = Path(gate.__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+gate\.train\b", re.M)
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py") if pattern.search(p.read_text()) and "train" not in p.parts]
    assert offenders == ["cli.py"]  # `gate demo` only, inside the command


def test_cli_imports_the_runner_lazily():
    source = (Path(gate.__file__).parent / "cli.py").read_text()
    assert not re.search(r"^(import|from) gate\.runner", source, re.M)
