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
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S, save_nan_base

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
            comments_fail: bool = False, token_login: str | None = None, hf_home: Path | None = None,
            workflow: Path | None = None, matrix: dict | None = None) -> dict:
        """One job using the action, on a fresh runner (new workspace and temp); returns the record.

        With `workflow`, the job `job` of that workflow file runs instead, its `uses:` of gate's
        action served from this repository's copy, in a workspace holding runs/ and gate.yaml.
        """
        self.runs += 1
        job_dir = self.root / f"job{self.runs}"
        workspace = job_dir / "ws"
        workspace.mkdir(parents=True)
        (job_dir / "temp").mkdir()
        head = "someone/fork" if fork else "org/models"
        action = self.repo / ".github" / "actions" / "gate" / "action.yml"
        if workflow:
            shutil.copytree(self.defaults["checkpoints"], workspace / "runs")
            shutil.copy(self.defaults["config"], workspace / "gate.yaml")
            target = {"workflow": str(workflow), "job_id": job, "uses_map": {"YOUR-ORG/gate/.github/actions/gate@v0.1.0": str(action)}}
        else:
            target = {"action": str(action), "with": {**self.defaults, **with_}}
        spec = {
            **target,
            "matrix": matrix,
            "secrets": {"HF_TOKEN": "hf_fake_secret"},
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
        proc = subprocess.run(["node", str(RUNNER), str(job_dir / "job.json")], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        record = json.loads((job_dir / "record.json").read_text())
        assert (record["status"] != "failure") == (proc.returncode == 0)
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


SUITES = ("text", "prompt")  # two of conftest's four suites: every job here scores less


@pytest.fixture(scope="module")
def config(world, tmp_path_factory) -> Path:
    """gate.yaml for conftest's tiny base and checkpoints, with two suites."""
    path = tmp_path_factory.mktemp("config") / "gate.yaml"
    path.write_text(suites_yaml(world) + GATES)
    return path


def suites_yaml(world) -> str:
    return f"base: {world.base}\nsuites:\n" + "".join(f"  - {{name: {s}, path: {world.suites / (s + '.jsonl')}}}\n" for s in SUITES)


# A policy the tiny world can meet: 13 documents are below the bootstrap's default minimum (20),
# and the untrained adapter (the base itself) has no spread to certify, so the trained checkpoint
# with the lower text perplexity is the one selected.
GATES = "gates:\n  - {suite: text, metric: perplexity, max_increase: 300%, min_items: 5}\n"
SELECTED = "run-a/checkpoint-4"


@pytest.fixture
def gh(tmp_path, action_repo, shim, world, config) -> World:
    """A repository using the action, with conftest's tiny models and checkpoints."""
    return make_world(tmp_path, action_repo, shim, world, config)


def make_world(root: Path, action_repo: Path, shim, world, config: Path) -> World:
    repo = root / "action"
    shutil.copytree(action_repo, repo)
    return World(root=root, repo=repo, python=shim[0], pip_log=shim[1], defaults={"checkpoints": str(world.checkpoints), "config": str(config)})


@pytest.fixture(scope="module")
def single(tmp_path_factory, action_repo, shim, world, config):
    """One plain job on a pull request: its record, and the caches it leaves (copied by later tests)."""
    gh = make_world(tmp_path_factory.mktemp("single"), action_repo, shim, world, config)
    record = gh.run({"cache-hf": "false", "comment": "false"})
    assert record["status"] == "success", log(record)
    return gh, record


def with_caches_of(gh: World, seeded: World) -> World:
    shutil.copytree(seeded.root / "cache", gh.root / "cache")
    return gh


def test_runner_evaluates_with_githubs_libraries(gh, tmp_path):
    """The runner itself: a broken expression is an error from @actions/expressions, not a guess."""
    bad = gh.repo / ".github" / "actions" / "gate" / "action.yml"
    bad.write_text(bad.read_text().replace("inputs.mode == 'run'", "inputs.mode == 'run' &&"))
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"action": str(bad), "with": {"checkpoints": "x"}, "workspace": str(tmp_path), "record": str(tmp_path / "r.json"), "fakes": {}}))
    proc = subprocess.run(["node", str(RUNNER), str(spec)], capture_output=True, text=True, env={**os.environ, "GATE_NODE_MODULES": str(NODE_MODULES)})
    assert proc.returncode == 2 and "Unexpected end of expression" in proc.stderr, proc.stderr


pytestmark = pytest.mark.slow

QUICK = {"args": "--shard 9/2", "fail-on": "never", "comment": "false", "cache-hf": "false"}  # real gate, exits 2 at once


def pip_lines(gh: World) -> list[str]:
    return gh.pip_log.read_text().splitlines()


def test_the_venv_key_follows_gate_and_a_stale_venv_is_upgraded(gh):
    import gate

    before = len(pip_lines(gh))
    first = gh.run(QUICK)
    assert first["status"] == "success" and first["outputs"]["exit-code"] == "2", log(first)  # gate really ran
    key = call(first, "actions/cache")[0]["with"]["key"]
    assert f"-gate{gate.__version__}-" in key and key.startswith("gate-venv-Linux-X64-py3.")
    installed = pip_lines(gh)[before:]
    assert installed[0].startswith("venv ") and installed[1] == "install --quiet torch==2.13.0"
    assert installed[-1].startswith("install --quiet ") and installed[-1].endswith("/.github/actions/gate/../../..")
    assert any(s["name"].startswith("Post gate-venv-") for s in first["steps"])  # saved by actions/cache's post step

    # The same gate: an exact hit, used as it is.
    before = len(pip_lines(gh))
    again = gh.run(QUICK)
    assert call(again, "actions/cache")[0]["matched"] == key
    assert "gate's environment is up to date" in step(again, "Install or upgrade gate")["log"]
    assert pip_lines(gh)[before:] == []

    # A new gate version: a new key; the old venv is restored by prefix and gate is reinstalled.
    set_version(gh.repo, "9.9.9")
    before = len(pip_lines(gh))
    upgraded = gh.run(QUICK)
    new_key = call(upgraded, "actions/cache")[0]["with"]["key"]
    assert new_key != key and "-gate9.9.9-" in new_key
    assert call(upgraded, "actions/cache")[0]["matched"] == key
    reinstalled = pip_lines(gh)[before:]
    assert "uninstall --quiet --yes gate" in reinstalled and reinstalled[-1].endswith("/../../..") and not any(line.startswith("venv ") for line in reinstalled)
    marker = upgraded["workspace"] / ".gate-venv" / "gate-install.txt"
    assert new_key.endswith(marker.read_text())

    # Everything else that changes the venv changes the key and the restore prefix: no restore.
    other_python = gh.root / "py" / "python3"  # another interpreter on the runner, given by path
    other_python.parent.mkdir()
    shutil.copy(gh.python, other_python)
    for change in ({"pip-args": "--index-url https://download.pytorch.org/whl/cu128"}, {"torch-spec": "torch==2.12.0"}, {"python": str(other_python)}):
        other = call(gh.run({**QUICK, **change}), "actions/cache")[0]
        assert other["with"]["restore-keys"] != call(upgraded, "actions/cache")[0]["with"]["restore-keys"] and other["matched"] is None, change
    arm = call(gh.run(QUICK, arch="ARM64"), "actions/cache")[0]
    assert arm["with"]["key"].startswith("gate-venv-Linux-ARM64-") and arm["matched"] is None
    # `python` as a path skips actions/setup-python
    assert not call(gh.run({**QUICK, "python": str(other_python)}), "actions/setup-python")


def test_a_cache_hit_scores_nothing_new_and_one_comment_is_updated_in_place(gh, single):
    seeded, first = single
    with_caches_of(gh, seeded)
    marker = "<!-- gate-action: gate-report-gate -->"
    # Someone else's comment carrying the same marker is never touched.
    (gh.root / "comments.json").write_text(json.dumps({"comments": [{"id": 1, "issue_number": 7, "body": f"{marker}\nnot yours", "user": {"login": "mallory"}}], "next": 2}))

    computed = int(re.search(r"computed (\d+) model x suite", step(first, "Run gate")["log"]).group(1))
    assert computed == 4 * len(SUITES)  # the base and 3 checkpoints: all scored by the first job
    rerun = gh.run({"cache-hf": "false"}, attempt=2)
    assert rerun["status"] == "success", log(rerun)
    saved = call(first, "actions/cache/save")[0]["saved"]
    assert call(rerun, "actions/cache/restore")[0]["matched"] == saved  # restored by prefix
    assert f"computed 0 model x suite score(s), reused {computed} from the store" in step(rerun, "Run gate")["log"]
    assert verdict(rerun) == verdict(first) and rerun["outputs"]["selected"] == SELECTED
    # Re-runs and other jobs save under their own keys: no race for one key.
    assert call(rerun, "actions/cache/save")[0]["saved"] not in (saved, None)

    summary = (rerun["workspace"] / "gate-report" / "summary.md").read_text()
    assert rerun["summary"] == summary and summary.startswith("<!-- gate-report -->\n## gate: ")
    artifact = gh.root / "artifacts" / rerun["outputs"]["artifact-name"]
    assert {"results.json", "verdict.json", "summary.md", "report.html", "gate.sqlite"} <= {p.name for p in artifact.iterdir()}

    mallory, ours = gh.comments
    assert mallory["body"] == f"{marker}\nnot yours"
    assert ours["user"]["login"] == "github-actions[bot]" and ours["body"] == f"{marker}\n{summary}"
    again = gh.run({"cache-hf": "false"}, attempt=3)
    api = call(again, "actions/github-script")[0]["api"]
    assert [c["name"] for c in api] == ["users.getAuthenticated", "issues.listComments", "issues.updateComment"]
    assert api[-1]["params"]["comment_id"] == ours["id"] and api[-1]["token"] == "ghs_fake_token"
    assert [c["id"] for c in gh.comments] == [1, ours["id"]]
    # A token that can say who it is (a PAT or an app's token) looks for its own comment.
    as_app = gh.run({"cache-hf": "false"}, attempt=4, token_login="gate-app[bot]")
    assert [c["name"] for c in call(as_app, "actions/github-script")[0]["api"]][-1] == "issues.createComment"
    assert [c["user"]["login"] for c in gh.comments] == ["mallory", "github-actions[bot]", "gate-app[bot]"]


def test_a_failing_comment_api_leaves_the_verdict_and_exit_code(gh, single):
    with_caches_of(gh, single[0])
    record = gh.run({"cache-hf": "false"}, comments_fail=True)
    comment = step(record, "Comment on the pull request")
    assert comment["outcome"] == "failure" and comment["conclusion"] == "success"
    assert "Resource not accessible by integration" in comment["log"]
    assert step(record, "Decide")["outcome"] == "success" and record["status"] == "success"
    assert record["outputs"]["exit-code"] == "0" and record["outputs"]["selected"] == SELECTED
    assert any(a["level"] == "warning" and "continue-on-error" in a["message"] for a in record["annotations"])
    # A fork's pull request is not commented on at all (its token is read-only).
    fork = gh.run({"cache-hf": "false"}, fork=True)
    assert step(fork, "Comment on the pull request")["outcome"] == "skipped" and fork["status"] == "success"
    # Decide runs even when an earlier step failed, and says so.
    broken = gh.run({**QUICK, "python": "/nonexistent/python"})
    assert broken["status"] == "failure" and step(broken, "Decide")["ran"]
    assert "gate did not run" in step(broken, "Decide")["log"] and "no interpreter at" in step(broken, "Prepare")["log"]


@pytest.fixture(scope="module")
def nan_base(world, tmp_path_factory) -> Path:
    return save_nan_base(world.base, tmp_path_factory.mktemp("nan") / "nan-base")


# README "In GitHub Actions": which exit codes fail the job under each fail-on.
FAILS = {"no-candidate": {1, 2, 3}, "error": {2, 3}, "never": set()}


@pytest.mark.parametrize("code", [0, 1, 2, 3])
def test_every_fail_on_with_every_exit_code(gh, single, world, nan_base, code):
    with_caches_of(gh, single[0])
    strict = gh.root / "strict.yaml"  # no checkpoint can improve text perplexity by 90%
    strict.write_text(suites_yaml(world) + "gates:\n  - {suite: text, metric: perplexity, min_decrease: 90%, min_items: 5}\n")
    make = {0: {}, 1: {"config": str(strict)}, 2: {"args": "--shard 9/2"}, 3: {"args": f"--base {nan_base} --limit 1"}}[code]
    for fail_on, fails in FAILS.items():
        record = gh.run({"cache-hf": "false", "comment": "false", **make, "fail-on": fail_on})
        assert record["outputs"]["exit-code"] == str(code), log(record)
        decide = step(record, "Decide")
        assert record["status"] == ("failure" if code in fails else "success"), (fail_on, decide)
        assert decide["outcome"] == record["status"]
        levels = {a["level"] for a in record["annotations"] if a["step"] == "Decide"}
        assert levels == ({"error"} if code in fails else {"warning"} if code else set()), (fail_on, record["annotations"])


EXAMPLES = ROOT / "examples" / "github"


def test_the_example_workflow_runs_the_action_and_guards_forks(gh):
    fork = gh.run({}, workflow=EXAMPLES / "gate.yml", fork=True)
    assert fork["status"] == "skipped" and not fork["steps"]  # a fork's code never reaches the GPU box
    record = gh.run({}, workflow=EXAMPLES / "gate.yml")
    assert record["status"] == "success", log(record)
    gate_step = step(record, "Gate the checkpoints")
    assert gate_step["env"]["HF_TOKEN"] == "hf_fake_secret" and gate_step["inputs"]["args"] == "--online"
    assert gate_step["outputs"]["selected"] == SELECTED and f"release candidate {SELECTED}" in step(record, "Use the verdict")["log"]
    assert any(c["with"].get("key", "").startswith("gate-store-smollm2-135m-") for c in call(record, "actions/cache/save"))
    assert len(gh.comments) == 1 and "untrained" in gh.comments[0]["body"]


def test_the_sharded_example_cut_to_two_shards_gives_the_one_job_verdict(gh, single):
    """examples/github/gate-sharded.yml, its matrix cut from four shards to two, then its merge job."""
    text = (EXAMPLES / "gate-sharded.yml").read_text()
    assert "shard: [1, 2, 3, 4]" in text and "/4" in text
    workflow = gh.root / "gate-sharded.yml"
    workflow.write_text(text.replace("shard: [1, 2, 3, 4]", "shard: [1, 2]").replace("/4", "/2"))
    for i in (1, 2):
        shard = gh.run({}, workflow=workflow, job="shard", run_id=5000, matrix={"shard": i}, strategy={"job-index": i - 1, "job-total": 2})
        assert shard["status"] == "success", log(shard)
        gate_step = step(shard, "Score this job's share")
        assert gate_step["outputs"]["artifact-name"] == f"gate-shard-{i}-of-2" and f"shard {i}/2 scored" in step(shard, "Run gate")["log"]
    assert sorted(p.name for p in (gh.root / "artifacts").iterdir()) == ["gate-shard-1-of-2", "gate-shard-2-of-2"]
    merged = gh.run({}, workflow=workflow, job="merge", run_id=5000)
    assert merged["status"] == "success", log(merged)
    assert call(merged, "actions/download-artifact")[0]["with"]["pattern"] == "gate-shard-*"
    assert not [c for c in call(merged, "actions/cache/restore") if c["with"]["key"].startswith("gate-store-")]  # merge scores nothing
    assert verdict(merged) == verdict(single[1]) and step(merged, "Merge the shares")["outputs"]["selected"] == SELECTED
    assert len(gh.comments) == 1 and gh.comments[0]["body"].startswith("<!-- gate-action: gate-report-merge -->")
    # A fork's pull request runs neither the shards nor the merge.
    assert gh.run({}, workflow=workflow, job="shard", fork=True, matrix={"shard": 1})["status"] == "skipped"
    assert gh.run({}, workflow=workflow, job="merge", fork=True)["status"] == "skipped"
