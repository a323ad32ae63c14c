"""Layering: only gate.runner imports torch, transformers, peft or lm_eval."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gate

HEAVY = ("torch", "transformers", "peft", "lm_eval")


def test_cpu_side_modules_load_no_torch():
    code = (
        "import sys, gate, gate.cli, gate.config, gate.plan, gate.results, gate.scan, gate.store, gate.suites\n"
        "import gate.policy, gate.stats, gate.verdict, gate.release, gate.report, gate.report.html\n"
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
        if "runner" not in path.parts and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_cli_imports_the_runner_lazily():
    source = (Path(gate.__file__).parent / "cli.py").read_text()
    assert not re.search(r"^(import|from) gate\.runner", source, re.M)
