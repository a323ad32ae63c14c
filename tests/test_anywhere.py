"""Gating anywhere: `gate check` and `gate report` need only the output folder.

A real tiny run is scored (torch here); then its suite files, checkpoints and base are moved away,
and the commands run in a subprocess in which importing torch, transformers, peft and lm_eval
fails. Their verdicts and reports must be the full run's.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from conftest import HANG_GUARD_S

import gate
from gate.config import TOP_KEYS, load_config, load_policy
from gate.errors import ConfigError, GateError
from gate.results import read_results
from gate.verdict import read_verdict

HEAVY = ("torch", "transformers", "peft", "lm_eval")
NO_GPU_STACK = f"""
import importlib.abc, sys

class NoGpuStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is not installed here (no GPU stack)")

sys.meta_path.insert(0, NoGpuStack())
from gate.cli import main
main()
"""
# An import hook, as an environment without these packages behaves: `import torch` raises
# ImportError and sys.modules holds no "torch". (A None entry in sys.modules blocks the import too,
# but scipy's array-API helpers take any entry there for the loaded module and crash on it.)
REPORTS = ("report.html", "summary.md", "junit.xml")
GATES = (
    "select: text.perplexity\n"
    "gates:\n"
    "  - {suite: text, metric: perplexity, max_increase: 300%, min_items: 5}\n"
    "  - {suite: text, metric: bits_per_byte, max_increase: 2.5, min_items: 5}\n"
    "  - {suite: prompt, metric: perplexity, max: 100000, min_items: 3}\n"
    "  - {suite: text, metric: perplexity, min_decrease: 1%, informational: true}\n"
)


@pytest.fixture(scope="module")
def stranded(world, tmp_path_factory):
    """A full run's output folder, and what it wrote; then its data, checkpoints and base moved away."""
    root = tmp_path_factory.mktemp("anywhere")
    data = root / "data"
    base, checkpoints, suites = data / "base", data / "checkpoints", data / "suites"
    shutil.copytree(world.base, base)
    shutil.copytree(world.checkpoints, checkpoints)
    shutil.copytree(world.suites, suites)
    config = root / "gate.yaml"
    config.write_text(world.config.read_text().replace(str(world.base), str(base)).replace(str(world.suites), str(suites)) + GATES)
    out = root / "out"
    result = CliRunner().invoke(main(), ["run", str(checkpoints), "--config", str(config), "--out", str(out), "--device", "cpu", "-q"])
    assert result.exit_code in (0, 1), result.output
    written = {name: (out / name).read_text() for name in ("verdict.json", *REPORTS)}
    shutil.move(data, root / "elsewhere")  # no suite file, no checkpoint, no base any more
    assert not suites.exists() and not base.exists()
    return out, config, result.exit_code, written


def main():
    from gate.cli import main

    return main


def gate_without_torch(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(gate.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", NO_GPU_STACK, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )


def same_verdict(path: Path, expected: str) -> dict:
    now, then = json.loads(path.read_text()), json.loads(expected)
    now_provenance, then_provenance = now.pop("provenance"), then.pop("provenance")
    assert now == then
    assert now_provenance["results"] == then_provenance["results"]
    return now_provenance


def without_verdict_time(html: str) -> str:
    return re.sub(r"<tr><th>verdict written</th><td><code>[^<]*</code></td></tr>", "", html)


def test_the_block_bites(world, tmp_path):
    """In that subprocess torch cannot be imported: a command that scores fails (so the ones below really ran without it)."""
    ran = gate_without_torch("run", world.checkpoints, "--config", world.config, "--out", tmp_path / "o", "-q", cwd=tmp_path)
    assert ran.returncode == 3 and "torch is not installed here (no GPU stack)" in ran.stderr, ran.stderr


def test_check_with_the_runs_config_needs_only_the_output_folder(stranded, tmp_path):
    out, config, code, written = stranded
    # The run's own gate.yaml names suite files that no longer exist: loading it for a run fails ...
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config)
    # ... but its policy is all `gate check` reads.
    done = gate_without_torch("check", out, cwd=tmp_path)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and done.stderr == ""
    assert done.stdout.splitlines()[1].startswith("verdict: ")
    assert f"verdict: {out / 'verdict.json'}" in done.stdout
    provenance = same_verdict(out / "verdict.json", written["verdict.json"])
    assert provenance["config"] == str(config)
    for name in ("summary.md", "junit.xml"):
        assert (out / name).read_text() == written[name]
    assert without_verdict_time((out / "report.html").read_text()) == without_verdict_time(written["report.html"])


def test_check_without_any_gate_yaml_reapplies_the_recorded_policy(stranded, tmp_path):
    out, config, code, written = stranded
    moved = tmp_path / "gate.yaml.moved"
    shutil.move(config, moved)
    try:
        done = gate_without_torch("check", out, cwd=tmp_path)
    finally:
        shutil.move(moved, config)
    assert done.returncode == code, done.stderr
    provenance = same_verdict(out / "verdict.json", written["verdict.json"])
    assert provenance["config"] == str(out / "verdict.json")  # where the policy came from


def test_check_with_an_edited_config_whose_suite_files_are_gone(stranded, tmp_path):
    out, config, code, written = stranded
    strict = tmp_path / "strict.yaml"
    strict.write_text(config.read_text().replace("max_increase: 300%", "max_increase: 0%"))
    try:
        done = gate_without_torch("check", out, "--config", strict, cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        verdict = read_verdict(out / "verdict.json")
        assert verdict.selected is None
        first = [v.checks[0] for v in verdict.checkpoints if v.checks]
        assert first and all(c.margin == 0 and c.outcome != "pass" for c in first)
        assert verdict.provenance["config"] == str(strict)
    finally:
        assert gate_without_torch("check", out, cwd=tmp_path).returncode == code  # leave the folder as the run wrote it


def test_check_with_a_bad_policy_exits_2_naming_the_file(stranded, tmp_path):
    out, config, *_ = stranded
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text() + "  - {suite: nope, metric: perplexity, max_increase: 2%}\n  - {suite: text, metric: acc, max_drop: 0.1}\n")
    done = gate_without_torch("check", out, "--config", bad, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {bad}: 2 problems:")
    assert "gates[4]: suite 'nope' is not in results.json (suites: text, prompt, messages, long)" in done.stderr
    assert "gates[5]: metric 'acc' of perplexity suite 'text' must be perplexity or bits_per_byte" in done.stderr


def test_report_needs_only_the_output_folder(stranded, tmp_path):
    out, _, _, written = stranded
    for name in REPORTS:
        (out / name).unlink()
    done = gate_without_torch("report", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report: {out / 'report.html'}  (also summary.md, junit.xml)"
    # The reports are the run's (the tests above re-gated the folder: only the verdict's time differs).
    for name in ("summary.md", "junit.xml"):
        assert (out / name).read_text() == written[name], name
    assert without_verdict_time((out / "report.html").read_text()) == without_verdict_time(written["report.html"])


def test_the_verdict_records_each_checks_thresholds(stranded):
    """Thresholds and limits, recomputed here by hand from the gates as written in GATES."""
    out, *_ = stranded
    verdict = read_verdict(out / "verdict.json")
    results = read_results(out / "results.json")
    expected = {  # (metric, bound) -> (threshold on the effect, limit from the base value, min_items)
        ("perplexity", "max_increase"): (3.0, lambda base: base * 4.0, 5),
        ("bits_per_byte", "max_increase"): (2.5, lambda base: base + 2.5, 5),
        ("perplexity", "max"): (100000.0, lambda base: 100000.0, 3),
        ("perplexity", "min_decrease"): (-0.01, lambda base: base * 0.99, 20),
    }
    text = [d for d in results.base.scores["text"].documents]
    base_ppl = math.exp(sum(d.nll for d in text) / sum(d.tokens for d in text))
    checked = 0
    for v in verdict.checkpoints:
        for c in v.checks:
            t, limit, min_items = expected[(c.metric, c.bound)]
            assert c.threshold == pytest.approx(t) and c.min_items == min_items and c.cluster is None
            assert c.lower_is_better and c.level is not None
            if c.kind == "floor":
                assert c.limit == 100000.0 and c.base_value is None
            elif c.value is not None:
                assert c.limit == pytest.approx(limit(c.base_value))
                if c.metric == "perplexity":
                    assert c.base_value == pytest.approx(base_ppl)
                    checked += 1
    assert checked >= 2
    assert verdict.policy_spec["gates"][0] == {
        "suite": "text", "metric": "perplexity", "bound": "max_increase", "margin": 3.0, "relative": True,
        "informational": False, "higher_is_better": None, "cluster": None, "min_items": 5,
    }
    assert verdict.policy_spec["select"] == ["text", "perplexity"]


def test_load_policy_opens_no_data_file(tmp_path):
    config = tmp_path / "gate.yaml"
    config.write_text(
        "suites:\n"
        "  - {name: style, path: missing/style.jsonl, drift: true}\n"
        "  - {name: arith, type: lm_eval, task: missing/arith.yaml}\n"
        "  - {name: known-good}\n"
        "contamination: {training_data: [missing/train.jsonl]}\n"
        "alpha: 0.1\nconfirm: 0.5\nseed: 7\nreference: release\n"
        "gates:\n"
        "  - {suite: style, metric: kl, max: 0.05}\n"
        "  - {suite: arith, metric: acc, max_drop: 2%}\n"
        "  - {suite: known-good, metric: perplexity, max_increase: 5%}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert len([p for p in err.value.problems if "does not exist" in p or "not found" in p]) == 3
    policy = load_policy(config)
    assert [(g.suite, g.metric, g.bound, g.margin, g.relative) for g in policy.gates] == [
        ("style", "kl", "max", 0.05, False), ("arith", "acc", "max_drop", 0.02, True), ("known-good", "perplexity", "max_increase", 0.05, True)
    ]
    assert (policy.alpha, policy.confirm, policy.seed, policy.reference, policy.ranking) == (0.1, 0.5, 7, "release", ("style", "kl"))
    assert type(policy).from_json(json.loads(json.dumps(policy.to_json()))) == policy


def test_load_policy_checks_the_gates_against_the_named_suites(tmp_path):
    config = tmp_path / "gate.yaml"
    config.write_text(
        "suites:\n  - {name: style, path: missing.jsonl}\n  - {name: probes, type: generate, path: missing.jsonl}\n"
        "gates:\n"
        "  - {suite: style, metric: kl, max: 0.05}\n"
        "  - {suite: other, metric: perplexity, max_increase: 2%}\n"
        "  - {suite: probes, metric: words, max_drop: 2}\n"
        "  - {suite: style, metric: perplexity, max_increase: 2%}\n"
        "colour: blue\n"
    )
    with pytest.raises(ConfigError) as err:
        load_policy(config)
    assert err.value.problems == [
        "colour: unknown key; allowed: " + ", ".join(sorted(TOP_KEYS)),
        "gates[0]: metric 'kl' is drift from the base, and suite 'style' does not measure it; add `drift: true` to the suite (or at the top of gate.yaml)",
        "gates[1]: suite 'other' is not configured (suites: style, probes)",
        "gates[2].max_drop: words is better when lower; use max_increase / min_decrease",
    ]


def test_check_refuses_an_older_verdict_when_it_needs_its_policy(stranded, tmp_path):
    out, *_ = stranded
    copy = tmp_path / "out"
    copy.mkdir()
    results = json.loads((out / "results.json").read_text())
    results["config"] = str(tmp_path / "gone.yaml")
    (copy / "results.json").write_text(json.dumps(results))
    with pytest.raises(ConfigError) as err:
        gate.check(copy)
    assert str(err.value).startswith(f"{tmp_path / 'gone.yaml'}: the run's gate.yaml is gone and ")
    assert "verdict.json does not exist to re-apply its policy; pass the policy with --config" in str(err.value)
    old = json.loads((out / "verdict.json").read_text())
    old["schema_version"] = 2
    del old["policy_spec"]
    (copy / "verdict.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError) as err:
        gate.check(copy)
    assert "schema_version 2 is not 3" in str(err.value) and "pass the policy with --config" in str(err.value)
    with pytest.raises(GateError, match="schema_version 2 is not 3; it was written by another gate version: re-run `gate check`"):
        gate.report(copy)


def test_without_gates_the_default_policy_is_the_declared_suites(tmp_path):
    config = tmp_path / "gate.yaml"
    config.write_text("suites:\n  - {name: style, path: missing.jsonl, metric: bits_per_byte}\n  - {name: probes, type: generate, path: missing.jsonl}\n")
    scored = [SimpleNamespace(name="style", type="perplexity", drift_k=None, metric=None)]  # results.json records no perplexity metric
    for policy in (load_policy(config), load_policy(config, scored)):
        assert [g.describe() for g in policy.gates] == ["style.bits_per_byte max increase 5%"]
    assert [g.describe() for g in load_policy(None, scored).gates] == ["style.perplexity max increase 5%"]
    assert [g.describe() for g in load_policy(None).gates] == ["known-good.perplexity max increase 5%"]


def test_the_report_draws_the_limit_the_verdict_recorded(stranded, tmp_path):
    """The margin line of a plot is the check's recorded ``limit``: change it in verdict.json and the plot moves."""
    out, *_ = stranded
    copy = tmp_path / "out"
    copy.mkdir()
    shutil.copy(out / "results.json", copy)
    verdict = json.loads((out / "verdict.json").read_text())
    (copy / "verdict.json").write_text(json.dumps(verdict))
    before = gate.report(copy)["html"]
    plots = re.findall(r'src="(data:image/svg\+xml;base64,[^"]+)"', before.read_text())
    for v in verdict["checkpoints"]:
        for c in v["checks"]:
            if c["bound"] == "max_increase" and c["metric"] == "perplexity":
                c["limit"] *= 1.5
    (copy / "verdict.json").write_text(json.dumps(verdict))
    gate.report(copy)
    after = re.findall(r'src="(data:image/svg\+xml;base64,[^"]+)"', (copy / "report.html").read_text())
    assert len(after) == len(plots) >= 4
    assert [a == b for a, b in zip(plots, after)] == [False, True, True, True] + [True] * (len(plots) - 4)


def test_the_reports_compute_no_threshold():
    """gate.reports reads thresholds from verdict.json: it never imports the policy engine or the gate bounds."""
    package = Path(gate.__file__).parent / "reports"
    pattern = re.compile(r"^\s*(from gate\.policy import|import gate\.policy|from gate\.config import .*GATE_BOUNDS)", re.M)
    assert [p.name for p in package.glob("*.py") if pattern.search(p.read_text())] == []
