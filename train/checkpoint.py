"""A run directory and its checkpoints on disk: the layout, atomic writes, and the one way to
choose and read a checkpoint (training's `resume`, `export`, `evaluate` and `transcribe` all choose
by the same words: latest, best, step N, or a checkpoint's path).

Layout (the export and inference stages rely on it):

    RUN_DIR/config.yaml       the resolved training config
    RUN_DIR/metrics.jsonl     one JSON object per logged step and per evaluation
    RUN_DIR/checkpoints/step_<n>/
        model/            Wav2Vec2ForCTC.save_pretrained (config.json + model.safetensors)
        vocab.json        token -> id the model was trained with
        config.yaml       the resolved training config
        state.json        step, epoch, sampler position and a digest of the epoch's batches,
                          eval_per (or null), versions, counters
        optimizer.pt      the whole optimizer state, keyed by parameter name (any launcher resumes it)
        scheduler.pt, scaler.pt (fp16 only), rng_state_<rank>.pt
        adapter.safetensors   model.adapter runs only: the trained LoRA and output-layer tensors
                              (model/ holds the merged weights; see train/adapter.py)
    RUN_DIR/checkpoints/best.json   {"step", "eval_per", "path": "step_<n>"}

A checkpoint is written into `step_<n>.tmp/`, every file is fsynced, and the directory is renamed to
`step_<n>/` only then: a directory named `step_<n>` that holds `state.json` is complete; anything else
(`.tmp` directories, a directory without state.json) is ignored. `.pt` files hold tensors and plain
containers only and are always read with `torch.load(..., weights_only=True)`; weights are read from
safetensors only.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError

from phonetune.data.errors import PhonetuneError
from phonetune.data.files import read_json, read_yaml
from phonetune.data.vocab import VOCAB_FILE, load_vocab

CONFIG_FILE = "config.yaml"  # in the run directory and in each checkpoint
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
BEST_FILE = "best.json"
STATE_FILE = "state.json"
MODEL_DIR = "model"
ADAPTER_FILE = "adapter.safetensors"  # LoRA runs (train/adapter.py): the trained tensors, to resume
_STEP_DIR = re.compile(r"^step_(\d+)$")
# A config.json of the right shape whose values build no model (a size that is a string, a
# negative count, a bool where an int belongs): transformers (its strict config fields) and torch
# fail deep inside, with one of these.
BUILD_ERRORS = (
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    RuntimeError,
    ArithmeticError,
    StrictDataclassError,
)
DAMAGED_CHECKPOINT = "The checkpoint is damaged; use another one (resume=PATH, --step N)."
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


def find_damage(path: Path) -> str | None:
    """What makes a complete checkpoint unloadable, found cheaply (no tensor is read), or None.

    A file cut short or overwritten shows in its header or index: state.json, vocab.json and the
    model's config.json must parse, model.safetensors' header must cover the file (safetensors
    checks the offsets against the size), and each .pt file is a zip archive whose directory,
    at its end, must be readable (`torch.save`'s format).
    """
    import zipfile

    from safetensors import SafetensorError, safe_open

    try:
        read_state(path)
        load_vocab(path / VOCAB_FILE)
        read_json(path / MODEL_DIR / "config.json", dict)
    except PhonetuneError as error:
        return str(error)
    # (checkpoints hold safetensors only: another weights file there is foreign, never read)
    weight_files = [path / MODEL_DIR / "model.safetensors"]
    if (path / ADAPTER_FILE).exists():  # an adapter run's (train/adapter.py)
        weight_files.append(path / ADAPTER_FILE)
    for weights in weight_files:
        if not weights.is_file():
            return f"{weights} is missing"
        try:
            with safe_open(weights, framework="pt"):
                pass
        except (OSError, SafetensorError) as error:
            return f"{weights} is damaged ({str(error).strip() or type(error).__name__})"
    for archive in sorted(path.glob("*.pt")):
        try:
            with zipfile.ZipFile(archive) as opened:
                opened.namelist()
        except (OSError, zipfile.BadZipFile) as error:
            return f"{archive} is damaged ({error})"
    return None


def find_loadable_checkpoint(run_dir: str | Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of a run that is not damaged (see `find_damage`), or None if the run
    has none. Each damaged newer one is reported through `say`; a run whose checkpoints are all
    damaged is an error."""
    checkpoints = list_checkpoints(run_dir)
    damage = []
    for _, path in reversed(checkpoints):
        problem = find_damage(path)
        if problem is None:
            return path
        damage.append(problem)
        say(
            f"warning: {path.name} cannot be loaded ({problem}); trying the checkpoint before it. "
            "The damaged one is replaced when training reaches its step again."
        )
    if checkpoints:
        raise PhonetuneError(
            f"no checkpoint of {run_dir} can be loaded (all {len(checkpoints)} are damaged, "
            f"newest: {damage[0]}). Start a new run (another run.output_dir)."
        )
    return None


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """best.json's record ({"step", "eval_per", "path"}), or None if there is none yet or it is
    damaged: it is derived again from the checkpoints at the next save."""
    best = checkpoints_dir(run_dir) / BEST_FILE
    if not best.is_file():
        return None
    try:
        return read_json(best, dict)
    except PhonetuneError:
        return None


def find_best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the lowest eval PER (from best.json), or None if there is none."""
    best = read_best(run_dir)
    if best is None or not isinstance(best.get("path"), str):
        return None
    path = checkpoints_dir(run_dir) / best["path"]
    return path if is_complete(path) else None


# --- choosing and reading -------------------------------------------------------------------------
SELECTIONS = "latest, best, step N (or step_N), or the path of a checkpoints/step_<n> folder"


@dataclass(frozen=True)
class Checkpoint:
    """One complete `checkpoints/step_<n>/` folder written by `phonetune train`."""

    path: Path
    step: int
    state: dict

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def vocab_path(self) -> Path:
        return self.path / VOCAB_FILE

    @property
    def run_dir(self) -> Path | None:
        """The run folder holding `checkpoints/` (None for a step folder copied elsewhere)."""
        parent = self.path.parent
        return parent.parent if parent.name == CHECKPOINTS_DIR else None

    def read_vocab(self) -> dict[str, int]:
        return load_vocab(self.vocab_path)

    def prepared_dir(self) -> Path | None:
        """The prepared dataset the checkpoint was trained on, if it is still where the config says
        (as written, or relative to the run folder)."""
        from phonetune.data.prepared import is_prepared

        configured = self._data_setting("prepared_dir")
        if not isinstance(configured, str) or not configured:
            return None
        candidates = [Path(configured)]
        if self.run_dir is not None and not Path(configured).is_absolute():
            candidates.append(self.run_dir / configured)
        return next((c for c in candidates if is_prepared(c)), None)

    def train_locales(self) -> list[str] | None:
        """The locales the model was trained on: the config's `data.locales`, else those with
        audio in the training split of the prepared dataset; None when neither can be read."""
        from phonetune.data.prepared import read_report, split_hours_per_locale

        locales = self._data_setting("locales")
        if isinstance(locales, list):
            return sorted(str(locale) for locale in locales)
        prepared = self.prepared_dir()
        if prepared is None:
            return None
        hours = split_hours_per_locale(read_report(prepared), self.train_split())
        return sorted(locale for locale, h in hours.items() if h > 0) or None

    def train_split(self) -> str:
        return str(self._data_setting("train_split") or "train")

    def _data_setting(self, key: str) -> Any:
        data = self.training_config().get("data")
        return data.get(key) if isinstance(data, dict) else None

    def training_config(self) -> dict:
        """The resolved training config (the checkpoint's, else the run's), {} if neither is readable."""
        for folder in (self.path, self.run_dir):
            path = None if folder is None else folder / CONFIG_FILE
            if path is not None and path.is_file():
                try:
                    return read_yaml(path, dict)
                except PhonetuneError:  # it only describes the data: the run's copy, or nothing
                    continue
        return {}


def parse_selection(which: str | int) -> str | int:
    """ "latest", "best", a step number (from "step N", "step_N", "N" or an int), or else a path."""
    if isinstance(which, int):
        return which
    text = which.strip()
    if text in ("latest", "best"):
        return text
    match = re.fullmatch(r"(?:step[ _])?(\d+)", text)
    return int(match.group(1)) if match else text


def select_checkpoint(source: str | Path, which: str | int = "latest") -> Checkpoint:
    """One complete checkpoint: of the run folder `source`, the one `which` names (latest, best,
    step N), or `source` itself when it is a checkpoint folder. A clear error names what exists."""
    source = Path(source)
    selection = parse_selection(which)
    if not isinstance(selection, int) and selection not in ("latest", "best"):
        raise PhonetuneError(f"cannot choose a checkpoint by {which!r}: say {SELECTIONS}")
    if not source.exists():
        raise PhonetuneError(f"{source} does not exist: give a run folder or a checkpoint folder")
    if source.name.startswith("step_") or (source / STATE_FILE).exists():
        if selection != "latest":
            raise PhonetuneError(
                f"{source} is one checkpoint; best and step N choose among a run's checkpoints: "
                f"give the run folder ({source.parent.parent}) instead"
            )
        return read_checkpoint(source)
    run_dir = source.parent if source.name == CHECKPOINTS_DIR else source
    available = dict(list_checkpoints(run_dir))
    if not available:
        root = checkpoints_dir(run_dir)
        incomplete = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
        hint = f" (only interrupted saves: {', '.join(incomplete)})" if incomplete else ""
        raise PhonetuneError(
            f"no complete checkpoint in {source}{hint}: expected {root}/step_<n>/ folders "
            "written by `phonetune train`"
        )
    steps = ", ".join(str(s) for s in sorted(available))
    if isinstance(selection, int):
        if selection not in available:
            raise PhonetuneError(
                f"{run_dir} has no complete checkpoint for step {selection}; available steps: {steps}"
            )
        return read_checkpoint(available[selection])
    if selection == "best":
        chosen = find_best_checkpoint(run_dir)
        if chosen is None:
            best_file = checkpoints_dir(run_dir) / BEST_FILE
            reason = (
                f"{best_file} names no complete checkpoint"
                if best_file.is_file()
                else f"{best_file} does not exist (the run never evaluated on a dev set)"
            )
            raise PhonetuneError(
                f"best: {reason}; available steps: {steps} (choose one with --step N, or "
                "resume=step_N when training)"
            )
        return read_checkpoint(chosen)
    return read_checkpoint(available[max(available)])


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A complete checkpoint folder with its state; a clear error for anything else."""
    path = Path(path)
    if not is_complete(path):
        raise PhonetuneError(
            f"{path} is not a complete checkpoint: a save that finished is a folder named "
            f"step_<n> holding {STATE_FILE} (an interrupted one is step_<n>.tmp or lacks it)"
        )
    for needed in (path / VOCAB_FILE, path / MODEL_DIR / "config.json"):
        if not needed.is_file():
            raise PhonetuneError(f"checkpoint {path} has no {needed.relative_to(path)}")
    state = read_state(path)
    step = state.get("step")
    if not isinstance(step, int):
        raise PhonetuneError(f"{path / STATE_FILE} has no integer step: the file is damaged")
    return Checkpoint(path=path, step=step, state=state)


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """state.json of a checkpoint; a damaged one is a clear error naming it."""
    return read_json(Path(checkpoint) / STATE_FILE, dict, DAMAGED_CHECKPOINT)


def read_checkpoint_vocab(checkpoint: str | Path) -> dict[str, int]:
    return load_vocab(Path(checkpoint) / VOCAB_FILE)


def load_tensors(checkpoint: str | Path, name: str) -> Any:
    """A `.pt` file of the checkpoint (tensors and plain containers only), or None if absent."""
    path = Path(checkpoint) / name
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
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


def load_pretrained(source: str | Path, **kwargs: Any) -> Any:
    """Wav2Vec2ForCTC.from_pretrained (its return value), weights that cannot be read a PhonetuneError.

    model.safetensors is preferred; a pytorch_model.bin is read with `weights_only=True`, so a
    pickle that would run code is refused, never executed.
    """
    from safetensors import SafetensorError
    from transformers import Wav2Vec2ForCTC

    folder = Path(source)
    if (folder / "config.json").is_file():  # a local folder: its config must be a JSON object
        read_json(
            folder / "config.json",
            dict,
            "A model folder's config.json is written by save_pretrained.",
        )
    try:
        return Wav2Vec2ForCTC.from_pretrained(source, weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False: exactly what must not be done here.
        problem = (
            "its pytorch_model.bin holds objects other than tensors "
            "(refused: loading them could run code)"
        )
    except (OSError, ValueError, SafetensorError) as error:
        problem = (str(error).strip().splitlines() or [repr(error)])[0].rstrip(".")
        if isinstance(error, SafetensorError) and (folder / "model.safetensors").is_file():
            problem = f"{folder / 'model.safetensors'} is damaged ({problem})"
    except BUILD_ERRORS as error:
        if not (folder / "config.json").is_file():
            raise
        problem = (
            f"{folder / 'config.json'} holds values no model can be built from "
            f"({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"
        )
    raise PhonetuneError(
        f"cannot load the model weights of {source}: {problem}. A model folder needs config.json "
        "and model.safetensors (or a pytorch_model.bin holding tensors only)."
    )


def load_model_folder(folder: str | Path, *, safetensors_only: bool = False) -> Any:
    """A Wav2Vec2ForCTC in float32 and eval mode, failing on any weight that was not in the files.

    `safetensors_only` for folders phonetune wrote (checkpoints): any other weights file there
    is foreign and never read. Elsewhere a pytorch_model.bin is read with weights_only=True.
    """
    model, info = load_pretrained(
        str(folder),
        dtype=torch.float32,
        output_loading_info=True,
        use_safetensors=True if safetensors_only else None,
    )
    missing = list(info.get("missing_keys", []))
    if missing:
        raise PhonetuneError(
            f"{folder}: weights missing from the saved model (they would be random): "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return model.eval()


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


def write_rng_state(tmp: Path, rank: int, model: Mapping[str, Any] | None = None) -> None:
    """This process's generators: Python, NumPy, torch, and the model's own (`model`: masks and
    LayerDrop, see train/model.py's CTCModel.random_state)."""
    state = capture_rng_state()
    if model is not None:
        state["model"] = dict(model)
    torch.save(state, tmp / f"rng_state_{rank}.pt")


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
        try:
            eval_per = read_state(path).get("eval_per")
        except PhonetuneError:  # a damaged state.json: that checkpoint cannot be the best
            continue
        if isinstance(eval_per, int | float):
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
