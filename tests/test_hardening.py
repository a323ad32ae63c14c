"""A hostile world: full disks, concurrent runs, no network, code shipped with a model."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest

from conftest import HANG_GUARD_S
from gate.train.tiny import save_untrained_adapter


def gate_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "gate", *map(str, args)]


def store_ok(out) -> int:
    conn = sqlite3.connect(out / "gate.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return conn.execute("SELECT COUNT(*) FROM suite_scores").fetchone()[0]


def test_disk_full_while_storing_keeps_earlier_results(world, ckpt_copy, tmp_path):
    out = tmp_path / "out"
    first = subprocess.run(gate_cmd("run", ckpt_copy, "--config", world.config, "--out", out, "-q", "--device", "cpu"), capture_output=True, text=True)
    assert first.returncode == 1, first.stderr  # finished; no candidate (the fixture's suites are tiny)
    before = (out / "results.json").read_text()
    rows = store_ok(out)
    save_untrained_adapter(world.base, ckpt_copy / "run-b" / "checkpoint-1", seed=3)

    def tiny_disk():  # no file may grow past 64 KiB: the store opens, then writing scores fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    full = subprocess.run(
        gate_cmd("run", ckpt_copy, "--config", world.config, "--out", out, "-q", "--device", "cpu"),
        capture_output=True, text=True, preexec_fn=tiny_disk,
    )
    assert full.returncode == 3, full.stderr
    assert "free disk space" in full.stderr and "Traceback" not in full.stderr
    assert (out / "results.json").read_text() == before  # the earlier results are intact
    stored = store_ok(out)  # sound, holding only complete scores
    assert rows <= stored < rows + 4
    again = subprocess.run(gate_cmd("run", ckpt_copy, "--config", world.config, "--out", out, "-q", "--device", "cpu"), capture_output=True, text=True)
    assert again.returncode == 1, again.stderr
    assert f"computed {rows + 4 - stored} model x suite score(s)" in again.stdout
    assert store_ok(out) == rows + 4


def test_two_runs_on_one_output_folder_both_finish(world, tmp_path):
    out = tmp_path / "out"
    cmd = gate_cmd("run", world.checkpoints, "--config", world.config, "--out", out, "-q", "--device", "cpu")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=HANG_GUARD_S) for p in procs]
    # On failure, show each run's error lines in full (pytest would cut the whole outputs short).
    errors = [[line for line in err.splitlines() if line.startswith(("error", "internal error"))] for _, err in results]
    assert [p.returncode for p in procs] == [1, 1], errors  # both finish (no candidate: tiny suites)
    assert store_ok(out) == 16  # each (model, suite) once, whoever wrote it
    data = json.loads((out / "results.json").read_text())
    assert len(data["checkpoints"]) == 3 and all(c["scores"] for c in data["checkpoints"])


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "true"]).returncode != 0,
                    reason="needs `unshare -rn` (user and network namespaces)")
def test_a_run_needs_no_network(world, tmp_path):
    """In a network namespace with no interface at all, the whole run works offline."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))}
    run = subprocess.run(["unshare", "-rn", *gate_cmd("run", world.checkpoints, "--config", world.config, "--out", out, "-q", "--device", "cpu")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1, run.stderr  # finished; no candidate (tiny suites)
    assert (out / "report.html").is_file()
    hub = subprocess.run(["unshare", "-rn", *gate_cmd("run", world.checkpoints, "--base", "someone/not-cached", "--out", out, "-q")],
                         capture_output=True, text=True, env=env)
    assert hub.returncode == 2 and "not in the Hugging Face cache" in hub.stderr and "--online" in hub.stderr


def test_code_shipped_with_a_model_runs_only_with_the_flag(world, tmp_path):
    base = tmp_path / "custom-base"
    shutil.copytree(world.base, base)
    marker = tmp_path / "code-ran"
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="gate_custom", auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (base / "config.json").write_text(json.dumps(config))
    (base / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise ImportError('custom code')\n")
    result = subprocess.run(gate_cmd("run", world.checkpoints, "--base", base, "--out", tmp_path / "out", "-q"), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "--trust-remote-code" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists(), "the model's own code ran without --trust-remote-code"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to act as an unprivileged user")
def test_unreadable_files_and_folders_are_reported(world):
    import tempfile

    root = tempfile.mkdtemp(prefix="gate-perm-")
    try:
        os.chmod(root, 0o755)
        ckpts = os.path.join(root, "ckpts")
        shutil.copytree(world.checkpoints, ckpts)
        for dirpath, dirnames, filenames in os.walk(ckpts):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        os.chmod(os.path.join(ckpts, "run-a", "checkpoint-2", "adapter_model.safetensors"), 0o000)
        os.chmod(os.path.join(ckpts, "untrained", "adapter_config.json"), 0o000)
        os.makedirs(os.path.join(ckpts, "locked", "checkpoint-9"))
        os.chmod(os.path.join(ckpts, "locked"), 0o000)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run([*as_nobody, *gate_cmd("scan", ckpts, "--json")], capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        rows = {r["name"]: r for r in json.loads(result.stdout)}
        assert "cannot be read (Permission denied); check its permissions" in rows["run-a/checkpoint-2"]["reason"]
        assert "cannot be read (Permission denied); check its permissions" in rows["untrained"]["reason"]
        assert rows["run-a/checkpoint-4"]["status"] == "ok"
        assert "locked: cannot be read (Permission denied); check its permissions" in result.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_ctrl_c_during_scoring_exits_130_and_the_rerun_finishes(world, tmp_path):
    import time

    from conftest import write_jsonl
    from gate.train.tiny import toy_sentences

    write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in toy_sentences(1500, 21)])
    config = tmp_path / "gate.yaml"
    config.write_text(f"base: {world.base}\nsuites:\n  - {{name: big, path: {tmp_path / 'big.jsonl'}}}\n")
    out = tmp_path / "out"
    cmd = gate_cmd("run", world.checkpoints, "--config", config, "--out", out, "-q", "--device", "cpu")
    # A shell's background job (`pytest ... &`) starts with SIGINT ignored, which Python then keeps
    # ignoring: give the run the default disposition, as an interactive terminal would.
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    deadline = time.monotonic() + HANG_GUARD_S
    rows = 0
    while rows == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            rows = sqlite3.connect(out / "gate.sqlite").execute("SELECT COUNT(*) FROM suite_scores").fetchone()[0]
        except sqlite3.Error:
            rows = 0
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert "interrupted: every finished score is kept" in stderr and "Traceback" not in stderr
    stored = store_ok(out)
    assert 1 <= stored < 4
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1 and f"computed {4 - stored} model x suite score(s), reused {stored}" in again.stdout
