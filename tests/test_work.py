"""The work list as data: planning, its three pure filters, work.json, and a merge with no GPU stack."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gate.cli import main
from gate.config import Funnel
from gate.errors import ConfigError, GateError
from gate.request import prepare_run
from gate.results import ModelResult, RunSettings, SuiteInfo, SuiteScore
from gate.store import ScoreIdentity
from gate.work import (
    WORK_NAME,
    Facts,
    WorkItem,
    WorkList,
    funnel_keep,
    missing,
    parse_shard,
    plan,
    read_work,
    shard,
    write_work,
)

SETTINGS = RunSettings(device="cpu", dtype="float32", batch_size=8, max_length=64, stride=32, scoring="s1", tokenizer_hash="t")


def _item(model: str, suite: str, kind: str = "perplexity") -> WorkItem:
    identity = ScoreIdentity(base_hash="B", model_hash=f"w-{model}", tokenizer_hash="t", suite_identity=suite, settings={})
    return WorkItem(model, suite, kind, identity.key, identity)


def _work(funnel: Funnel | None = None) -> WorkList:
    """base, a (step 2), b (step 4), c (invalid), d (step 6); suites text (perplexity) and mc (lm-eval)."""
    models = [ModelResult("base", "base", "B")] + [
        ModelResult(name, "lora", name, step=step, status=status)
        for name, step, status in [("a", 2, "ok"), ("b", 4, "ok"), ("c", 5, "invalid"), ("d", 6, "ok")]
    ]
    items = [_item(m, s, k) for m in ("base", "a", "b", "d") for s, k in (("text", "perplexity"), ("mc", "lm_eval"))]
    suites = [SuiteInfo("text", "perplexity", "t.jsonl", "h", "i", 3, False), SuiteInfo("mc", "lm_eval", "mc", "h2", "i2", 4, False)]
    return WorkList(SETTINGS, {"torch": "2"}, {"python": "3.11"}, "gate run x", None, models, suites, items, funnel=funnel)


def _pairs(items) -> list[tuple[str, str]]:
    return [(i.model, i.suite) for i in items]


def _score(nll: float, tokens: int, nbytes: int) -> SuiteScore:
    return SuiteScore(suite="text", nll_sum=nll, tokens=tokens, bytes=nbytes)


def test_missing_keeps_the_unstored_items_in_list_order():
    work = _work()
    stored = {work.items[0].key, work.items[3].key, "a key of something else"}  # base/text, a/mc
    assert _pairs(missing(work, stored)) == [("base", "mc"), ("a", "text"), ("b", "text"), ("b", "mc"), ("d", "text"), ("d", "mc")]
    assert missing(work, {i.key for i in work.items}) == []


def test_funnel_keeps_the_top_k_lm_eval_items_ties_to_the_earlier_step():
    work = _work(Funnel(top_k=1, suite="text", metric="perplexity"))
    # perplexities: a 3, b 2, d 2 (b and d tie: b is the earlier step)
    scores = {"a": _score(10 * math.log(3), 10, 100), "b": _score(10 * math.log(2), 10, 100), "d": _score(5 * math.log(2), 5, 50)}
    kept = funnel_keep(work, work.items, scores)
    assert _pairs(kept) == [("base", "text"), ("base", "mc"), ("a", "text"), ("b", "text"), ("b", "mc"), ("d", "text")]
    # a checkpoint without a score (failed on the ranking suite) is never kept, even with room left
    work.funnel = Funnel(top_k=3, suite="text", metric="perplexity")
    assert [m for m, s in _pairs(funnel_keep(work, work.items, {"a": scores["a"], "b": None})) if s == "mc"] == ["base", "a"]
    work.funnel = None
    assert funnel_keep(work, work.items, {}) == work.items


def test_funnel_ranks_by_the_metric_it_names():
    # a: perplexity e, 10 / (ln 2 * 100) = 0.144 bits per byte; b: perplexity e^2, 10 / (ln 2 * 200) = 0.072
    scores = {"a": _score(10, 10, 100), "b": _score(10, 5, 200)}
    lm_eval = lambda work: [m for m, s in _pairs(funnel_keep(work, work.items, scores)) if s == "mc" and m != "base"]  # noqa: E731
    assert lm_eval(_work(Funnel(top_k=1, suite="text", metric="perplexity"))) == ["a"]
    assert lm_eval(_work(Funnel(top_k=1, suite="text", metric="bits_per_byte"))) == ["b"]


def test_shards_split_the_valid_checkpoints_round_robin_base_in_the_first():
    work = _work()
    assert sorted({i.model for i in shard(work, 1, 2)}) == ["a", "base", "d"]  # c is invalid: not counted
    assert sorted({i.model for i in shard(work, 2, 2)}) == ["b"]
    shares = [shard(work, k, 3) for k in (1, 2, 3)]
    assert [sorted({i.model for i in s}) for s in shares] == [["a", "base"], ["b"], ["d"]]
    assert sorted(_pairs(i for s in shares for i in s)) == sorted(_pairs(work.items))  # every item exactly once
    some = [work.items[2], work.items[5]]  # a/text, b/mc
    assert _pairs(shard(work, 1, 2, some)) == [("a", "text")]


@pytest.mark.parametrize("text", ["3/2", "0/2", "x", "1/2/3", "2"])
def test_bad_shard_is_refused(text):
    with pytest.raises(ConfigError, match=r"must be i/n"):
        parse_shard(text)
    assert parse_shard("2/4") == (2, 4)


def test_work_json_round_trips_and_a_broken_one_names_the_file(tmp_path):
    work = _work(Funnel(top_k=2, suite="text", metric="perplexity"))
    path = tmp_path / WORK_NAME
    write_work(path, work)
    assert read_work(path) == work
    obj = json.loads(path.read_text())
    obj["items"][1]["identity"]["model"] = "tampered"  # its key no longer is its identity's hash
    path.write_text(json.dumps(obj))
    with pytest.raises(GateError, match=rf"{path}: malformed .*base on mc"):
        read_work(path)
    del obj["models"]
    path.write_text(json.dumps(obj))
    with pytest.raises(GateError, match=rf"{path}: malformed \('models'\)"):
        read_work(path)
    with pytest.raises(GateError, match=rf"{tmp_path / 'none' / WORK_NAME}: not found"):
        read_work(tmp_path / "none" / WORK_NAME)


def test_plan_keys_every_valid_model_on_every_suite_and_drift_names_the_base_reference(world, tmp_path):
    config = tmp_path / "gate.yaml"
    config.write_text(world.config.read_text().replace("path: " + str(world.suites / "long.jsonl") + "}", "path: " + str(world.suites / "long.jsonl") + ", drift: true}"))
    request = prepare_run(world.checkpoints, config_path=config, out_dir=tmp_path / "out")
    facts = Facts(
        base_hash="BASE",
        tokenizer_hashes={"base": "TOK"},
        settings=SETTINGS,
        versions={"torch": "2.0", "transformers": "5.0", "tokenizers": "0.2", "peft": "0.1"},
        library_versions={"python": "3.11"},
    )
    work = plan(request, facts)
    names = ["base", "run-a/checkpoint-2", "run-a/checkpoint-4", "untrained"]
    suites = ["text", "prompt", "messages", "long"]
    assert _pairs(work.items) == [(m, s) for m in names for s in suites]
    assert [m.name for m in work.models] == names and [s.name for s in work.suites] == suites
    by = {(i.model, i.suite): i for i in work.items}
    base_long = by[("base", "long")]
    assert base_long.reference and not by[("base", "text")].reference
    assert by[("untrained", "long")].identity.settings == {
        "dtype": "float32", "max_length": 64, "stride": 32, "scoring": "s1", "drift_reference": base_long.key
    }
    assert by[("untrained", "text")].identity.settings == {"dtype": "float32", "max_length": 64, "stride": 32, "scoring": "s1"}
    assert "peft" not in base_long.identity.versions and by[("untrained", "text")].identity.versions["peft"] == "0.1"
    assert all(i.key == i.identity.key for i in work.items) and len({i.key for i in work.items}) == 16
    assert plan(request, facts) == work  # pure: the same inputs, the same list


HEAVY = ("torch", "transformers", "peft", "lm_eval")
# Importing any of them fails (a finder that refuses them: a None in sys.modules would trip scipy,
# which looks torch up there to recognise its arrays).
NO_GPU_STACK = (
    "import sys\n"
    "class Refuse:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    f"        if name.split('.')[0] in {HEAVY!r}: raise ImportError(name + ' is not importable here')\n"
    "sys.meta_path.insert(0, Refuse())\n"
    "from gate.cli import main\n"
    "main()\n"
)


def test_merge_needs_no_checkpoints_no_base_and_no_torch(world, tmp_path):
    cli = CliRunner()
    run = ["run", world.checkpoints, "--config", world.config, "--device", "cpu", "-q"]
    local = tmp_path / "local"
    assert cli.invoke(main, [str(a) for a in [*run, "--out", local]]).exit_code == 1
    shards = []
    for i in (1, 2):
        out = tmp_path / f"shard{i}"
        result = cli.invoke(main, [str(a) for a in [*run, "--out", out, "--shard", f"{i}/2"]])
        assert result.exit_code == 0, result.output
        shards.append(out)
    merged = tmp_path / "merged"
    args = ["merge", "--out", merged, "--config", world.config, *[a for s in shards for a in ("--from", s)]]
    done = subprocess.run([sys.executable, "-c", NO_GPU_STACK, *map(str, args)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # as the local run: no candidate
    assert "computed 0 model x suite score(s), reused 16 from the store" in done.stdout and "Traceback" not in done.stderr
    single, combined = (json.loads((d / "results.json").read_text()) for d in (local, merged))
    for doc in (single, combined):
        doc.pop("created_at"), doc.pop("command")
    assert combined == single
    verdicts = [json.loads((d / "verdict.json").read_text()) for d in (local, merged)]
    for v in verdicts:
        v.pop("provenance")
    assert verdicts[0] == verdicts[1]
    # the wrapper really blocks the GPU stack
    blocked = subprocess.run([sys.executable, "-c", NO_GPU_STACK.replace("from gate.cli import main\nmain()", "import torch")], capture_output=True)
    assert blocked.returncode != 0


def test_merge_refuses_shards_of_different_plans(world, tmp_path):
    cli = CliRunner()

    outs = []
    for i, limit in ((1, "2"), (2, "3")):
        out = tmp_path / f"shard{i}"
        args = ["run", world.checkpoints, "--config", world.config, "--device", "cpu", "-q", "--out", out, "--shard", f"{i}/2", "--limit", limit]
        assert cli.invoke(main, [str(a) for a in args]).exit_code == 0
        outs.append(out)
    result = cli.invoke(main, ["merge", "--out", str(tmp_path / "m"), *[a for s in outs for a in ("--from", str(s))]])
    assert result.exit_code == 2
    assert f"the shards are not shares of one run:\n  - {outs[1]}: other checkpoints or suites than {outs[0]}" in result.stderr
    assert not (tmp_path / "m" / "results.json").exists()


def test_gate_run_is_one_library_call_returning_results_verdict_and_what_it_did(world, tmp_path):
    import gate
    from gate.results import read_results
    from gate.verdict import read_verdict

    out = tmp_path / "out"
    done = gate.run(world.checkpoints, world.config, out, device="cpu")
    assert done.results == read_results(out / "results.json") and done.verdict == read_verdict(out / "verdict.json")
    assert done.exit_code == 1 and done.verdict.selected is None  # as `gate run` exits on this world
    assert sorted(done.outcome.computed) == sorted((i.model, i.suite) for i in read_work(out / WORK_NAME).items)
    work = read_work(out / WORK_NAME)  # planned before any model loaded, kept beside results.json
    assert [m.name for m in work.models] == [m.name for m in [done.results.base, *done.results.checkpoints]]
    assert work.settings == done.results.settings and work.suites == done.results.suites
    again = gate.run(world.checkpoints, world.config, out, device="cpu")
    assert again.outcome.computed == [] and again.outcome.base_loads == 0 and len(again.outcome.reused) == 16
    shard = gate.run(world.checkpoints, world.config, tmp_path / "shard", device="cpu", shard="2/2")
    assert shard.verdict is None and not (tmp_path / "shard" / "verdict.json").exists()
    assert {m for m, _ in shard.outcome.computed} == {"run-a/checkpoint-4"}  # valid checkpoints 1 and 3 are share 1's


def test_a_checkpoint_that_failed_in_its_shard_fails_in_the_merge_as_in_a_local_run(world, ckpt_copy, tmp_path):
    from gate.train.tiny import build_base, save_untrained_adapter

    save_untrained_adapter(build_base(tmp_path / "other-base", hidden_size=32), ckpt_copy / "foreign")  # fits no base here
    cli = CliRunner()
    run = ["run", ckpt_copy, "--config", world.config, "--device", "cpu", "-q"]
    local = tmp_path / "local"
    assert cli.invoke(main, [str(a) for a in [*run, "--out", local]]).exit_code == 2
    shards = [tmp_path / f"shard{i}" for i in (1, 2)]
    assert [cli.invoke(main, [str(a) for a in [*run, "--out", s, "--shard", f"{i}/2"]]).exit_code for i, s in enumerate(shards, 1)] == [2, 0]
    merged = tmp_path / "merged"
    result = cli.invoke(main, ["merge", "--out", str(merged), *[a for s in shards for a in ("--from", str(s))]])
    assert result.exit_code == 2 and "error: foreign: the adapter does not fit the base" in result.stderr
    single, combined = (json.loads((d / "results.json").read_text()) for d in (local, merged))
    for doc in (single, combined):
        doc.pop("created_at"), doc.pop("command")
    assert combined == single
    assert next(c for c in combined["checkpoints"] if c["name"] == "foreign")["status"] == "error"
