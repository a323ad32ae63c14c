"""The GitHub Action run end to end: action.yml executed step by step as the runner does.

`.ci/run-action.mjs` parses the action with GitHub's @actions/workflow-parser and evaluates every
`if:` and `${{ }}` with GitHub's @actions/expressions; bash steps run for real with the
GITHUB_OUTPUT / GITHUB_ENV / GITHUB_STEP_SUMMARY files; `uses:` steps are recording fakes (a
cache with exact and prefix restore, an artifact store, a comment API that can fail).

What is real and what stands in: gate itself runs for real on the tiny test model. Installing
torch and gate from an index is the one thing a test cannot do offline, so the interpreter the
action is given (setup-python's `python-path`) is a shim: `-m venv DIR` makes a venv whose
`bin/python` is the same shim, `-m pip ...` is recorded instead of run (so the test can see what
the action would install, and nothing touches the test's own environment), and everything else
runs this test's interpreter with this checkout on PYTHONPATH. So the venv that the cache saves
and restores, its install marker and the decision to (re)install are the action's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACTION_DIR = ROOT / ".github" / "actions" / "gate"
RUNNER = ROOT / ".ci" / "run-action.mjs"
NODE_MODULES = Path(os.environ.get("GATE_NODE_MODULES", ROOT / ".ci" / "node" / "node_modules"))
NEEDS = "node and the npm packages @actions/expressions and @actions/workflow-parser in .ci/node (.ci/run installs them)"


@pytest.fixture(scope="module")
def node_ready():
    ready = shutil.which("node") and all((NODE_MODULES / "@actions" / p / "package.json").is_file() for p in ("expressions", "workflow-parser"))
    if not ready:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the action's end-to-end test: it needs {NEEDS}")
        pytest.skip(f"needs {NEEDS}")


@pytest.fixture(scope="module")
def action_repo(tmp_path_factory, node_ready) -> Path:
    """A copy of the action's repository, as the runner downloads it (its version can be bumped)."""
    repo = tmp_path_factory.mktemp("action-repo")
    shutil.copytree(ROOT / "gate", repo / "gate", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "suites", repo / "suites")
    shutil.copy(ROOT / "pyproject.toml", repo)
    shutil.copytree(ACTION_DIR, repo / ".github" / "actions" / "gate")
    return repo


def set_version(repo: Path, version: str) -> None:
    init = repo / "gate" / "__init__.py"
    text = init.read_text()
    start = text.index('__version__ = "')
    end = text.index('"', start + len('__version__ = "'))
    init.write_text(text[:start] + f'__version__ = "{version}' + text[end:])


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> tuple[Path, Path]:
    """The interpreter handed to the action (see the module docstring) and its pip log."""
    folder = tmp_path_factory.mktemp("shim")
    log = folder / "pip.log"
    log.touch()
    python = folder / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f"if [ \"$1\" = -m ] && [ \"$2\" = pip ]; then printf '%s\\n' \"${{*:3}}\" >> '{log}'; exit 0; fi\n"
        f"if [ \"$1\" = -m ] && [ \"$2\" = venv ]; then mkdir -p \"$3/bin\" && cp \"$0\" \"$3/bin/python\" && echo \"venv $3\" >> '{log}'; exit 0; fi\n"
        f"PYTHONPATH='{ROOT}'${{PYTHONPATH:+:$PYTHONPATH}} exec '{sys.executable}' \"$@\"\n"
    )
    python.chmod(0o755)
    return python, log


@dataclass
class World:
    """Shared state of one simulated repository: its caches, artifacts and PR comments."""

    root: Path
    repo: Path
    python: Path
    pip_log: Path
    runs: int = 0
    defaults: dict = field(default_factory=dict)

    @property
    def comments(self) -> list[dict]:
        file = self.root / "comments.json"
        return json.loads(file.read_text())["comments"] if file.exists() else []

    def run(self, with_: dict, *, cache: str = "cache", artifacts: str = "artifacts", job: str = "gate", run_id: int | None = None,
            attempt: int = 1, strategy: dict | None = None, arch: str = "X64", event: str = "pull_request", fork: bool = False,
            comments_fail: bool = False, token_login: str | None = None, hf_home: Path | None = None) -> dict:
        """One job using the action, on a fresh runner (new workspace and temp); returns the record."""
        self.runs += 1
        job_dir = self.root / f"job{self.runs}"
        workspace = job_dir / "ws"
        workspace.mkdir(parents=True)
        (job_dir / "temp").mkdir()
        head = "someone/fork" if fork else "org/models"
        spec = {
            "action": str(self.repo / ".github" / "actions" / "gate" / "action.yml"),
            "with": {**self.defaults, **with_},
            "workspace": str(workspace),
            "env": {**os.environ, "HF_HOME": str(hf_home or self.root / "hf"), "HOME": str(job_dir)},
            "github": {
                "event_name": event,
                "event": {"number": 7, "pull_request": {"number": 7, "head": {"repo": {"full_name": head}}}} if event == "pull_request" else {},
                "repository": "org/models",
                "run_id": str(run_id if run_id is not None else 1000 + self.runs),
                "run_attempt": str(attempt),
                "job": job,
                "token": "ghs_fake_token",
            },
            "runner": {"os": "Linux", "arch": arch, "temp": str(job_dir / "temp")},
            "strategy": strategy or {},
            "fakes": {
                "python_path": str(self.python),
                "cache_dir": str(self.root / cache),
                "artifact_dir": str(self.root / artifacts),
                "comments_file": str(self.root / "comments.json"),
                "comments_fail": comments_fail,
                "token_login": token_login,
            },
            "record": str(job_dir / "record.json"),
        }
        (job_dir / "job.json").write_text(json.dumps(spec))
        env = {**os.environ, "GATE_NODE_MODULES": str(NODE_MODULES)}
        proc = subprocess.run(["node", str(RUNNER), str(job_dir / "job.json")], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        record = json.loads((job_dir / "record.json").read_text())
        assert (record["status"] == "success") == (proc.returncode == 0)
        record["workspace"] = workspace
        return record


def step(record: dict, name: str) -> dict:
    return next(s for s in record["steps"] if s["name"].startswith(name))


def call(record: dict, uses: str) -> list[dict]:
    return [c for c in record["calls"] if c["uses"].split("@")[0] == uses]


def log(record: dict) -> str:
    return "\n".join(s.get("log") or "" for s in record["steps"])


def verdict(record: dict) -> dict:
    v = json.loads((record["workspace"] / "gate-report" / "verdict.json").read_text())
    v.pop("provenance", None)
    return v


@pytest.fixture
def gh(tmp_path, action_repo, shim, world) -> World:
    """A repository using the action, with conftest's tiny models and checkpoints."""
    repo = tmp_path / "action"
    shutil.copytree(action_repo, repo)
    return World(root=tmp_path, repo=repo, python=shim[0], pip_log=shim[1], defaults={"checkpoints": str(world.checkpoints), "config": str(world.config)})


def test_runner_evaluates_with_githubs_libraries(gh, tmp_path):
    """The runner itself: a broken expression is an error from @actions/expressions, not a guess."""
    bad = gh.repo / ".github" / "actions" / "gate" / "action.yml"
    bad.write_text(bad.read_text().replace("inputs.mode == 'run'", "inputs.mode == 'run' &&"))
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"action": str(bad), "with": {"checkpoints": "x"}, "workspace": str(tmp_path), "record": str(tmp_path / "r.json"), "fakes": {}}))
    proc = subprocess.run(["node", str(RUNNER), str(spec)], capture_output=True, text=True, env={**os.environ, "GATE_NODE_MODULES": str(NODE_MODULES)})
    assert proc.returncode == 2 and "Unexpected end of expression" in proc.stderr, proc.stderr


def test_first_run_then_a_cache_hit(gh):
    first = gh.run({})
    print(json.dumps({k: v for k, v in first.items() if k != "workspace"}, indent=1, default=str)[:20000])
    assert first["status"] == "success"
