"""Checkpoints on disk: atomic writes, finding the latest complete one, keep-last, best, loading.

Layout (the export stage relies on it):

    RUN_DIR/checkpoints/step_<n>/
        model/            Wav2Vec2ForCTC.save_pretrained (config.json + model.safetensors)
        vocab.json        token -> id the model was trained with
        config.yaml       the resolved training config
        state.json        step, epoch, sampler position, eval_per (or null), versions, counters
        optimizer.pt, scheduler.pt, scaler.pt (fp16 only), rng_state_<rank>.pt
    RUN_DIR/checkpoints/best.json   {"step", "eval_per", "path": "step_<n>"}

A checkpoint is written into `step_<n>.tmp/`, every file is fsynced, and the directory is renamed to
`step_<n>/` only then: a directory named `step_<n>` that holds `state.json` is complete; anything else
(`.tmp` directories, a directory without state.json) is ignored. `.pt` files hold tensors and plain
containers only and are always read with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.errors import PhonetuneError

CHECKPOINTS_DIR = "checkpoints"
BEST_FILE = "best.json"
STATE_FILE = "state.json"
MODEL_DIR = "model"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step}"


# --- finding ----------------------------------------------------------------------------------
def is_complete(path: str | Path) -> bool:
    """A complete checkpoint: named step_<n> (no .tmp suffix) and holding state.json."""
    path = Path(path)
    return bool(_STEP_DIR.match(path.name)) and (path / STATE_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def find_best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the lowest eval PER (from best.json), or None if there is none."""
    best = checkpoints_dir(run_dir) / BEST_FILE
    if not best.is_file():
        return None
    path = checkpoints_dir(run_dir) / json.loads(best.read_text(encoding="utf-8"))["path"]
    return path if is_complete(path) else None


def resolve_checkpoint(run_dir: str | Path, which: str) -> Path | None:
    """`which` = "latest", "best" or a path -> a complete checkpoint directory (None if none exists)."""
    if which == "latest":
        return find_latest_checkpoint(run_dir)
    if which == "best":
        return find_best_checkpoint(run_dir)
    path = Path(which)
    if not is_complete(path):
        raise PhonetuneError(
            f"{path} is not a complete checkpoint (a directory step_<n> holding {STATE_FILE}); "
            f"complete checkpoints of this run: {', '.join(p.name for _, p in list_checkpoints(run_dir)) or 'none'}"
        )
    return path


# --- reading ----------------------------------------------------------------------------------
def read_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))


def read_checkpoint_vocab(checkpoint: str | Path) -> dict[str, int]:
    from data.vocab import load_vocab

    return load_vocab(Path(checkpoint) / VOCAB_FILE)


def load_tensors(checkpoint: str | Path, name: str) -> Any:
    """A `.pt` file of the checkpoint (tensors and plain containers only), or None if absent."""
    path = Path(checkpoint) / name
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# --- RNG state ----------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) generator states as tensors and plain containers."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing ----------------------------------------------------------------------------------
def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Create an empty `step_<n>.tmp/` to write into (removing a stale one from a crash)."""
    tmp = checkpoints_dir(run_dir) / (step_dir_name(step) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_rng_state(tmp: Path, rank: int) -> None:
    torch.save(capture_rng_state(), tmp / f"rng_state_{rank}.pt")


def write_checkpoint_files(
    tmp: Path,
    model: torch.nn.Module,
    vocab: Mapping[str, int],
    config_yaml: str,
    state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    scaler_state: Mapping[str, Any] | None = None,
) -> None:
    """Everything but the per-process RNG files. `state.json` last: it marks completeness."""
    _save_quietly(model, tmp / MODEL_DIR)
    write_json(tmp / VOCAB_FILE, dict(vocab))
    (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    torch.save(dict(optimizer_state), tmp / "optimizer.pt")
    torch.save(dict(scheduler_state), tmp / "scheduler.pt")
    if scaler_state:
        torch.save(dict(scaler_state), tmp / "scaler.pt")
    write_json(tmp / STATE_FILE, dict(state))


def _save_quietly(model: torch.nn.Module, path: Path) -> None:
    """save_pretrained without its per-shard progress bar (it would break the training bar)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(Path(directory) / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_checkpoint(tmp: Path) -> Path:
    """fsync the temporary directory and rename it to its final name (atomic on POSIX)."""
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    _fsync_tree(tmp)
    if final.exists():  # the same step written again (e.g. resumed then stopped at that step)
        old = final.with_name(final.name + ".replaced.tmp")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def remove_stale_tmp(run_dir: str | Path) -> list[Path]:
    """Delete `.tmp` directories left by an interrupted save; returns what was removed."""
    root = checkpoints_dir(run_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.endswith(".tmp"):
                shutil.rmtree(path)
                removed.append(path)
    return removed


# --- best and keep-last ---------------------------------------------------------------------------
def update_best(run_dir: str | Path) -> dict[str, Any] | None:
    """Rewrite best.json from the checkpoints on disk: the lowest eval_per (earliest on ties).

    The best checkpoint is never pruned, so the minimum over the checkpoints present is the best
    ever written; deriving it (rather than updating it) keeps best.json right after any crash.
    """
    candidates = []
    for step, path in list_checkpoints(run_dir):
        eval_per = read_state(path).get("eval_per")
        if eval_per is not None:
            candidates.append((eval_per, step, path))
    best_file = checkpoints_dir(run_dir) / BEST_FILE
    if not candidates:
        return None
    eval_per, step, path = min(candidates)
    best = {"step": step, "eval_per": eval_per, "path": path.name}
    tmp = best_file.with_name(BEST_FILE + ".tmp")
    write_json(tmp, best)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, best_file)
    return best


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, never the best; returns the deleted."""
    checkpoints = list_checkpoints(run_dir)
    best = find_best_checkpoint(run_dir)
    deleted = []
    for _, path in checkpoints[: max(len(checkpoints) - keep_last, 0)]:
        if best is not None and path.resolve() == best.resolve():
            continue
        # Rename first so that a crash mid-delete leaves an ignored directory, not a broken checkpoint.
        doomed = path.with_name(path.name + ".deleting.tmp")
        os.replace(path, doomed)
        shutil.rmtree(doomed)
        deleted.append(path)
    return deleted
