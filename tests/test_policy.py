"""The policy engine on hand-built results, and its error rates and power by simulation."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from gate.config import Gate, Policy
from gate.policy import evaluate, validate
from gate.results import DocumentScore, ItemScore, ModelResult, Results, RunSettings, SuiteInfo, SuiteScore, TaskScore

PPL = Gate("general", "perplexity", "max_increase", 0.02, relative=True)
ACC = Gate("quiz", "acc", "max_drop", 0.02)


def perplexity_score(nll, tokens) -> SuiteScore:
    return SuiteScore.from_documents("general", [DocumentScore(f"d{i}", float(x), int(t), int(t) * 4) for i, (x, t) in enumerate(zip(nll, tokens))])


def task_score(correct) -> TaskScore:
    items = [ItemScore(str(i), f"p{i}", {"acc": float(c)}) for i, c in enumerate(correct)]
    return TaskScore("quiz", "quiz", "acc", {"acc": float(np.mean(correct))}, items)


def model(name, step=None, nll=None, tokens=None, correct=None) -> ModelResult:
    result = ModelResult(name=name, kind="base" if name == "base" else "lora", path=name, step=step)
    if nll is not None:
        result.scores["general"] = perplexity_score(nll, tokens)
    if correct is not None:
        result.tasks["quiz"] = task_score(correct)
    return result


def results(base: ModelResult, checkpoints: list[ModelResult]) -> Results:
    return Results(
        schema_version=1,
        gate_version="0",
        created_at="",
        command="",
        versions={},
        settings=RunSettings("cpu", "float32", 8, 128, 64, "ppl-1", "t"),
        base=base,
        checkpoints=checkpoints,
        suites=[SuiteInfo("general", "perplexity", "", "", "", 0, True), SuiteInfo("quiz", "lm_eval", "", "", "", 0, False)],
    )


def policy(*gates, **kw) -> Policy:
    return Policy(gates=list(gates), bootstrap_iterations=kw.pop("iterations", 2000), **kw)


def world(n=400, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 120, n)
    nll = tokens * rng.normal(2.5, 0.3, n)
    correct = (rng.random(n) < 0.7).astype(float)
    return rng, tokens, nll, correct


def flip(correct, right_to_wrong: int, wrong_to_right: int):
    out = correct.copy()
    right, wrong = np.flatnonzero(correct == 1), np.flatnonzero(correct == 0)
    out[right[:right_to_wrong]] = 0
    out[wrong[:wrong_to_right]] = 1
    return out


def test_pass_fail_and_selection():
    rng, tokens, nll, correct = world()
    base = model("base", nll=nll, tokens=tokens, correct=correct)
    same = model("run/checkpoint-100", 100, nll=nll, tokens=tokens, correct=correct)
    better = model("run/checkpoint-200", 200, nll=nll - tokens * 0.01, tokens=tokens, correct=flip(correct, 0, 5))
    forgot = model("run/checkpoint-300", 300, nll=nll + tokens * math.log(1.2), tokens=tokens, correct=flip(correct, 40, 0))
    verdict = evaluate(policy(PPL, ACC), results(base, [same, better, forgot]), np.random.default_rng(0))
    by_name = {v.name: v for v in verdict.checkpoints}
    assert [by_name[n].verdict for n in ("run/checkpoint-100", "run/checkpoint-200", "run/checkpoint-300")] == ["pass", "pass", "fail"]
    ppl_fail, acc_fail = by_name["run/checkpoint-300"].checks
    assert ppl_fail.outcome == "fail" and ppl_fail.effect == pytest.approx(0.2)
    assert "perplexity +20.00%" in ppl_fail.reason and "exceeds the +2.00% margin" in ppl_fail.reason
    assert acc_fail.outcome == "fail" and acc_fail.delta == pytest.approx(-40 / 400) and acc_fail.method == "mcnemar"
    assert acc_fail.mcnemar_p < 1e-9
    # The best passing checkpoint by the first gate's metric (perplexity, lower is better).
    assert verdict.selected == "run/checkpoint-200" and verdict.outcome == "selected" and verdict.exit_code == 0


def test_ties_go_to_the_earlier_step():
    _, tokens, nll, correct = world()
    base = model("base", nll=nll, tokens=tokens)
    late = model("b/checkpoint-20", 20, nll=nll, tokens=tokens)
    early = model("a/checkpoint-10", 10, nll=nll, tokens=tokens)
    verdict = evaluate(policy(PPL), results(base, [late, early]), np.random.default_rng(0))
    assert verdict.selected == "a/checkpoint-10"


def test_no_candidate_exits_1():
    _, tokens, nll, _ = world()
    base = model("base", nll=nll, tokens=tokens)
    bad = model("c", 1, nll=nll * 1.5, tokens=tokens)
    verdict = evaluate(policy(PPL), results(base, [bad]), np.random.default_rng(0))
    assert verdict.selected is None and verdict.outcome == "no_candidate" and verdict.exit_code == 1
    assert verdict.reason == "no checkpoint passes every gate (1 fail)"


def test_small_suite_is_inconclusive_and_says_it_is_too_small():
    _, _, _, correct = world(n=20)
    base = model("base", correct=correct)
    ckpt = model("c", 1, correct=flip(correct, 1, 0))
    verdict = evaluate(policy(ACC), results(base, [ckpt]), np.random.default_rng(0))
    (check,) = verdict.checkpoints[0].checks
    assert check.outcome == "inconclusive" and check.underpowered
    assert check.mde >= 1 / 20
    assert "too small to see a change of 0.02" in check.reason
    assert verdict.checkpoints[0].verdict == "inconclusive" and verdict.selected is None


def test_objectives_floors_and_informational_gates():
    _, tokens, nll, correct = world()
    base = model("base", nll=nll, tokens=tokens, correct=correct)
    ckpt = model("c", 1, nll=nll + tokens * math.log(0.7), tokens=tokens, correct=correct)  # perplexity x0.7
    gates = [
        Gate("general", "perplexity", "min_decrease", 0.10, relative=True),  # objective: -30% beats -10%
        Gate("quiz", "acc", "min", 0.6),  # floor: acc 0.7 on 400 items
        Gate("quiz", "acc", "min_gain", 0.05, informational=True),  # fails, but only informs
    ]
    verdict = evaluate(policy(*gates), results(base, [ckpt]), np.random.default_rng(0))
    objective, floor, info = verdict.checkpoints[0].checks
    assert objective.outcome == "pass" and objective.effect == pytest.approx(-0.3)
    assert "improves beyond the required -10.00%" in objective.reason
    assert floor.outcome == "pass" and floor.value == pytest.approx(correct.mean()) and floor.method == "binomial"
    assert info.outcome == "fail" and info.informational
    assert verdict.checkpoints[0].verdict == "pass" and verdict.selected == "c"
    strict = evaluate(policy(Gate("quiz", "acc", "min", 0.8)), results(base, [ckpt]), np.random.default_rng(0))
    assert strict.checkpoints[0].checks[0].outcome == "fail"


def test_holm_makes_more_checkpoints_cost_more_evidence():
    rng, _, _, correct = world(n=600)
    base = model("base", correct=correct)
    one = [model("c0", 0, correct=flip(correct, 3, 3))]
    many = one + [model(f"c{i}", i, correct=flip(correct, 3, 3)) for i in range(1, 8)]
    alone = evaluate(policy(ACC), results(base, one), np.random.default_rng(0)).checkpoints[0].checks[0].p_value
    crowd = evaluate(policy(ACC), results(base, many), np.random.default_rng(0)).checkpoints[0].checks[0].p_value
    assert crowd == pytest.approx(min(1.0, 8 * alone))


def test_skipped_and_failed_checkpoints():
    _, tokens, nll, correct = world()
    base = model("base", nll=nll, tokens=tokens, correct=correct)
    skipped = model("s", 1, nll=nll, tokens=tokens)
    skipped.skipped["quiz"] = "funnel: not among the 1 best by general.perplexity"
    broken = ModelResult(name="b", kind="lora", path="b", status="invalid", reason="truncated")
    verdict = evaluate(policy(PPL, ACC), results(base, [skipped, broken]), np.random.default_rng(0))
    s, b = verdict.checkpoints
    assert s.verdict == "inconclusive" and s.checks[1].outcome == "skipped" and "funnel" in s.reason
    assert b.verdict == "error" and b.reason == "invalid: truncated"


def test_confirm_selects_on_one_half_and_certifies_on_the_other():
    _, tokens, nll, correct = world(n=800)
    base = model("base", nll=nll, tokens=tokens)
    good = model("good", 1, nll=nll - tokens * 0.02, tokens=tokens)
    verdict = evaluate(policy(PPL, confirm=0.5), results(base, [good]), np.random.default_rng(0))
    assert verdict.selected == "good"
    (check,) = verdict.checkpoints[0].checks
    (certified,) = verdict.checkpoints[0].certification
    assert 300 < check.n < 500 and check.n + certified.n == 800
    assert certified.outcome == "pass"


def test_validate_names_the_gate():
    _, tokens, nll, correct = world()
    data = results(model("base", nll=nll, tokens=tokens, correct=correct), [])
    problems = validate(policy(Gate("quiz", "f1", "min_gain", 0.0), Gate("nope", "acc", "max_drop", 0.1)), data)
    assert problems == [
        "gates[0]: suite 'quiz' has no metric 'f1' (it has: acc)",
        "gates[1]: suite 'nope' is not in results.json (suites: general, quiz); re-run `gate run` with it",
    ]


def test_no_gates_means_no_policy():
    verdict = evaluate(Policy(gates=[]), results(model("base"), []), np.random.default_rng(0))
    assert verdict.outcome == "no_policy" and verdict.exit_code == 0


def test_policy_imports_no_torch():
    code = "import sys, gate.policy, gate.stats, gate.verdict; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Simulations: error rates and power (Monte-Carlo error noted in each bound) ---------------

ALPHA = 0.05


def against(base, rng, p01, p10, acc=0.7):
    """A checkpoint whose true accuracy change against this base is p01 - p10 (discordance p01 + p10)."""
    u = rng.random(len(base))
    ckpt = base.copy()
    ckpt[(base == 0) & (u < p01 / (1 - acc))] = 1
    ckpt[(base == 1) & (u < p10 / acc)] = 0
    return ckpt


def new_base(rng, n, acc=0.7):
    return (rng.random(n) < acc).astype(float)


def test_simulation_no_difference_rarely_fails():
    """Under no true difference, a zero-margin guardrail fails at most alpha of the time."""
    rng = np.random.default_rng(11)
    reps, fails = 1500, 0
    gate = Gate("quiz", "acc", "max_drop", 0.0)
    for _ in range(reps):
        base = new_base(rng, 200)
        ckpt = against(base, rng, 0.05, 0.05)
        v = evaluate(policy(gate), results(model("base", correct=base), [model("c", 1, correct=ckpt)]), rng)
        fails += v.checkpoints[0].checks[0].outcome == "fail"
    assert fails / reps <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / reps)


def test_simulation_family_wise_false_pass_with_holm():
    """Every checkpoint truly at the margin: Holm keeps P(any false pass) <= alpha."""
    rng = np.random.default_rng(12)
    reps, k, n, margin = 600, 5, 400, 0.02
    any_pass = 0
    for _ in range(reps):
        base = new_base(rng, n)
        ckpts = [model(f"c{i}", i, correct=against(base, rng, 0.04, 0.04 + margin)) for i in range(k)]
        v = evaluate(policy(Gate("quiz", "acc", "max_drop", margin)), results(model("base", correct=base), ckpts), rng)
        any_pass += any(c.verdict == "pass" for c in v.checkpoints)
    assert any_pass / reps <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / reps)


def test_simulation_perplexity_false_pass_at_the_margin():
    """Perplexity truly +2% with a 2% margin: the bootstrap guardrail passes at most ~alpha."""
    rng = np.random.default_rng(13)
    reps, n, passes = 250, 150, 0
    for _ in range(reps):
        tokens = rng.integers(20, 120, n)
        base = tokens * rng.normal(2.5, 0.3, n)
        shift = math.log(1.02) + rng.normal(0, 0.05, n)  # per-document noise around a +2% ratio
        shift -= (tokens * shift).sum() / tokens.sum() - math.log(1.02)  # the corpus ratio is exactly 1.02
        ckpt = base + tokens * shift
        v = evaluate(
            policy(PPL, iterations=1000),
            results(model("base", nll=base, tokens=tokens), [model("c", 1, nll=ckpt, tokens=tokens)]),
            rng,
        )
        passes += v.checkpoints[0].verdict == "pass"
    assert passes / reps <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / reps)


def test_simulation_regression_at_twice_the_margin_is_caught():
    rng = np.random.default_rng(14)
    reps, n, margin, fails, passes = 300, 2000, 0.02, 0, 0
    for _ in range(reps):
        base = new_base(rng, n)
        ckpt = against(base, rng, 0.04, 0.04 + 2 * margin)
        v = evaluate(policy(Gate("quiz", "acc", "max_drop", margin)), results(model("base", correct=base), [model("c", 1, correct=ckpt)]), rng)
        outcome = v.checkpoints[0].checks[0].outcome
        fails += outcome == "fail"
        passes += outcome == "pass"
    assert fails / reps >= 0.8
    assert passes == 0


def test_reference_checkpoint_adds_every_gate_against_it():
    _, tokens, nll, _ = world()
    base = model("base", nll=nll, tokens=tokens)
    shipped = model("shipped", 1, nll=nll - tokens * 0.10, tokens=tokens)  # much better than the base
    newer = model("newer", 2, nll=nll - tokens * 0.02, tokens=tokens)  # better than base, worse than shipped
    verdict = evaluate(policy(PPL, reference="shipped"), results(base, [shipped, newer]), np.random.default_rng(0))
    checks = {v.name: v.checks for v in verdict.checkpoints}
    assert [c.against for c in checks["newer"]] == ["base", "shipped"]
    assert [c.outcome for c in checks["newer"]] == ["pass", "fail"]
    assert verdict.checkpoints[1].reason.startswith("vs shipped: general.perplexity:")
    assert verdict.selected == "shipped"


def test_release_reference_refuses_suites_scored_differently():
    from gate.release import bless

    _, tokens, nll, _ = world()
    data = results(model("base", nll=nll, tokens=tokens), [model("c", 1, nll=nll, tokens=tokens)])
    data.suites[0].identity = "v1"
    release = bless(data, "c")
    assert evaluate(policy(PPL, reference="release"), data, np.random.default_rng(0), release).selected == "c"
    data.suites[0].identity = "v2"  # the suite's data changed since the blessing
    verdict = evaluate(policy(PPL, reference="release"), data, np.random.default_rng(0), release)
    against_release = verdict.checkpoints[0].checks[1]
    assert against_release.against == "release:c" and against_release.outcome == "error"
    assert "scored on other data or settings" in against_release.reason
    assert verdict.selected is None
