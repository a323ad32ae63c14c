"""lm-eval suites on the loaded model: equal to lm-eval's own runs, per-item records, incremental."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_jsonl
from gate.cli import main
from gate.request import prepare_run
from gate.flow import run

MC_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/mc.jsonl
    train: data/mc_train.jsonl
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 2.0
"""

ROLLING_YAML = """\
task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/rolling.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def mc_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        choices = [a + b, a + b + 1, a + b + 10, a * b + 2]
        rng.shuffle(choices)
        rows.append({"question": f"{a} plus {b} is", "choices": [str(c) for c in choices], "answer": choices.index(a + b)})
    return rows


@pytest.fixture(scope="module")
def tasks(world, tmp_path_factory) -> Path:
    """A folder with a multiple-choice and a rolling-loglikelihood task, data beside them."""
    from gate.train.tiny import toy_sentences

    root = tmp_path_factory.mktemp("tasks")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "mc.jsonl", mc_rows(16, 1))
    write_jsonl(root / "data" / "mc_train.jsonl", mc_rows(8, 2))
    write_jsonl(root / "data" / "rolling.jsonl", [{"text": t} for t in toy_sentences(6, 5)])
    (root / "mc.yaml").write_text(MC_YAML)
    (root / "rolling.yaml").write_text(ROLLING_YAML)
    return root


def config_for(world, tasks: Path, folder: Path, extra: str = "", mc_fewshot: int = 2) -> Path:
    config = folder / "gate.yaml"
    config.write_text(
        f"base: {world.base}\n"
        "batch_size: 4\n"
        "suites:\n"
        f"  - {{name: text, path: {world.suites / 'text.jsonl'}}}\n"
        f"  - {{name: mc, type: lm_eval, task: {tasks / 'mc.yaml'}, num_fewshot: {mc_fewshot}, metric: acc}}\n"
        f"  - {{name: rolling, type: lm_eval, task: {tasks / 'rolling.yaml'}}}\n" + extra
    )
    return config


@pytest.fixture(scope="module")
def gate_run(world, tasks, tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness-run")
    config = config_for(world, tasks, folder)
    outcome = run(prepare_run(world.checkpoints, config_path=config, out_dir=folder / "out", device="cpu"))
    return outcome, config, folder


def lm_eval_own(world, tasks: Path, peft: str | None, task: str, num_fewshot: int):
    """lm-eval's own run: `--model hf --model_args pretrained=BASE,peft=CKPT`, from the task's folder."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = f"pretrained={world.base},dtype=float32,max_length=128" + (f",peft={peft}" if peft else "")
    cwd = os.getcwd()
    os.chdir(tasks)  # lm-eval resolves data_files against the working directory
    try:
        return lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=[task],
            num_fewshot=num_fewshot,
            batch_size=4,
            device="cpu",
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            log_samples=True,
            bootstrap_iters=0,
        )
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("model", ["base", "run-a/checkpoint-2", "run-a/checkpoint-4"])
def test_scores_equal_lm_evals_own_runs(world, tasks, gate_run, model):
    outcome, _, _ = gate_run
    results = outcome.results
    record = results.base if model == "base" else next(c for c in results.checkpoints if c.name == model)
    peft = None if model == "base" else str(world.checkpoints / model)

    own = lm_eval_own(world, tasks, peft, "tiny_mc", 2)
    mc = record.tasks["mc"]
    assert mc.metrics["acc"] == pytest.approx(own["results"]["tiny_mc"]["acc,none"], abs=1e-12)
    assert mc.metrics["acc_norm"] == pytest.approx(own["results"]["tiny_mc"]["acc_norm,none"], abs=1e-12)
    assert [i.values["acc"] for i in mc.items] == [s["acc"] for s in sorted(own["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    assert [i.prompt_hash for i in mc.items] == [s["prompt_hash"] for s in sorted(own["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]

    own = lm_eval_own(world, tasks, peft, "tiny_rolling", 0)
    rolling = record.tasks["rolling"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert rolling.metrics[metric] == pytest.approx(own["results"]["tiny_rolling"][f"{metric},none"], rel=1e-6)
    own_ll = [s["word_perplexity"][0] for s in sorted(own["samples"]["tiny_rolling"], key=lambda s: s["doc_id"])]
    assert [i.values["loglikelihood"] for i in rolling.items] == pytest.approx(own_ll, rel=1e-6)


def test_items_are_paired_and_recorded(gate_run):
    outcome, _, _ = gate_run
    results = outcome.results
    base = results.base.tasks["mc"]
    assert len(base.items) == 16 and base.metric == "acc" and base.num_fewshot == 2
    assert [i.id for i in base.items] == [str(i) for i in range(16)]
    for ckpt in results.checkpoints:
        assert [(i.id, i.prompt_hash) for i in ckpt.tasks["mc"].items] == [(i.id, i.prompt_hash) for i in base.items]
        assert set(ckpt.tasks["rolling"].items[0].values) == {"loglikelihood", "words", "bytes"}
    untrained = next(c for c in results.checkpoints if c.name == "untrained")
    assert untrained.tasks["rolling"].items == results.base.tasks["rolling"].items  # B = 0: exactly the base
    assert results.settings.lm_eval and results.settings.seeds["fewshot_random_seed"] == 1234
    # lm-eval's version is part of the identity of its suites' scores (and only of theirs).
    assert base.libraries["lm_eval"] == results.settings.lm_eval and "peft" not in base.libraries
    assert untrained.tasks["mc"].libraries == {**base.libraries, "peft": results.versions["peft"]}
    assert "lm_eval" not in untrained.scores["text"].libraries
    info = {s.name: s for s in results.suites}
    assert info["mc"].type == "lm_eval" and info["mc"].num_fewshot == 2 and info["mc"].documents == 16


def test_rerun_computes_nothing_and_records_are_stable(world, gate_run):
    outcome, config, folder = gate_run
    again = run(prepare_run(world.checkpoints, config_path=config, out_dir=folder / "out", device="cpu"))
    assert again.computed == [] and again.base_loads == 0
    assert again.results.checkpoints[1].tasks == outcome.results.checkpoints[1].tasks


def test_changed_data_or_fewshot_recomputes(world, tasks, tmp_path):
    copy = tmp_path / "tasks"
    shutil.copytree(tasks, copy)
    out = tmp_path / "out"
    config = config_for(world, copy, tmp_path)
    run(prepare_run(world.checkpoints, config_path=config, out_dir=out, device="cpu"))
    config = config_for(world, copy, tmp_path, mc_fewshot=1)
    again = run(prepare_run(world.checkpoints, config_path=config, out_dir=out, device="cpu"))
    assert sorted({s for _, s in again.computed}) == ["mc"]
    rows = mc_rows(16, 1)
    rows[0]["question"] = "1 plus 1 is"
    write_jsonl(copy / "data" / "mc.jsonl", rows)
    again = run(prepare_run(world.checkpoints, config_path=config, out_dir=out, device="cpu"))
    assert sorted({s for _, s in again.computed}) == ["mc"] and len(again.computed) == 4


def test_funnel_runs_lm_eval_suites_on_the_top_k_only(world, tasks, tmp_path):
    config = config_for(world, tasks, tmp_path, extra="funnel: {top_k: 1, by: text.perplexity}\n")
    outcome = run(prepare_run(world.checkpoints, config_path=config, out_dir=tmp_path / "out", device="cpu"))
    results = outcome.results
    ranked = sorted(results.checkpoints, key=lambda c: c.scores["text"].perplexity)
    best, rest = ranked[0], ranked[1:]
    assert set(best.tasks) == {"mc", "rolling"} and best.skipped == {}
    for ckpt in rest:
        assert ckpt.tasks == {}
        assert ckpt.skipped == {s: "funnel: not among the 1 best by text.perplexity" for s in ("mc", "rolling")}
    assert set(results.base.tasks) == {"mc", "rolling"}
    raw = json.loads((tmp_path / "out" / "results.json").read_text())
    assert raw["checkpoints"][0]["skipped"] or raw["checkpoints"][1]["skipped"]


def test_limit_marks_the_results_partial(world, tasks, tmp_path):
    config = config_for(world, tasks, tmp_path)
    outcome = run(prepare_run(world.checkpoints, config_path=config, out_dir=tmp_path / "out", device="cpu", limit=3))
    assert outcome.results.partial
    assert len(outcome.results.base.tasks["mc"].items) == 3
    assert len(outcome.results.base.scores["text"].documents) == 3
    assert json.loads((tmp_path / "out" / "results.json").read_text())["partial"] is True


def test_builtin_suites_run_offline(world, tmp_path):
    config = tmp_path / "gate.yaml"
    config.write_text(f"base: {world.base}\nsuites:\n  - name: arith\n    limit: 8\n  - name: format\n    limit: 4\n")
    outcome = run(prepare_run(world.checkpoints / "untrained", config_path=config, out_dir=tmp_path / "out", device="cpu"))
    base = outcome.results.base
    assert 0.0 <= base.tasks["arith"].metrics["acc"] <= 1.0 and len(base.tasks["arith"].items) == 8
    assert base.tasks["arith"].num_fewshot == 3
    assert set(base.tasks["format"].metrics) == {"format_ok"} and len(base.tasks["format"].items) == 4


@pytest.mark.parametrize(
    "task,files,message",
    [
        ("no_such_task_anywhere", {}, "lm-eval has no task 'no_such_task_anywhere'"),
        ("broken.yaml", {"broken.yaml": "task: x\n  bad: [indent\n"}, "is not valid YAML"),
        ("gone.yaml", {"gone.yaml": MC_YAML.replace("data/mc.jsonl", "data/missing.jsonl")}, "data file"),
    ],
)
def test_bad_tasks_exit_2(world, tmp_path, task, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "mc_train.jsonl", mc_rows(2, 0))
    config = tmp_path / "gate.yaml"
    config.write_text(f"base: {world.base}\nsuites:\n  - {{name: t, type: lm_eval, task: {task}}}\n")
    result = CliRunner().invoke(main, ["run", str(world.checkpoints), "--config", str(config), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "suite 't'" in result.stderr
    assert "Traceback" not in result.output


def test_cli_prints_the_lm_eval_table_with_skipped_cells(world, tasks, tmp_path):
    config = config_for(world, tasks, tmp_path, extra="funnel: {top_k: 2, by: text.perplexity}\n")
    args = ["run", str(world.checkpoints), "--config", str(config), "--out", str(tmp_path / "out"), "-q", "--limit", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output  # no candidate: 4 items per suite cannot certify anything
    lines = result.stdout.splitlines()
    start = lines.index("lm-eval")
    assert lines[start + 1].split() == ["model", "step", "mc", "acc", "rolling", "word_perplexity"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 2 : start + 6]}
    assert sum(row[1:] == ["skipped", "skipped"] for row in rows.values()) == 1
    counts = next(i for i, line in enumerate(lines) if line.startswith("computed "))
    assert lines[counts].endswith("skipped 2 (funnel)")
    assert lines[counts + 1] == "partial: suites were capped by a limit; these numbers are for a quick look only"


def test_task_identity_does_not_depend_on_the_output_folder(world, tasks, tmp_path):
    """Ray workers and shards localize tasks elsewhere: the same task must get the same keys."""
    from gate.config import SuiteSpec
    from gate.runner.harness import prepare_task

    spec = SuiteSpec(name="mc", type="lm_eval", task=str(tasks / "mc.yaml"), num_fewshot=2)
    first, second = (prepare_task(spec, tmp_path / out) for out in ("a", "b"))
    assert first.identity == second.identity


LAMBADA_YAML = """\
task: tiny_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/rolling.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1] | join(' ')}}"
doc_to_target: "{{' ' + text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_metric_directions_and_aggregations_come_from_the_task(gate_run, tasks, tmp_path):
    """lm-eval's higher_is_better and aggregation are recorded with the scores (the policy reads them)."""
    from gate.config import SuiteSpec
    from gate.runner.harness import prepare_task

    outcome, _, _ = gate_run
    mc, rolling = outcome.results.base.tasks["mc"], outcome.results.base.tasks["rolling"]
    assert mc.higher_is_better == {"acc": True, "acc_norm": True} and mc.aggregation == {"acc": "mean", "acc_norm": "mean"}
    assert rolling.higher_is_better == {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}
    assert rolling.aggregation["word_perplexity"] == "weighted_perplexity"
    (tasks / "lambada.yaml").write_text(LAMBADA_YAML)
    lambada = prepare_task(SuiteSpec(name="lam", type="lm_eval", task=str(tasks / "lambada.yaml")), tmp_path)
    assert lambada.higher_is_better == {"perplexity": False, "acc": True}
    assert lambada.aggregation == {"perplexity": "perplexity", "acc": "mean"}
    mc_task = prepare_task(SuiteSpec(name="mc", type="lm_eval", task=str(tasks / "mc.yaml")), tmp_path)
    first = mc_rows(16, 1)[0]
    assert mc_task.doc_fields["0"] == {"question": first["question"], "answer": str(first["answer"])}  # lists are left out
