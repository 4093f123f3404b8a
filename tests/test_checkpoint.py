"""Checkpoint files: atomic commit, what counts as complete, keep-last + best, RNG round trip."""

import json
import random

import numpy as np
import pytest
import torch

from data.errors import PhonetuneError
from train import checkpoint as ckpt


class _TinySavable(torch.nn.Module):
    """Stands in for Wav2Vec2ForCTC: save_pretrained writes a file into the given folder."""

    def save_pretrained(self, path, safe_serialization=True):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")


def write(run_dir, step, eval_per=None):
    tmp = ckpt.begin_checkpoint(run_dir, step)
    ckpt.write_rng_state(tmp, 0)
    ckpt.write_checkpoint_files(
        tmp,
        _TinySavable(),
        {"<pad>": 0, "a": 1},
        "train: {}\n",
        {"step": step, "epoch": 0, "eval_per": eval_per},
        {"state": {}, "param_groups": []},
        {"last_epoch": step},
    )
    return ckpt.commit_checkpoint(tmp)


def test_commit_renames_a_complete_directory(tmp_path):
    final = write(tmp_path, 10, 0.5)
    assert final == tmp_path / "checkpoints" / "step_10"
    assert not (tmp_path / "checkpoints" / "step_10.tmp").exists()
    assert sorted(p.name for p in final.iterdir()) == [
        "config.yaml",
        "model",
        "optimizer.pt",
        "rng_state_0.pt",
        "scheduler.pt",
        "state.json",
        "vocab.json",
    ]
    assert json.loads((final / "state.json").read_text())["step"] == 10
    assert ckpt.load_tensors(final, "scheduler.pt") == {"last_epoch": 10}
    assert ckpt.load_tensors(final, "scaler.pt") is None
    # writing the same step again replaces it whole
    again = write(tmp_path, 10, 0.25)
    assert ckpt.read_state(again)["eval_per"] == 0.25
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_10"]


def test_incomplete_checkpoints_are_ignored(tmp_path):
    write(tmp_path, 100)
    root = tmp_path / "checkpoints"
    (root / "step_300.tmp").mkdir()  # interrupted while writing
    (root / "step_300.tmp" / "state.json").write_text("{}")
    (root / "step_200").mkdir()  # renamed by hand / half-copied: no state.json
    (root / "step_200" / "optimizer.pt").write_bytes(b"")
    (root / "notes").mkdir()
    assert ckpt.find_latest_checkpoint(tmp_path) == root / "step_100"
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [100]
    with pytest.raises(PhonetuneError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path, str(root / "step_200"))
    assert ckpt.resolve_checkpoint(tmp_path, "latest") == root / "step_100"
    removed = ckpt.remove_stale_tmp(tmp_path)
    assert [p.name for p in removed] == ["step_300.tmp"]
    assert ckpt.find_latest_checkpoint(tmp_path / "elsewhere") is None


def test_keep_last_keeps_the_best_too(tmp_path):
    pers = {10: 0.9, 20: 0.4, 30: 0.6, 40: None, 50: 0.7}
    for step, per in pers.items():
        write(tmp_path, step, per)
        best = ckpt.update_best(tmp_path)
        ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert best == {"step": 20, "eval_per": 0.4, "path": "step_20"}
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text()) == best
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [20, 40, 50]
    assert ckpt.find_best_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_20"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_best_is_none_without_evaluations(tmp_path):
    write(tmp_path, 5)
    assert ckpt.update_best(tmp_path) is None
    assert ckpt.find_best_checkpoint(tmp_path) is None


def test_rng_state_round_trips_through_weights_only_files(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.save(ckpt.capture_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
