"""Checkpoints on disk: atomic writes, finding the latest complete one, keep-last, best, loading.

Layout (the export stage relies on it):

    RUN_DIR/checkpoints/step_<n>/
        model/            Wav2Vec2ForCTC.save_pretrained (config.json + model.safetensors)
        vocab.json        token -> id the model was trained with
        config.yaml       the resolved training config
        state.json        step, epoch, sampler position, eval_per (or null), versions, counters
        optimizer.pt      the whole optimizer state, keyed by parameter name (any launcher resumes it)
        scheduler.pt, scaler.pt (fp16 only), rng_state_<rank>.pt
    RUN_DIR/checkpoints/best.json   {"step", "eval_per", "path": "step_<n>"}

A checkpoint is written into `step_<n>.tmp/`, every file is fsynced, and the directory is renamed to
`step_<n>/` only then: a directory named `step_<n>` that holds `state.json` is complete; anything else
(`.tmp` directories, a directory without state.json) is ignored. `.pt` files hold tensors and plain
containers only and are always read with `torch.load(..., weights_only=True)`.

Killed at any moment (kill -9, power loss after the fsyncs), a run leaves complete checkpoints and
at most some `*.tmp` leftovers, which `clean_interrupted_saves` removes at the next start: a
half-written `step_<n>.tmp`, a checkpoint being pruned (`step_<n>.deleting.tmp`, renamed before it
is deleted), and a checkpoint being replaced by a new save of the same step
(`step_<n>.replaced.tmp`, put back if the new one had not taken its name yet). best.json is derived
from the checkpoints on disk at every save, so one written late is never wrong for long, and one
pointing at a missing checkpoint is ignored.
"""

from __future__ import annotations

import errno
import json
import os
import pickle  # only for its error type: .pt files are read weights_only
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
_REPLACED = ".replaced.tmp"  # suffix of a checkpoint being replaced by a new save of its step


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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        # Not what phonetune wrote: a pickle of other objects (refused, never run), or a damaged file.
        kind = (
            "objects other than tensors"
            if isinstance(error, pickle.UnpicklingError)
            else "a damaged file"
        )
        raise PhonetuneError(
            f"{path} holds {kind}, not the tensors phonetune saves there, so it was not loaded. "
            "Resume from another checkpoint (resume=PATH) or start a new run."
        ) from None


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
    if not tmp.parent.is_dir():
        tmp.parent.mkdir(parents=True)
        _fsync_dir(tmp.parent.parent)  # the new checkpoints/ entry survives a power loss
    tmp.mkdir()
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
    model_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Everything but the per-process RNG files. `state.json` last: it marks completeness.

    `model_state`: the whole weights when `model`'s own parameters are shards (FSDP).
    """
    _save_quietly(model, tmp / MODEL_DIR, model_state)
    write_json(tmp / VOCAB_FILE, dict(vocab))
    (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    torch.save(dict(optimizer_state), tmp / "optimizer.pt")
    torch.save(dict(scheduler_state), tmp / "scheduler.pt")
    if scaler_state:
        torch.save(dict(scaler_state), tmp / "scaler.pt")
    write_json(tmp / STATE_FILE, dict(state))


def _save_quietly(
    model: torch.nn.Module, path: Path, state_dict: Mapping[str, torch.Tensor] | None
) -> None:
    """save_pretrained without its per-shard progress bar (it would break the training bar)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # config.json records the dtype of the model object, which under DeepSpeed bf16 is bf16 while
    # `state_dict` holds its fp32 masters: from_pretrained would then load them in bf16. (Read first:
    # save_pretrained empties the dict it is given.)
    dtype = next((t.dtype for t in (state_dict or {}).values() if t.is_floating_point()), None)
    try:
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
        if dtype is not None and dtype != model.dtype:
            model.config.dtype = str(dtype).removeprefix("torch.")
            model.config.save_pretrained(path)
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
    if final.exists():  # the same step written again (resume=PATH from an older checkpoint)
        # Two renames: killed between them, clean_interrupted_saves gives the old one its name back.
        old = final.with_name(final.name + _REPLACED)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def clean_interrupted_saves(run_dir: str | Path) -> list[str]:
    """Undo what a killed save left behind; returns one line per thing done (for the log).

    Run at start-up by the main process, holding the run's lock, before anyone looks for the
    checkpoint to resume from. A `step_<n>.replaced.tmp` whose `step_<n>` is missing is the complete
    old checkpoint of a replacement killed between its two renames: it gets its name back. Every other
    `*.tmp` is a write or a deletion that did not finish, and is removed.
    """
    root = checkpoints_dir(run_dir)
    done: list[str] = []
    if not root.is_dir():
        return done
    for path in sorted(root.glob("*" + _REPLACED)):
        final = path.with_name(path.name.removesuffix(_REPLACED))
        complete = _STEP_DIR.match(final.name) and (path / STATE_FILE).is_file()
        if complete and not final.exists():
            os.replace(path, final)
            done.append(f"restored {final.name} (its replacement by a new save was interrupted)")
    for path in sorted(root.glob("*.tmp")):
        if path.is_dir():
            shutil.rmtree(path)
            done.append(f"removed {path.name} (an interrupted checkpoint write or deletion)")
        else:  # best.json.tmp: best.json itself is whole (replaced by rename)
            path.unlink()
    if done:
        _fsync_dir(root)
    return done


def discard_checkpoint_write(run_dir: str | Path, step: int) -> None:
    """Remove the `.tmp` of a save that failed (best effort: it is ignored anyway), freeing its space."""
    tmp = checkpoints_dir(run_dir) / (step_dir_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)


def explain_save_failure(run_dir: str | Path, step: int, error: OSError) -> str:
    """A user-facing paragraph: what failed, that older checkpoints are intact, what to do."""
    where = f" ({error.filename})" if error.filename else ""
    latest = find_latest_checkpoint(run_dir)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        size = f" (the newest takes {_size_of(latest) / 1e9:.2f} GB)" if latest else ""
        advice = (
            f"Free space on that disk{size}, or keep fewer checkpoints (train.keep_last), "
            "then continue with resume=auto."
        )
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = (
            f"Make {checkpoints_dir(run_dir)} writable for the user running the training, "
            "then continue with resume=auto."
        )
    else:
        advice = "Fix the cause, then continue with resume=auto."
    name = step_dir_name(step)
    if latest is not None and latest.name == name:  # committed; best.json or pruning failed after
        outcome = f"{name} itself was saved completely, but updating {BEST_FILE} or pruning failed"
    else:
        outcome = (
            f"nothing of {name} counts as a checkpoint and the earlier ones are intact "
            f"(newest complete: {latest or 'none'})"
        )
    return (
        f"could not save checkpoint {name} in {checkpoints_dir(run_dir)}: "
        f"{error.strerror or error}{where}; {outcome}. {advice}"
    )


def _size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
    _fsync_dir(best_file.parent)
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
