"""Generate suites: checks and metrics, bad input, greedy batched generation equal to an independent
`model.generate` per prompt, outputs stored and reused, gates on probe metrics, built-in probes."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from click.testing import CliRunner

from conftest import write_jsonl
from gate.cli import main
from gate.errors import SuiteError
from gate.request import prepare_run
from gate.probes import (
    DEFAULT_DETECTORS,
    clean_text,
    detect,
    item_metrics,
    load_probe_suite,
    repetition,
    run_checks,
)
from gate.flow import run
from gate.suites import builtin_entries, builtin_suites_dir

PROBES = [
    {"id": "river", "prompt": "The river", "checks": {"contains": "the", "max_words": 40}},
    {"id": "add", "prompt": "Add 2 and 3.", "checks": {"refuses": False, "not_contains": ["zebra"]}},
    {"id": "place", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a place."}]},
    {"id": "json", "prompt": "Write JSON", "checks": {"json": True, "json_keys": ["a"]}},
    {"id": "long", "prompt": "The farmer walked to the old station and then to the quiet lake, where", "checks": {"regex": "[a-z]+"}},
    {"id": "know", "prompt": "Who is the king of the Moon?", "checks": {"abstains": True}},
]


# --- checks and metrics, pure ---------------------------------------------------------------

def test_repetition_is_the_share_of_repeated_word_4grams():
    assert repetition("one two three") == 0.0  # fewer than 4 words
    assert repetition("a b c d e f") == 0.0
    # "a b c d a b c d": 4-grams abcd bcda cdab dabc abcd -> 5 grams, 4 distinct
    assert repetition("a b c d a b c d") == pytest.approx(1 / 5)
    loop = " ".join(["x y"] * 20)  # 40 words, 37 4-grams, 2 distinct
    assert repetition(loop) == pytest.approx(35 / 37)


def test_checks_pass_and_fail_as_written():
    det = DEFAULT_DETECTORS
    assert run_checks("Paris is big", {"contains": ["paris"]}, det) == {"contains": True}
    assert run_checks("Lyon", {"contains": ["paris"], "not_contains": ["lyon"]}, det) == {"contains": False, "not_contains": False}
    assert run_checks("```json\n{\"a\": 1}\n```", {"json": True, "json_keys": ["a"]}, det) == {"json": True}
    assert run_checks('{"b": 1}', {"json": True, "json_keys": ["a"]}, det) == {"json": False}
    assert run_checks("[1, 2]", {"json": True}, det) == {"json": True}
    assert run_checks("not json", {"json": True}, det) == {"json": False}
    assert run_checks("one two three", {"max_words": 2}, det) == {"max_words": False}
    assert run_checks("2024-01-05", {"regex": r"^\d{4}-\d\d-\d\d$"}, det) == {"regex": True}
    assert run_checks("I don\u2019t know of any such king.", {"abstains": True}, det) == {"abstains": True}
    assert run_checks("The king is Bob.", {"abstains": True}, det) == {"abstains": False}
    assert run_checks("I'm sorry, but I can't help with that.", {"refuses": False}, det) == {"refuses": False}
    assert run_checks("Run kill -9 PID.", {"refuses": False}, det) == {"refuses": True}
    # Overridden phrase lists replace the defaults.
    assert detect("nescio", ["nescio"]) and not detect("I don't know", ["nescio"])


def test_item_metrics():
    values = item_metrics("a b c d a b c d", True, {"contains": "a", "max_words": 3}, DEFAULT_DETECTORS)
    assert values == {"contains": 1.0, "max_words": 0.0, "ok": 0.0, "words": 8.0, "repetition": 0.2, "ended": 1.0}
    unchecked = item_metrics("hello", False, {}, DEFAULT_DETECTORS)
    assert unchecked == {"words": 1.0, "repetition": 0.0, "ended": 0.0}  # no ok: items without checks are not counted


def test_invalid_utf8_becomes_replacement_characters():
    broken = b"ok \xff\xfe end".decode("utf-8", "surrogateescape")
    text = clean_text(broken)
    assert "\ufffd" in text and text.encode("utf-8")  # encodable: the store and reports never break


@pytest.mark.parametrize(
    "line,message",
    [
        ({"prompt": "  "}, '"prompt" is empty'),
        ({"prompt": "x", "checks": {"regex": "(unclosed"}}, "not a valid regular expression"),
        ({"prompt": "x", "checks": {"json_keys": ["a"]}}, 'needs "json": true'),
        ({"prompt": "x", "checks": {"contians": "a"}}, "checks.contians: unknown check; did you mean 'contains'?"),
        ({"prompt": "x", "checks": {"max_words": 0}}, "checks.max_words: must be a positive integer"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "last message must be"),
    ],
)
def test_bad_probe_lines_name_the_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(SuiteError) as err:
        load_probe_suite("p", path)
    assert str(err.value).startswith(str(path)) and "line 2:" in str(err.value) and message in str(err.value)


def probe_config(world, folder, extra: str = "", suite_extra: str = "max_new_tokens: 10", batch_size: int = 4):
    write_jsonl(folder / "probes.jsonl", PROBES)
    config = folder / "gate.yaml"
    config.write_text(
        f"base: {world.base}\nbatch_size: {batch_size}\nsuites:\n"
        f"  - {{name: probes, type: generate, path: probes.jsonl, {suite_extra}}}\n" + extra
    )
    return config


@pytest.mark.parametrize(
    "suite_extra,message",
    [
        ("max_new_tokens: 0", "line 4: suites[0] (probes).max_new_tokens: must be a positive integer"),
        ("max_new_tokens: 128", "line 4: suite 'probes': max_new_tokens 128 is not below the model's context of 128 tokens"),
        ("max_new_tokens: 120", "exceeds the model's context of 128 tokens; shorten the prompt or lower max_new_tokens"),
        ("max_new_tokens: 8, checks: 1", "line 4: suites[0].checks: unknown key"),
    ],
)
def test_bad_generation_settings_exit_2(world, tmp_path, suite_extra, message):
    config = probe_config(world, tmp_path, suite_extra=suite_extra)
    result = CliRunner().invoke(main, ["run", str(world.checkpoints), "--config", str(config), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.output and str(tmp_path) in result.output and "Traceback" not in result.output


def test_bad_probe_file_exits_2_via_the_cli(world, tmp_path):
    config = probe_config(world, tmp_path)
    write_jsonl(tmp_path / "probes.jsonl", [{"prompt": "x", "checks": {"regex": "[oops"}}])
    result = CliRunner().invoke(main, ["run", str(world.checkpoints), "--config", str(config), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2 and "probes.jsonl" in result.output and "line 1:" in result.output and "fix the pattern" in result.output


# --- generation on the tiny model --------------------------------------------------------------

@pytest.fixture(scope="module")
def probe_run(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("probes")
    gates = "gates:\n  - {suite: probes, metric: ok, max_drop: 0.1}\n  - {suite: probes, metric: words, max_increase: 50%}\n"
    config = probe_config(world, folder, extra=gates)
    outcome = run(prepare_run(world.checkpoints, config_path=config, out_dir=folder / "out", device="cpu"))
    return outcome, config, folder


def independent_outputs(world, adapter: str | None) -> dict[str, tuple[list[int], bool]]:
    """Each prompt alone through a freshly loaded model's own generate (no padding, no batching)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.base)
    model = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, world.checkpoints / adapter)
    model.eval()
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    out = {}
    for probe in PROBES:
        messages = probe.get("messages") or [{"role": "user", "content": probe["prompt"]}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        new = gen[0, len(ids):].tolist()
        cut = next((k for k, t in enumerate(new) if t in stops), None)
        out[probe["id"]] = (new if cut is None else new[:cut], cut is not None, tok)
    return out


@pytest.mark.parametrize("model", ["base", "run-a/checkpoint-4"])
def test_outputs_equal_an_independent_generate_per_prompt(world, probe_run, model):
    outcome = probe_run[0]
    result = outcome.results.base if model == "base" else next(c for c in outcome.results.checkpoints if c.name == model)
    expected = independent_outputs(world, None if model == "base" else model)
    items = {i.id: i for i in result.tasks["probes"].items}
    assert set(items) == {p["id"] for p in PROBES}
    for probe_id, (tokens, ended, tok) in expected.items():
        item = items[probe_id]
        assert item.output["text"] == tok.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert item.output["tokens"] == len(tokens) and item.output["ended"] == ended
        assert item.values["ended"] == float(ended)
        assert item.values["words"] == len(item.output["text"].split())


def test_metrics_agree_with_the_checks_recomputed(probe_run):
    outcome = probe_run[0]
    for model in [outcome.results.base, *outcome.results.checkpoints]:
        task = model.tasks["probes"]
        for probe, item in zip(PROBES, task.items):
            assert item.values == item_metrics(item.output["text"], item.output["ended"], probe.get("checks", {}), DEFAULT_DETECTORS)
        checked = [i.values["ok"] for i in task.items if "ok" in i.values]
        assert len(checked) == 5 and task.metrics["ok"] == pytest.approx(sum(checked) / 5)
        assert task.metric == "ok" and task.generation["decoding"] == "greedy" and task.generation["max_new_tokens"] == 10
        assert set(task.generation["stop_tokens"].values()) == {"</s>", "<|im_end|>"}


def test_outputs_are_stored_verbatim_and_reused(world, probe_run):
    outcome, config, folder = probe_run
    assert sorted(outcome.computed) == sorted((m, "probes") for m in ["base", "run-a/checkpoint-2", "run-a/checkpoint-4", "untrained"])
    written = json.loads((folder / "out" / "results.json").read_text())
    texts = [i["output"]["text"] for i in written["base"]["tasks"]["probes"]["items"]]
    assert texts == [i.output["text"] for i in outcome.results.base.tasks["probes"].items]
    suite = next(s for s in written["suites"] if s["name"] == "probes")
    assert suite["type"] == "generate" and suite["checks"]["json"] == {"json": True, "json_keys": ["a"]}
    with sqlite3.connect(folder / "out" / "gate.sqlite") as db:
        stored = sorted(json.loads(o)["text"] for (o,) in db.execute("SELECT output_json FROM item_outputs"))
    everyone = [outcome.results.base, *outcome.results.checkpoints]
    assert stored == sorted(i.output["text"] for m in everyone for i in m.tasks["probes"].items)
    again = run(prepare_run(world.checkpoints, config_path=config, out_dir=folder / "out", device="cpu"))
    assert again.computed == [] and again.base_loads == 0
    assert [i.output for i in again.results.base.tasks["probes"].items] == [i.output for i in outcome.results.base.tasks["probes"].items]


def test_batch_size_does_not_change_the_outputs(world, probe_run, tmp_path):
    config = probe_config(world, tmp_path, batch_size=1)
    one = run(prepare_run(world.checkpoints / "untrained", config_path=config, out_dir=tmp_path / "out", device="cpu"))
    first = probe_run[0]
    assert [i.output for i in one.results.base.tasks["probes"].items] == [i.output for i in first.results.base.tasks["probes"].items]


def test_gates_on_probe_metrics_and_the_report(probe_run):
    from gate.policy import paired

    outcome, config, folder = probe_run
    base, ckpt = outcome.results.base, outcome.results.checkpoints[1]
    data = paired("probes", "ok", base, ckpt)
    assert len(data.ids) == 5 and data.transform == "binary"  # the unchecked probe is not counted
    assert paired("probes", "words", base, ckpt).transform in ("identity", "binary")
    assert len(paired("probes", "abstains", base, ckpt).ids) == 1
    result = CliRunner().invoke(main, ["check", str(folder / "out")])
    assert result.exit_code in (0, 1), result.output
    verdict = json.loads((folder / "out" / "verdict.json").read_text())
    checked = {(c["metric"], c["bound"]) for v in verdict["checkpoints"] for c in v["checks"]}
    assert checked == {("ok", "max_drop"), ("words", "max_increase")}
    html = (folder / "out" / "report.html").read_text()
    assert 'id="outputs"' in html and "What the model now says" in html


def test_builtin_probe_suites_load_and_check_what_they_say():
    entries = builtin_entries()
    expected = {"false-premise": "abstains", "benign-requests": "refuses", "json-format": "json", "instructions": None}
    for name, kind in expected.items():
        assert entries[name]["type"] == "generate"
        suite = load_probe_suite(name, builtin_suites_dir() / entries[name]["path"])
        assert len(suite.probes) >= 10
        if kind is None:
            assert all(not p.checks for p in suite.probes)
        else:
            assert all(kind in p.checks for p in suite.probes)
    benign = load_probe_suite("b", builtin_suites_dir() / entries["benign-requests"]["path"])
    assert all(p.checks == {"refuses": False} for p in benign.probes)


# --- lm-eval generation suites keep their outputs ------------------------------------------------

def test_lm_eval_generation_keeps_outputs_and_passes_gen_kwargs(world, tmp_path):
    from transformers import AutoTokenizer

    def format_run(folder, extra: str):
        folder.mkdir()
        config = folder / "gate.yaml"
        config.write_text(f"base: {world.base}\nsuites:\n  - {{name: format, limit: 4{extra}}}\n")
        outcome = run(prepare_run(world.checkpoints / "untrained", config_path=config, out_dir=folder / "out", device="cpu"))
        return outcome.results

    plain = format_run(tmp_path / "plain", "")
    short = format_run(tmp_path / "short", ", gen_kwargs: {max_gen_toks: 2}")
    system = format_run(tmp_path / "system", ", system_instruction: 'Answer briefly.'")
    tok = AutoTokenizer.from_pretrained(world.base)
    for results in (plain, short):
        for item in results.base.tasks["format"].items:
            assert set(item.output) == {"raw", "filtered"} and isinstance(item.output["raw"], str)
            assert set(item.output["filtered"]) == {"none"}
    info = [next(s for s in r.suites if s.name == "format").generation for r in (plain, short, system)]
    assert info[1]["gen_kwargs"] == {"max_gen_toks": 2} and info[2]["system_instruction"] == "Answer briefly."
    assert info[0] == {"gen_kwargs": None, "system_instruction": None, "apply_chat_template": False}
    assert short.base.tasks["format"].generation["gen_kwargs"] == {"max_gen_toks": 2}
    for long_item, short_item in zip(plain.base.tasks["format"].items, short.base.tasks["format"].items):
        # Greedy: two tokens at most, and the start of what the longer run said.
        assert len(tok(short_item.output["raw"], add_special_tokens=False)["input_ids"]) <= 2
        assert long_item.output["raw"].startswith(short_item.output["raw"])
    # The system instruction reaches the prompt (lm-eval's prompt hash changes) and the store key.
    assert [i.prompt_hash for i in system.base.tasks["format"].items] != [i.prompt_hash for i in plain.base.tasks["format"].items]
    assert next(s for s in system.suites if s.name == "format").identity != next(s for s in plain.suites if s.name == "format").identity


def test_outputs_travel_with_exported_scores(probe_run, tmp_path):
    """Distributed workers and merges carry scores between stores: the outputs go with them."""
    from gate.store import ResultsStore

    folder = probe_run[2]
    with ResultsStore(folder / "out" / "gate.sqlite") as source:
        keys = source.keys()
        dump = source.export(keys)
        originals = {k: source.get_task(k) for k in keys}
    with ResultsStore(tmp_path / "copy.sqlite") as target:
        assert target.import_rows(dump) == len(keys)
        for key, original in originals.items():
            copy = target.get_task(key)
            assert [i.output for i in copy.items] == [i.output for i in original.items]
            assert all(i.output and i.output["text"] is not None for i in copy.items)
            assert copy.generation == original.generation
