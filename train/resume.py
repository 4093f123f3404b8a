"""Saving a run and resuming it: everything a checkpoint must hold to continue as if nothing
happened (weights, optimizer, scheduler, scaler, sampler position, counters, every process's RNG
state), and the whole path of a save, from the temporary folder to best.json and pruning.

A save is collective: every process adds its RNG state and joins the gathering of sharded
weights. If a write fails on any process (disk full, permission denied), every process raises a
PhonetuneError together (rather than leaving the others waiting in a barrier); the part written is
removed and the earlier checkpoints stay as they were. The file format is train/checkpoint.py's.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from phonetune.data.errors import PhonetuneError
from phonetune.data.files import read_json, read_yaml
from phonetune.train import adapter
from phonetune.train import checkpoint as ckpt
from phonetune.train.config import Config, config_differences, config_to_dict, dump_config
from phonetune.train.model import architecture_differences, expected_architecture

if TYPE_CHECKING:
    from phonetune.train.batching import DurationBatchSampler
    from phonetune.train.loop import Run
    from phonetune.train.parallel import Parallel

Say = Callable[[str], None]


@dataclass
class TrainState:
    """What a checkpoint's state.json records about the progress of training."""

    step: int = 0  # optimizer steps taken (including skipped non-finite ones)
    epoch: int = 0  # current epoch of the sampler
    position: int = 0  # batches of this epoch already consumed by each process
    skipped_steps: int = 0  # steps whose gradient was NaN/inf (no update)
    consecutive_nonfinite: int = 0
    ctc_infeasible: int = 0  # clips whose CTC loss was infinite (too few frames for the phones)
    audio_seconds: float = 0.0  # audio trained on, all processes
    eval_per: float | None = None  # dev PER of the evaluation at `eval_step`
    eval_step: int | None = None
    # running sums since the last training line of metrics.jsonl (so a resumed run logs the same)
    interval_loss: float = 0.0
    interval_steps: int = 0
    interval_audio: float = 0.0
    interval_padded: float = 0.0
    interval_locale_seconds: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int, module: torch.nn.Module | None = None) -> None:
    """Python's, NumPy's and torch's generators, and those of the training wrapper `module`
    (a CTCModel: SpecAugment masks, LayerDrop)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if module is not None:
        module.seed_random(seed)


# --- which checkpoint to continue from ---------------------------------------------------------------
def find_resume_checkpoint(config: Config, run_dir: Path, say: Say) -> Path | None:
    """The checkpoint to continue from (None = start fresh), per `resume`: none, auto, or a
    checkpoint chosen as everywhere else (latest, best, step N, a path)."""
    if config.resume == "none":
        existing = ckpt.list_checkpoints(run_dir)
        if existing:
            raise PhonetuneError(
                f"{run_dir} already holds checkpoints (newest: {existing[-1][1].name}). Pass resume=auto to "
                "continue from the newest, resume=PATH for a given one, or choose another run.output_dir."
            )
        return None
    if config.resume == "auto":
        return ckpt.find_loadable_checkpoint(run_dir, say)
    selection = ckpt.parse_selection(config.resume)
    if isinstance(selection, int) or selection in ("latest", "best"):
        checkpoint = ckpt.select_checkpoint(run_dir, selection)
    else:  # the path of a checkpoint folder
        checkpoint = ckpt.read_checkpoint(selection)
    newer = [path.name for s, path in ckpt.list_checkpoints(run_dir) if s > checkpoint.step]
    if newer:
        warnings.warn(
            f"resuming from step {checkpoint.step} while {run_dir} holds later checkpoints "
            f"({', '.join(newer)}): they are replaced as training reaches their steps",
            stacklevel=2,
        )
    return checkpoint.path


def check_resume_compatible(
    config: Config, checkpoint: Path, vocab: dict[str, int], say: Say
) -> None:
    """A different vocabulary or model is an error; other differences are reported as warnings."""
    saved_vocab = ckpt.read_checkpoint_vocab(checkpoint)
    if saved_vocab != vocab:
        only_old = sorted(set(saved_vocab) - set(vocab))[:10]
        only_new = sorted(set(vocab) - set(saved_vocab))[:10]
        raise PhonetuneError(
            f"cannot resume from {checkpoint}: it was trained with another vocabulary "
            f"({len(saved_vocab)} tokens vs {len(vocab)} in {config.data.prepared_dir}/vocab.json; "
            f"only in the checkpoint: {' '.join(only_old) or '-'}; only in the data: {' '.join(only_new) or '-'}"
            f"{'; same tokens, different ids' if not only_old and not only_new else ''}). "
            "Resume with the prepared data it was trained on, or start a new run."
        )
    saved_model = read_json(
        checkpoint / ckpt.MODEL_DIR / "config.json", dict, ckpt.DAMAGED_CHECKPOINT
    )
    expected = expected_architecture(config.model, len(vocab))
    if expected is None:
        say(
            f"warning: could not read {config.model.name_or_path}'s config to check it matches {checkpoint}"
        )
    else:
        differences = architecture_differences(saved_model, expected)
        if differences:
            raise PhonetuneError(
                f"cannot resume from {checkpoint}: the configured model differs from the checkpoint's "
                f"({'; '.join(differences)}). Resume with the model settings it was trained with."
            )
    saved_config_file = checkpoint / ckpt.CONFIG_FILE
    if saved_config_file.is_file():
        try:
            saved = read_yaml(saved_config_file, dict)
        except PhonetuneError as error:  # a record of the settings only: the run can go on
            say(f"warning: the settings cannot be compared with the checkpoint's: {error}")
            return
        current = config_to_dict(config)
        saved.pop("resume", None)
        current.pop("resume", None)
        for key, old, new in config_differences(saved, current):
            say(f"warning: {key} differs from the checkpoint's config: {old!r} -> {new!r}")


# --- saving --------------------------------------------------------------------------------------------
def save_checkpoint(run: Run) -> Path:
    """Write checkpoints/step_<n>/ atomically (every process adds its RNG state), then update
    best.json and prune. Collective."""
    run_dir, state, module, parallel, config = (
        run.run_dir, run.state, run.module, run.parallel, run.config
    )  # fmt: skip
    optimizer, scheduler, sampler, data = run.optimizer, run.scheduler, run.sampler, run.data
    tmp = ckpt.checkpoints_dir(run_dir) / (ckpt.step_dir_name(state.step) + ".tmp")
    error = None
    if parallel.is_main:
        error = attempt(ckpt.begin_checkpoint, run_dir, state.step)
    settle_save(parallel, run_dir, state.step, error)
    weights, optimizer_state = parallel.gather_state(module, optimizer)
    model_rng = parallel.unwrap(module).random_state()
    error = attempt(ckpt.write_rng_state, tmp, parallel.process_index, model_rng)
    if parallel.is_main and error is None and config.model.adapter:
        trainable = adapter.trainable_names(parallel.unwrap(module).model)
        if run.base_sha256 is None:  # the frozen base never changes: hashed once a session
            run.base_sha256 = adapter.digest_base(weights, trainable)
        path = tmp / adapter.ADAPTER_FILE
        error = attempt(
            adapter.save_adapter, path, weights, trainable, config.model, run.base_sha256
        )
        weights = adapter.merge_adapter_weights(weights, config.model)  # model/: a plain folder
    if parallel.is_main and error is None:
        scaler = parallel.accelerator.scaler
        payload = {
            **asdict(state),
            "eval_per": state.eval_per if state.eval_step == state.step else None,
            # The batches consumed, not the sampler's own position: DataLoader workers read ahead.
            "sampler": {
                "epoch": state.epoch,
                "position": state.position,
                "seed": config.train.seed,
                "num_processes": parallel.num_processes,
                "global_batch_seconds": config.train.batch_seconds * parallel.num_processes,
                "batch_seconds_by_width": budget_table(config),
                "grad_accum": config.train.grad_accum,
                "batches_per_epoch": sampler.batches_per_epoch(),
                "plan_sha256": sampler.plan_digest(),
            },
            "num_processes": parallel.num_processes,
            "versions": data.versions,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        error = attempt(
            ckpt.write_checkpoint_files,
            tmp,
            model=parallel.unwrap(module).model,
            vocab=data.vocab,
            config_yaml=dump_config(config),
            state=payload,
            optimizer_state=optimizer_state,
            scheduler_state=scheduler.state_dict(),
            scaler_state=scaler.state_dict() if scaler is not None else None,
            model_state=weights,
        )
    settle_save(parallel, run_dir, state.step, error)
    final = ckpt.checkpoints_dir(run_dir) / ckpt.step_dir_name(state.step)
    if parallel.is_main:
        error = attempt(ckpt.commit_checkpoint, tmp)
        error = error or attempt(ckpt.update_best, run_dir)
        error = error or attempt(ckpt.prune_checkpoints, run_dir, config.train.keep_last)
    settle_save(parallel, run_dir, state.step, error, discard=False)
    return final


def attempt(action: Callable[..., object], *args: Any, **kwargs: Any) -> OSError | None:
    """Run a file-system action; its OSError (disk full, permission denied...) is returned, not raised."""
    try:
        action(*args, **kwargs)
    except OSError as error:
        return error
    return None


def settle_save(
    parallel: Parallel, run_dir: Path, step: int, error: OSError | None, discard: bool = True
) -> None:
    """The barrier between the stages of a checkpoint save, which also stops every process together
    if the stage failed on any of them (instead of leaving the others waiting). Collective.

    On failure the part written is removed (`discard`, main process; it would be ignored anyway) and
    every process raises PhonetuneError; the one that failed explains why.
    """
    if not parallel.any(error is not None):
        return
    if discard and parallel.is_main:
        ckpt.discard_checkpoint_write(run_dir, step)
    if error is None:
        raise PhonetuneError(
            f"another process could not write its part of checkpoint step_{step} (its error says "
            "why); every process stops. The earlier checkpoints are intact."
        )
    raise PhonetuneError(ckpt.explain_save_failure(run_dir, step, error)) from error


# --- resuming ------------------------------------------------------------------------------------------
def restore_training_state(run: Run, checkpoint: Path) -> TrainState:
    """Restore optimizer, scheduler, scaler, sampler position and this process's RNG state.

    (The weights were loaded with the model.) RNG comes last, so nothing drawn during setup leaks
    into the continued run.
    """
    module, optimizer, parallel, config = run.module, run.optimizer, run.parallel, run.config
    saved = ckpt.read_state(checkpoint)
    known = {f for f in TrainState.__dataclass_fields__}
    state = TrainState(**{key: value for key, value in saved.items() if key in known})
    parallel.restore_optimizer(
        module, optimizer, ckpt.load_tensors(checkpoint, "optimizer.pt"), checkpoint
    )
    run.scheduler.load_state_dict(ckpt.load_tensors(checkpoint, "scheduler.pt"))
    scaler_state = ckpt.load_tensors(checkpoint, "scaler.pt")
    scaler = parallel.accelerator.scaler
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    continue_sampler(state, saved.get("sampler", {}), run.sampler, parallel, config)
    rng = ckpt.load_tensors(checkpoint, f"rng_state_{parallel.process_index}.pt")
    if rng is None:
        parallel.print(
            f"warning: {checkpoint} has no RNG state for process {parallel.process_index}; seeding it afresh"
        )
        seed = config.train.seed + 1000 * parallel.process_index + state.step
        seed_everything(seed, parallel.unwrap(module))
    else:
        ckpt.restore_rng_state(rng)
        if "model" in rng:
            parallel.unwrap(module).set_random_state(rng["model"])
        else:  # written before masks were drawn on the device: they start from a fresh seed
            parallel.unwrap(module).seed_random(config.train.seed + 1000 * parallel.process_index)
    return state


def budget_table(config: Config) -> list[list[float]] | None:
    """train.batch_seconds_by_width as sorted [width, seconds] pairs (as JSON keeps them)."""
    table = config.train.batch_seconds_by_width
    return sorted([float(w), float(s)] for w, s in table.items()) if table else None


def continue_sampler(
    state: TrainState,
    saved: dict[str, Any],
    sampler: DurationBatchSampler,
    parallel: Parallel,
    config: Config,
) -> None:
    """Put the sampler where the checkpoint's run stopped, re-sharding it if the layout changed.

    The global batches depend on the global budget (batch_seconds × processes), not on the process
    count: with the same global budget and accumulation the epoch's batches are the same, and the
    run continues at the same global batch, now split over another number of processes. Otherwise
    the batches differ and the run continues at the same fraction of the epoch.
    """
    processes, say = parallel.num_processes, parallel.print
    global_seconds = config.train.batch_seconds * processes
    sampler.set_epoch(state.epoch)
    same_layout = (
        saved.get("global_batch_seconds") == global_seconds
        and saved.get("batch_seconds_by_width") == budget_table(config)
        and saved.get("grad_accum") == config.train.grad_accum
    )
    # (checkpoints written before the digest existed compare the batch count alone)
    same_batches = same_layout and (
        saved["plan_sha256"] == sampler.plan_digest()
        if "plan_sha256" in saved
        else saved.get("batches_per_epoch") == sampler.batches_per_epoch()
    )
    if same_batches and saved.get("num_processes") != processes:
        say(
            f"warning: resuming a {saved.get('num_processes')}-process run with {processes}: the same "
            "global batches, now split differently, so floating-point sums (and the random draws of "
            "masking and dropout) differ from an uninterrupted run"
        )
    elif not same_batches:
        fraction = state.position / max(saved.get("batches_per_epoch") or 1, 1)
        accum = config.train.grad_accum
        state.position = min(
            int(fraction * sampler.batches_per_epoch()) // accum * accum,
            sampler.batches_per_epoch(),
        )
        where = (
            f"continuing at the same fraction of the epoch ({state.position}/"
            f"{sampler.batches_per_epoch()}), in a different data order."
        )
        if same_layout:
            say(
                f"warning: epoch {state.epoch}'s batches differ from the checkpoint's with the same "
                "budget and grad_accum (the training clips, the batching settings or phonetune's "
                f"sampler changed): {where}"
            )
        else:
            say(
                f"warning: the checkpoint's batching differs ({saved.get('num_processes')} "
                f"process(es) × {saved.get('global_batch_seconds', '?')} s global budget, "
                f"grad_accum {saved.get('grad_accum')}; now {processes} × {global_seconds:g} s, "
                f"grad_accum {config.train.grad_accum}): {where} Keep train.batch_seconds × "
                "processes and train.grad_accum unchanged to continue exactly."
            )
    sampler.set_epoch(state.epoch, state.position)
