"""Ray scale-out: identical results to a local run, and a dead worker costs only its job."""

from __future__ import annotations

import json
import os

import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'gate[ray]'")

from gate.request import prepare_run  # noqa: E402
from gate.flow import run  # noqa: E402
from gate.runner.distributed import FAULT_ENV, run_on_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    marker = tmp_path_factory.mktemp("fault") / "died"
    env = {FAULT_ENV: f"run-a/checkpoint-4:{marker}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": os.environ["HF_HOME"]}
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield marker
    ray.shutdown()


def numbers(results) -> dict:
    """Every number of results.json that scoring produced (not times or paths)."""
    out = {}
    for model in [results.base, *results.checkpoints]:
        out[model.name] = (
            model.status,
            {k: [(d.id, d.nll, d.tokens, d.bytes) for d in v.documents] for k, v in model.scores.items()},
            {k: [(i.id, i.prompt_hash, i.values) for i in v.items] for k, v in model.tasks.items()},
            dict(model.skipped),
        )
    return out


def test_ray_run_equals_the_local_run_and_survives_a_dead_worker(world, tmp_path, local_ray):
    local = run(prepare_run(world.checkpoints, config_path=world.config, out_dir=tmp_path / "local", device="cpu"))
    request = prepare_run(world.checkpoints, config_path=world.config, out_dir=tmp_path / "ray", device="cpu")
    distributed = run_on_ray(request, workers=2)
    assert local_ray.exists(), "the injected fault did not fire: the retry path was not exercised"
    assert numbers(distributed.results) == numbers(local.results)
    assert sorted(distributed.computed) == sorted(local.computed)  # the killed job was redone, nothing twice
    assert 1 <= distributed.base_loads <= 3  # once per worker that needed it (one restarted)
    assert distributed.exit_code == 0
    raw = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert raw["checkpoints"][1]["scores"]["text"]["nll_sum"] == local.results.checkpoints[1].scores["text"].nll_sum
    again = run_on_ray(request, workers=2)
    assert again.computed == [] and again.base_loads == 0


def test_ray_with_lm_eval_suites_and_a_funnel_equals_the_local_run(world, tmp_path, local_ray):
    config = tmp_path / "gate.yaml"
    config.write_text(
        f"base: {world.base}\nsuites:\n  - {{name: text, path: {world.suites / 'text.jsonl'}}}\n"
        "  - {name: arith, limit: 6}\nfunnel: {top_k: 1, by: text.perplexity}\n"
    )
    local = run(prepare_run(world.checkpoints, config_path=config, out_dir=tmp_path / "local", device="cpu"))
    distributed = run_on_ray(prepare_run(world.checkpoints, config_path=config, out_dir=tmp_path / "ray", device="cpu"), workers=2)
    assert numbers(distributed.results) == numbers(local.results)
    assert sum(bool(c.skipped) for c in distributed.results.checkpoints) == 2
    assert sorted(distributed.computed) == sorted(local.computed)
