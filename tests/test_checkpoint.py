"""Checkpoint files: atomic commit, what counts as complete, keep-last + best, RNG round trip."""

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from phonetune.data.errors import PhonetuneError
from phonetune.train import checkpoint as ckpt


class _TinySavable(torch.nn.Module):
    """Stands in for Wav2Vec2ForCTC: save_pretrained writes a file into the given folder."""

    def save_pretrained(self, path, safe_serialization=True, state_dict=None):
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
        ckpt.select_checkpoint(root / "step_200")
    assert ckpt.select_checkpoint(tmp_path, "latest").path == root / "step_100"
    done = ckpt.clean_interrupted_saves(tmp_path)
    assert done == ["removed step_300.tmp (an interrupted checkpoint write or deletion)"]
    assert not (root / "step_300.tmp").exists() and (root / "step_200").exists()
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


@pytest.mark.parametrize(
    ("text", "record"),
    [
        ("{not json", None),
        ("[1, 2]", None),
        ("\udcff", None),
        ('{"step": 10}', {"step": 10}),
        ('{"path": 3}', {"path": 3}),
    ],
)
def test_a_damaged_best_json_means_no_best_until_the_next_save(tmp_path, text, record):
    write(tmp_path, 10, 0.5)
    best = tmp_path / "checkpoints" / "best.json"
    best.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert ckpt.read_best(tmp_path) == record  # unreadable: None; readable, however odd: as is
    assert ckpt.find_best_checkpoint(tmp_path) is None
    assert ckpt.update_best(tmp_path) == {"step": 10, "eval_per": 0.5, "path": "step_10"}
    assert ckpt.find_best_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_10"


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


# --- killed at any point of a save ----------------------------------------------------------------
class Killed(BaseException):
    """Stands in for kill -9: raised in place of a file-system operation, caught by nothing."""


def save(run_dir, step, eval_per, keep_last=2):
    """A whole save as the training loop does it: write, commit, best.json, prune."""
    write(run_dir, step, eval_per)
    ckpt.update_best(run_dir)
    ckpt.prune_checkpoints(run_dir, keep_last)


class FileSystemFaults:
    """Counts the file-system operations of checkpoint code and kills the process at the n-th.

    A write is killed halfway (half its bytes on disk), a rename/delete/fsync/mkdir before it happens.
    """

    def __init__(self, monkeypatch, kill_at=None):
        self.count, self.kill_at = 0, kill_at
        real_save, real_write_text = torch.save, Path.write_text

        def tick():
            self.count += 1
            return self.count == self.kill_at

        def wrap(real):
            def operation(*args, **kwargs):
                if tick():
                    raise Killed
                return real(*args, **kwargs)

            return operation

        def half_save(obj, path, *args, **kwargs):
            if tick():
                buffer = io.BytesIO()
                real_save(obj, buffer)
                Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                raise Killed
            return real_save(obj, path, *args, **kwargs)

        def half_write_text(path, text, *args, **kwargs):
            if tick():
                real_write_text(path, text[: len(text) // 2], *args, **kwargs)
                raise Killed
            return real_write_text(path, text, *args, **kwargs)

        for name in ("replace", "rename", "unlink", "rmdir", "mkdir", "fsync"):
            monkeypatch.setattr(os, name, wrap(getattr(os, name)))
        monkeypatch.setattr(torch, "save", half_save)
        monkeypatch.setattr(Path, "write_text", half_write_text)


def assert_readable(checkpoint):
    """Every file of a checkpoint loads: what resume=auto would read."""
    assert ckpt.is_complete(checkpoint)
    state = ckpt.read_state(checkpoint)
    assert checkpoint.name == f"step_{state['step']}"
    assert json.loads((checkpoint / "vocab.json").read_text()) == {"<pad>": 0, "a": 1}
    assert (checkpoint / "config.yaml").read_text() == "train: {}\n"
    assert json.loads((checkpoint / "model" / "config.json").read_text()) == {}
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        assert ckpt.load_tensors(checkpoint, name) is not None
    return state


def disk_state(run_dir):
    root = run_dir / "checkpoints"
    return (
        sorted(p.name for p in root.iterdir()),
        json.loads((root / "best.json").read_text()),
        {step: ckpt.read_state(path)["eval_per"] for step, path in ckpt.list_checkpoints(run_dir)},
    )


# Before the save of step 40: 10 is the best (never pruned), 20 goes when 40 arrives (keep_last=2),
# a stale step_40.tmp is left from an earlier crash. "again": step 40 exists and is saved anew
# (resume=PATH from an older checkpoint), the two-rename replacement.
SCENARIOS = {
    "new step": ([(10, 0.5), (20, 0.7), (30, None)], (40, 0.6)),
    "same step again": ([(10, 0.5), (20, 0.7), (30, None), (40, 0.9)], (40, 0.6)),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_save_killed_at_any_point_leaves_a_complete_checkpoint(tmp_path, monkeypatch, scenario):
    import shutil

    before, (step, eval_per) = SCENARIOS[scenario]
    # fsync only matters after a power loss, which no test can cause; it stays a counted kill point.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    initial = tmp_path / "initial"
    for s, per in before:
        save(initial, s, per)
    stale = initial / "checkpoints" / f"step_{step}.tmp"
    stale.mkdir()
    (stale / "state.json").write_text("{")  # half a state.json from an earlier crash

    def finish(run_dir):
        """What the restarted run does: clean up, resume from the newest, save 40 (if lost) and 50."""
        ckpt.clean_interrupted_saves(run_dir)
        latest = ckpt.read_state(ckpt.find_latest_checkpoint(run_dir))
        if latest["step"] < step or latest["eval_per"] != eval_per:  # the save was lost: again
            save(run_dir, step, eval_per)
        save(run_dir, 50, None)

    reference = tmp_path / "reference"
    shutil.copytree(initial, reference)
    with monkeypatch.context() as patch:
        counter = FileSystemFaults(patch)
        save(reference, step, eval_per)
    operations = counter.count
    finish(reference)
    expected = disk_state(reference)
    assert expected[0] == ["best.json", "step_10", "step_40", "step_50"]
    assert operations > 30  # mkdir, every file write, fsyncs, renames, the deletions of prune

    for kill_at in range(1, operations + 1):
        run_dir = tmp_path / f"killed_at_{kill_at}"
        shutil.copytree(initial, run_dir)
        with monkeypatch.context() as patch, pytest.raises(Killed):
            FileSystemFaults(patch, kill_at)
            save(run_dir, step, eval_per)
        # resume=auto after the kill: the newest complete checkpoint is the new one or the newest
        # before it (never older), whole and loadable; best.json names a complete checkpoint.
        ckpt.clean_interrupted_saves(run_dir)
        assert not list((run_dir / "checkpoints").glob("*.tmp")), kill_at
        latest = ckpt.find_latest_checkpoint(run_dir)
        assert latest is not None and latest.name in (f"step_{before[-1][0]}", f"step_{step}"), (
            kill_at
        )
        for _, path in ckpt.list_checkpoints(run_dir):
            assert_readable(path)
        assert ckpt.find_best_checkpoint(run_dir) == run_dir / "checkpoints" / "step_10", kill_at
        finish(run_dir)
        assert disk_state(run_dir) == expected, kill_at


def test_a_failed_write_explains_itself_and_keeps_the_earlier_checkpoints(tmp_path):
    import errno

    write(tmp_path, 10, 0.5)
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "optimizer.pt"))
    message = ckpt.explain_save_failure(tmp_path, 20, full)
    assert "could not save checkpoint step_20" in message and "No space left on device" in message
    assert "earlier ones are intact (newest complete: " in message and "step_10" in message
    assert "Free space on that disk (the newest takes 0.00 GB)" in message
    assert "train.keep_last" in message and "resume=auto" in message
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path))
    assert "writable for the user" in ckpt.explain_save_failure(tmp_path, 20, denied)
    # committed, but best.json could not be written
    write(tmp_path, 20, 0.4)
    assert "step_20 itself was saved completely" in ckpt.explain_save_failure(tmp_path, 20, full)
