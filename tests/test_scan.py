"""The scanner on real Trainer/peft folders, and on every way a checkpoint can be broken."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gate.errors import CheckpointError
from gate.scan import scan


def by_name(report):
    return {c.name: c for c in report.checkpoints}


def test_finds_trainer_checkpoints_and_root_adapters(world):
    report = scan(world.checkpoints)
    found = by_name(report)
    assert list(found) == ["run-a/checkpoint-2", "run-a/checkpoint-4", "untrained"]
    c2, c4, untrained = found.values()
    assert (c2.step, c4.step, untrained.step) == (2, 4, None)
    assert all(c.ok and c.kind == "lora" for c in found.values())
    assert c4.base_model == str(world.base)
    assert c4.lora.r == 4 and c4.lora.alpha == 8 and sorted(c4.lora.target_modules) == ["q_proj", "v_proj"]
    state = json.loads((world.checkpoints / "run-a/checkpoint-4/trainer_state.json").read_text())
    logged = {e["step"]: e for e in state["log_history"] if "loss" in e}
    evals = {e["step"]: e for e in state["log_history"] if "eval_loss" in e}
    assert c4.train_loss == logged[4]["loss"]
    assert c4.eval_loss == evals[4]["eval_loss"]
    assert len({c.weights_hash for c in found.values()}) == 3
    assert report.invalid == []


def test_hash_is_content_based(world, ckpt_copy):
    a = by_name(scan(world.checkpoints))["run-a/checkpoint-4"].weights_hash
    moved = ckpt_copy / "renamed-run"
    shutil.move(ckpt_copy / "run-a", moved)
    assert by_name(scan(ckpt_copy))["renamed-run/checkpoint-4"].weights_hash == a


def test_nested_runs_and_final_adapter_at_run_root(world, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(world.checkpoints / "run-a", root / "lr-1e-4" / "run-a")
    shutil.copytree(world.checkpoints / "untrained", root / "lr-1e-4" / "final-only")
    # The final adapter saved at the run's root, beside its checkpoint-N folders.
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(world.checkpoints / "run-a/checkpoint-4" / f, root / "lr-1e-4" / "run-a" / f)
    names = [c.name for c in scan(root).checkpoints]
    assert names == ["lr-1e-4/final-only", "lr-1e-4/run-a/checkpoint-2", "lr-1e-4/run-a/checkpoint-4", "lr-1e-4/run-a"]


def test_checkpoint_folder_is_the_scanned_folder(world):
    report = scan(world.checkpoints / "untrained")
    assert [c.name for c in report.checkpoints] == ["untrained"]


def test_full_weight_checkpoint(world, tmp_path):
    shutil.copytree(world.base, tmp_path / "full" / "checkpoint-10")
    (c,) = scan(tmp_path / "full").checkpoints
    assert (c.kind, c.step, c.ok, c.has_tokenizer) == ("full", 10, True, True)


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
    elif how == "garbage":
        path.write_bytes(b"\x00" * 4)
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize(
    "file,how,reason",
    [
        ("adapter_model.safetensors", "truncate", "truncated"),
        ("adapter_model.safetensors", "garbage", "corrupt safetensors"),
        ("adapter_model.safetensors", "delete", "may still be being written"),
        ("adapter_config.json", "garbage", "not valid JSON"),
    ],
)
def test_damaged_checkpoint_is_invalid_and_others_stay_usable(ckpt_copy, file, how, reason):
    _damage(ckpt_copy / "run-a/checkpoint-2" / file, how)
    found = by_name(scan(ckpt_copy))
    bad = found["run-a/checkpoint-2"]
    assert bad.status == "invalid" and reason in bad.reason
    assert "run-a/checkpoint-2" in bad.reason  # the message names the checkpoint
    assert found["run-a/checkpoint-4"].ok and found["untrained"].ok


@pytest.mark.parametrize(
    "edit,reason",
    [
        (lambda c: c.pop("r"), "misses r"),
        (lambda c: c.update(r=8), "has rank 4 but adapter_config.json says r=8"),
        (lambda c: c.update(r=-1), "r must be a positive integer"),
        (lambda c: c.update(target_modules=["k_proj"]), "which the adapter config does not target"),
        (lambda c: c.update(peft_type="IA3"), "LORA adapters only"),
    ],
)
def test_inconsistent_adapter_config(ckpt_copy, edit, reason):
    path = ckpt_copy / "run-a/checkpoint-4/adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    bad = by_name(scan(ckpt_copy))["run-a/checkpoint-4"]
    assert bad.status == "invalid"
    assert reason in bad.reason


def test_pickled_weights_refused_unless_allowed(ckpt_copy):
    folder = ckpt_copy / "run-a/checkpoint-2"
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    bad = by_name(scan(ckpt_copy))["run-a/checkpoint-2"]
    assert bad.status == "invalid" and "--allow-pickle" in bad.reason
    allowed = by_name(scan(ckpt_copy, allow_pickle=True))["run-a/checkpoint-2"]
    assert allowed.ok and allowed.pickled


def test_trainer_folder_without_weights_is_listed_not_skipped(ckpt_copy):
    (ckpt_copy / "run-a/checkpoint-6").mkdir()
    (ckpt_copy / "run-a/checkpoint-6/optimizer.pt").write_bytes(b"x")
    bad = by_name(scan(ckpt_copy))["run-a/checkpoint-6"]
    assert bad.status == "invalid" and "no adapter_config.json" in bad.reason and bad.step == 6


def test_adapter_naming_another_base_is_invalid(ckpt_copy):
    path = ckpt_copy / "untrained/adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    path.write_text(json.dumps(config))
    found = by_name(scan(ckpt_copy))
    assert found["untrained"].status == "invalid"
    assert "'someone/other-model'" in found["untrained"].reason and "--base" in found["untrained"].reason
    assert found["run-a/checkpoint-2"].ok
    # With the base named explicitly, loading decides (a hub id and a path may be the same model).
    assert by_name(scan(ckpt_copy, base="x"))["untrained"].ok


def test_symlink_loop_terminates(ckpt_copy):
    os.symlink(ckpt_copy, ckpt_copy / "run-a" / "loop")
    assert len(scan(ckpt_copy).checkpoints) == 3


def test_changing_file_is_detected(ckpt_copy, monkeypatch):
    """A checkpoint rewritten while it is read is reported as still being written."""
    import sys

    scan_module = sys.modules["gate.scan"]

    real = scan_module.sha256_files
    target = ckpt_copy / "run-a/checkpoint-4/adapter_model.safetensors"

    def hash_then_append(files, root, cache=None):
        digest = real(files, root, cache)
        if root == target.parent:
            with target.open("ab") as fh:  # the trainer is still writing
                fh.write(b"\0")
        return digest

    monkeypatch.setattr(scan_module, "sha256_files", hash_then_append)
    bad = by_name(scan(ckpt_copy))["run-a/checkpoint-4"]
    assert bad.status == "invalid" and "still being written" in bad.reason


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        scan(tmp_path / "nope")


def test_empty_folder_has_no_checkpoints(tmp_path):
    assert scan(tmp_path).checkpoints == []


def test_folder_of_links_to_checkpoints_on_shared_storage(world, tmp_path):
    shared = tmp_path / "shared"
    shutil.copytree(world.checkpoints, shared)
    links = tmp_path / "links"
    (links / "run-a").mkdir(parents=True)
    for step in (2, 4):
        os.symlink(shared / f"run-a/checkpoint-{step}", links / f"run-a/checkpoint-{step}")
    os.symlink(shared / "untrained", links / "untrained")
    os.symlink(shared / "untrained", links / "same-again")  # a second link to one folder: scanned once
    os.symlink(links, links / "run-a" / "loop")  # a loop: terminates
    report = scan(links)
    assert [c.name for c in report.checkpoints] == ["run-a/checkpoint-2", "run-a/checkpoint-4", "same-again"]
    assert all(c.ok for c in report.checkpoints)
    assert by_name(report)["run-a/checkpoint-4"].weights_hash == by_name(scan(world.checkpoints))["run-a/checkpoint-4"].weights_hash


def test_torchtune_epoch_folders_get_a_step(world, tmp_path):
    for epoch in (0, 1, 10):
        shutil.copytree(world.checkpoints / "run-a/checkpoint-4", tmp_path / "tune-run" / f"epoch_{epoch}")
    report = scan(tmp_path)
    assert [(c.name, c.step) for c in report.checkpoints] == [
        ("tune-run/epoch_0", 0),
        ("tune-run/epoch_1", 1),
        ("tune-run/epoch_10", 10),
    ]


def test_adapter_beside_merged_full_weights_scores_the_adapter_and_says_so(world, tmp_path):
    """torchtune saves both into epoch_N/: the adapter and the merged model."""
    folder = tmp_path / "tune-run" / "epoch_0"
    shutil.copytree(world.checkpoints / "run-a/checkpoint-4", folder)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(world.base / f, folder / f)
    report = scan(tmp_path)
    (c,) = report.checkpoints
    assert (c.kind, c.ok, c.weight_files) == ("lora", True, ["adapter_model.safetensors"])
    assert any("tune-run/epoch_0: holds both a LoRA adapter and full (merged) weights; the adapter is scored" in w for w in report.warnings)


def test_base_named_by_a_path_on_the_training_machine(world, ckpt_copy):
    for path in ckpt_copy.rglob("adapter_config.json"):
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = "/home/trainer/models/base-7b"
        path.write_text(json.dumps(config))
    report = scan(ckpt_copy)
    assert all(c.ok for c in report.checkpoints)  # the weights are fine; only the base must be found
    assert any("'/home/trainer/models/base-7b', a path that does not exist on this machine" in w and "--base" in w for w in report.warnings)
    assert not any("base-7b" in w for w in scan(ckpt_copy, base=str(world.base)).warnings)
