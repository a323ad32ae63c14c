"""The library's workflows, one function per command: what `gate check` and `gate report` do (and,
through ``gate.run`` / ``gate.merge``, what runs and merges end with). No printing here: the CLI
formats what these return."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import gate
from gate.config import Policy, find_config, load_policy
from gate.errors import ConfigError, GateError
from gate.results import Results, read_results, version_conflicts
from gate.verdict import Verdict


def apply_policy(results: Results, policy: Policy, out: str | Path, config_path: str | None = None) -> Verdict:
    """Pure policy on the results -> OUT/verdict.json and the reports; returns the verdict."""
    import numpy as np

    from gate import policy as policy_engine
    from gate.release import read_release
    from gate.verdict import write_verdict

    out = Path(out)
    problems = policy_engine.validate(policy, results)
    if problems:
        raise ConfigError(config_path, problems)
    release = read_release(out) if policy.reference == "release" else None
    mixed = version_conflicts(results, release.model if release is not None else None)
    if mixed:
        listing = "\n".join(f"  - {line}" for line in mixed)
        raise GateError(
            f"{out / 'results.json'}: scores computed under other library versions would be compared:\n{listing}\n"
            "gate never compares them: re-run `gate run` to score everything under the installed versions"
        )
    verdict = policy_engine.evaluate(policy, results, np.random.default_rng(policy.seed), release)
    verdict.provenance = {
        "results": str(out / "results.json"),
        "results_created_at": results.created_at,
        "config": config_path,
        "gate_version": gate.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_verdict(out / "verdict.json", verdict)
    report(out, results=results, verdict=verdict)
    return verdict


def check(out: str | Path, config: str | Path | None = None) -> tuple[Results, Verdict]:
    """Re-apply a (possibly edited) policy to OUT/results.json: rewrites OUT/verdict.json and the reports.

    Needs only the output folder: no suite or training file, checkpoint, base model or GPU stack.
    The policy comes from ``config`` (a gate.yaml; only its policy keys are read), else from the
    gate.yaml the run used, else, when that file is gone (a CI job holding only OUT), from the
    policy the previous OUT/verdict.json recorded. Its gates are checked against the suites
    results.json holds. Returns the results and the new verdict.
    """
    out = Path(out)
    results = read_results(out / "results.json")
    policy, source = _policy_for(out, results, config)
    verdict = apply_policy(results, policy, out, source)
    return results, verdict


def _policy_for(out: Path, results: Results, config: str | Path | None) -> tuple[Policy, str | None]:
    """The policy to re-apply, and where it came from (a gate.yaml, or OUT/verdict.json)."""
    if config is not None:
        return load_policy(config, results.suites), str(config)
    if results.config and not Path(results.config).is_file():
        return _recorded_policy(out, results.config), str(out / "verdict.json")
    path = Path(results.config) if results.config else find_config(None, None)
    return load_policy(path, results.suites), str(path) if path else None


def _recorded_policy(out: Path, config: str) -> Policy:
    """The policy the previous verdict applied (verdict.json's ``policy_spec``)."""
    from gate.verdict import read_verdict

    path = out / "verdict.json"
    if not path.is_file():
        raise ConfigError(config, [f"the run's gate.yaml is gone and {path} does not exist to re-apply its policy; pass the policy with --config"])
    try:
        spec = read_verdict(path).policy_spec
    except GateError as err:
        raise ConfigError(config, [f"the run's gate.yaml is gone, and the policy cannot be taken from {err}; or pass the policy with --config"]) from None
    try:
        return Policy.from_json(spec)
    except (KeyError, TypeError, ValueError) as err:
        raise GateError(f"{path}: its recorded policy is malformed ({err!r}); pass the policy with --config") from None


def report(out: str | Path, *, results: Results | None = None, verdict: Verdict | None = None) -> dict[str, Path]:
    """(Re)write OUT/report.html, summary.md and junit.xml from results.json + verdict.json (no GPU).
    Returns the paths written, by kind (html, markdown, junit)."""
    from gate.reports import write_reports
    from gate.verdict import read_verdict

    out = Path(out)
    results = results if results is not None else read_results(out / "results.json")
    verdict = verdict if verdict is not None else read_verdict(out / "verdict.json")
    return write_reports(results, verdict, out)
