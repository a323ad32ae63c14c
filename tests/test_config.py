"""gate.yaml: typed config, and every problem reported at once with file and field."""

from __future__ import annotations

import pytest

from gate.config import find_config, load_config
from gate.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    return path


def test_full_config(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "style.jsonl").write_text('{"text": "x"}\n')
    config = load_config(
        write(
            tmp_path,
            "base: org/model\nsuites:\n  - name: known-good\n  - name: style\n    path: data/style.jsonl\n"
            "    chat_template: false\n    limit: 5\ndevice: cpu\ndtype: float32\nbatch_size: 2\n"
            "max_length: 64\nstride: 16\n",
        )
    )
    assert config.base == "org/model" and config.options.device == "cpu" and config.options.batch_size == 2
    assert (config.options.max_length, config.options.stride, config.options.dtype) == (64, 16, "float32")
    known, style = config.suites
    assert known.path.endswith("known-good.jsonl")
    assert style.path == str((tmp_path / "data" / "style.jsonl").resolve())
    assert style.chat_template is False and style.limit == 5


def test_defaults_without_a_file():
    config = load_config(None)
    assert [s.name for s in config.suites] == ["known-good"]
    assert config.base is None and config.options.batch_size == 8


def test_all_problems_at_once(tmp_path):
    path = write(
        tmp_path,
        "bsae: x\nbatch_size: 0\ndtype: float64\nmax_length: yes\nsuites:\n"
        "  - name: a\n    path: missing.jsonl\n    chat_templte: true\n"
        "  - name: a\n    type: mmlu\n  - path: x.jsonl\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    expected = [
        "bsae: unknown key; did you mean 'base'?",
        "batch_size: must be a positive integer, not 0",
        "dtype: 'float64' is not one of auto, float32, bfloat16, float16",
        "max_length: must be an integer, not True",
        "suites[0] (a).path:",
        "missing.jsonl does not exist",
        "suites[0].chat_templte: unknown key; did you mean 'chat_template'?",
        "suites[1] (a).name: 'a' is used twice",
        "suites[1] (a).type: 'mmlu' is not one of perplexity, lm_eval",
        "suites[2].name: missing",
    ]
    for fragment in expected:
        assert fragment in message, fragment
    assert len(err.value.problems) == 9


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("suites: [\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("suites: []\n", "suites: must be a non-empty list"),
    ],
)
def test_malformed_files(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_find_config_order(tmp_path, monkeypatch):
    checkpoints = tmp_path / "ckpts"
    checkpoints.mkdir()
    monkeypatch.chdir(tmp_path)
    assert find_config(None, str(checkpoints)) is None
    write(tmp_path, "suites: [{name: known-good}]\n")
    assert find_config(None, str(checkpoints)) == tmp_path.joinpath("gate.yaml").relative_to(tmp_path)
    (checkpoints / "gate.yaml").write_text("")
    assert find_config(None, str(checkpoints)) == checkpoints / "gate.yaml"
    assert str(find_config("x.yaml", str(checkpoints))) == "x.yaml"


@pytest.mark.parametrize("name", ["../../escape", "/abs", ".hidden", "a/b", "with space"])
def test_suite_names_cannot_point_outside_the_output_folder(tmp_path, name):
    (tmp_path / "s.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="may only use letters, digits"):
        load_config(write(tmp_path, f"suites:\n  - {{name: '{name}', path: s.jsonl}}\n"))


def test_gate_direction_cluster_and_minimum_items(tmp_path):
    config = load_config(
        write(
            tmp_path,
            "suites:\n  - name: known-good\n  - name: arith\n"
            "gates:\n"
            "  - {suite: arith, metric: score, min_gain: 0.01, higher_is_better: true, cluster: passage, min_items: 50}\n"
            "  - {suite: arith, metric: loss, max_increase: 0.1, higher_is_better: false}\n"
            "  - {suite: arith, metric: weird, max_drop: 0.1}\n",  # unknown direction: checked against results later
        )
    )
    score, loss, weird = config.policy.gates
    assert (score.higher_is_better, score.cluster, score.min_items) == (True, "passage", 50)
    assert loss.higher_is_better is False and weird.higher_is_better is None
    with pytest.raises(ConfigError) as err:
        load_config(
            write(
                tmp_path,
                "suites:\n  - name: known-good\n  - name: arith\n"
                "gates:\n"
                "  - {suite: arith, metric: score, max_increase: 0.1, higher_is_better: true}\n"
                "  - {suite: known-good, metric: perplexity, max_increase: 5%, higher_is_better: false}\n"
                "  - {suite: arith, metric: acc, max_drop: 0.1, min_items: 0, cluster: 3}\n",
            )
        )
    assert err.value.problems == [
        "gates[0].max_increase: score is better when higher; use max_drop / min_gain",
        "gates[1].higher_is_better: perplexity of a perplexity suite is better when lower; remove the key",
        "gates[2].cluster: must be a string, not 3",
        "gates[2].min_items: must be a positive integer, not 0",
    ]


def test_run_options_are_declared_once():
    """RunOptions is the one declaration: `gate run` has an option per field, gate.yaml accepts the
    YAML ones, and prepare_run / gate.run take the same names (an unknown one is refused)."""
    import dataclasses

    from gate.cli import main
    from gate.config import TOP_KEYS, YAML_OPTIONS, RunOptions
    from gate.request import merge_options

    fields = [f.name for f in dataclasses.fields(RunOptions)]
    cli = {p.name for p in main.commands["run"].params}
    assert set(fields) <= cli, set(fields) - cli
    assert set(YAML_OPTIONS) <= set(fields) and set(YAML_OPTIONS) <= TOP_KEYS
    yaml_defaults = RunOptions(device="cpu", batch_size=2)
    merged = merge_options(yaml_defaults, {"batch_size": 4, "dtype": None, "online": False, "limit": 3})
    assert merged == RunOptions(device="cpu", batch_size=4, limit=3)
    with pytest.raises(TypeError, match="unknown run option.*batchsize"):
        merge_options(yaml_defaults, {"batchsize": 4})
