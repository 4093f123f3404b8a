"""What a run tells its user: metrics.jsonl (always), wandb and TensorBoard (when asked, never
fatal), and the console: the start-up summary, the progress bar, evaluations, the final summary.

Only the main process reports.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phonetune.data import progress as data_progress
from phonetune.data.errors import PhonetuneError
from phonetune.train.checkpoint import METRICS_FILE
from phonetune.train.config import Config, config_to_dict

if TYPE_CHECKING:
    from phonetune.train.batching import DurationBatchSampler, TrainingData
    from phonetune.train.parallel import Parallel
    from phonetune.train.resume import TrainState

Say = Callable[[str], None]  # prints on the main process only


# --- metrics.jsonl, wandb, TensorBoard ------------------------------------------------------------
@contextlib.contextmanager
def explain_write_failure(path: Path) -> Iterator[None]:
    """A full disk or a permission error on a run file: a clear error, not a traceback."""
    try:
        yield
    except OSError as error:
        raise PhonetuneError(
            f"cannot write {path}: {error.strerror or error}. Free disk space or fix the "
            "permissions, then continue with resume=auto (checkpoints already written are intact)."
        ) from error


class MetricsLogger:
    """metrics.jsonl always (main process); wandb and TensorBoard when asked, never fatal."""

    def __init__(
        self, run_dir: Path, config: Config, enabled: bool, resume_step: int | None
    ) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.wandb = self.tensorboard = None
        self.cut_lines = 0  # lines a kill left half-written, dropped on resume
        if not enabled:
            return
        keep_through = -1 if resume_step is None else resume_step
        if self.path.is_file():
            # Lines after the resumed checkpoint belong to the interrupted run's lost steps; the
            # resumed run writes them again, so drop them to keep one line per step.
            # (undecodable bytes, from a damaged disk, make lines that parse as nothing: dropped)
            read = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            steps = [_step_of(line) for line in read]
            lines = [
                line
                for line, s in zip(read, steps, strict=True)
                if s is not None and s <= keep_through
            ]
            self.cut_lines = steps.count(None)
            # Replaced atomically: a kill during the rewrite must not lose the history.
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            os.replace(partial, self.path)
        self.file = open(self.path, "a", encoding="utf-8")  # closed in close()
        if "wandb" in config.log.report_to:
            self.wandb = _start_wandb(config, run_dir)
        if "tensorboard" in config.log.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except Exception as error:  # a reporter must never stop training
                warnings.warn(f"TensorBoard logging disabled: {error}", stacklevel=2)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with explain_write_failure(self.path):
            self.file.write(json.dumps(_finite(record), ensure_ascii=False, allow_nan=False) + "\n")
            self.file.flush()
        scalars = _flatten_scalars(record)
        step = record["step"]
        if self.wandb is not None:
            try:
                self.wandb.log(scalars, step=step)
            except Exception as error:
                warnings.warn(f"wandb logging failed, disabling it: {error}", stacklevel=2)
                self.wandb = None
        if self.tensorboard is not None:
            try:
                for key, value in scalars.items():
                    self.tensorboard.add_scalar(key, value, step)
            except Exception as error:
                warnings.warn(f"TensorBoard logging failed, disabling it: {error}", stacklevel=2)
                self.tensorboard = None

    def close(self) -> None:
        if not self.enabled:
            return
        # Every record was flushed when logged; what a failed write left in the buffer was
        # reported then (explain_write_failure) and would only fail again here.
        with contextlib.suppress(OSError):
            self.file.close()
        for reporter, finish in ((self.wandb, "finish"), (self.tensorboard, "close")):
            if reporter is not None:
                with contextlib.suppress(Exception):
                    getattr(reporter, finish)()


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively: metrics.jsonl stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _step_of(line: str) -> float | None:
    """The step of a metrics line; None for a line cut short by a kill (it is dropped)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", math.inf) if isinstance(record, dict) else None


def _flatten_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(_flatten_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
            out[f"{prefix}{key}"] = value
    return out


def _start_wandb(config: Config, run_dir: Path):  # -> a wandb run or None
    """wandb in offline mode unless the user chose a mode or has a key; failures only warn."""
    try:
        if "WANDB_MODE" not in os.environ and not _wandb_key_available():
            os.environ["WANDB_MODE"] = "offline"
        import wandb

        id_file = run_dir / "wandb_run_id"  # the same wandb run across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=config.log.wandb_project,
            name=config.run.name or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config_to_dict(config),
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as error:  # logging must never stop training
        warnings.warn(f"wandb disabled: {error}", stacklevel=2)
        return None


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except Exception:  # no or unreadable ~/.netrc
        return False


def progress_bar(config: Config, main_process: bool, initial: int) -> Any:  # tqdm or None
    """The main process's bar over the run's steps (drawn on a terminal only)."""
    if not (main_process and config.log.progress_bar):
        return None
    return data_progress.progress_bar(config.train.max_steps, "train", "step", initial=initial)


def show_progress(progress: Any, clock: dict[str, float], loss: float | None, lr: float) -> None:
    """One step on the bar: the last logged loss (steps are not read back in between), the
    learning rate, this session's throughput."""
    if progress is None:
        return
    progress.update(1)
    progress.set_postfix(
        loss="-" if loss is None else f"{loss:.3f}",
        lr=f"{lr:.2e}",
        refresh=False,
        audio_s_per_s=f"{clock['session_audio'] / max(time.time() - clock['started'], 1e-9):.1f}",
    )


def explain_blank_model(step: int, how_to_continue: str, split: str = "dev") -> str:
    """Why a model that outputs nothing is not broken: CTC training first learns to output the
    blank everywhere, and phones appear only later. `how_to_continue`: the command's own way."""
    return (
        f"note: after {step} steps the model outputs only blanks (every {split} transcription is "
        f"empty): it has not learned phones yet. Train longer: {how_to_continue} continues this "
        "run. The tiny_cpu recipe needs about 600 steps on the demo corpus before phones appear "
        "(dev PER 0.4), 1200 for 0.22; the XLSR-53 recipe some thousands."
    )


# Dev output that is (nearly) all blank: every transcription empty, or a phone here and there.
COLLAPSE_BLANK_FRACTION = 0.995
COLLAPSE_PER = 0.99


def is_blank_collapse(step: int, result: dict[str, Any], config: Config) -> bool:
    """Whether the model still outputs (nearly) only blanks well past the point where it should
    not: after the learning-rate warm-up and any frozen-transformer phase, and past a quarter of
    the run (CTC fine-tuning outputs blanks first; phones normally appear within that time)."""
    t = config.train
    settled = t.freeze_finetune_updates + t.warmup_ratio * t.max_steps
    return (
        step > settled
        and step >= 0.25 * t.max_steps
        and result.get("eval_blank_fraction", 0.0) >= COLLAPSE_BLANK_FRACTION
        and result.get("eval_per", 0.0) >= COLLAPSE_PER
    )


def explain_blank_collapse(step: int) -> str:
    return (
        f"warning: at step {step}, past the warm-up, the model still outputs (nearly) only blanks "
        f"on dev (blank frames >= {COLLAPSE_BLANK_FRACTION:.1%}, PER >= {COLLAPSE_PER:g}): CTC "
        "training has collapsed onto the blank, or is far slower than it should be. Likely causes, "
        "most common first: a learning rate too high (the loss stalls near its early value; lower "
        "train.lr) or too low; too little data or too few steps for the model (train.max_steps); "
        "heavy masking (model.mask_time_prob); labels that do not match the audio (check "
        "prep_report.json and a few clips); a pretrained model given audio it was not trained "
        "on (sample rate, normalisation). fairseq issues 3425 and 3043 discuss the same failure."
    )


def print_eval(progress: Any, step: int, result: dict[str, Any]) -> None:
    write = progress.write if progress is not None else print
    per_locale = "  ".join(f"{loc} {per:.3f}" for loc, per in result["eval_per_locale"].items())
    write(
        f"step {step}: dev PER {result['eval_per']:.4f} ({result['eval_utterances']} clips; "
        f"blank frames {result['eval_blank_fraction']:.0%})  {per_locale}"
    )
    for example in result["eval_examples"]:
        write(
            f"  [{example['locale']}] ref: {example['reference']}\n  {' ' * (len(example['locale']) + 2)} hyp: "
            f"{example['prediction']}"
        )


def describe_hours_per_locale(data: TrainingData) -> str:
    rows = data.train_rows
    locales = data.train.locales[rows]
    hours = {
        locale: float(data.train.durations[rows[locales == locale]].sum()) / 3600
        for locale in sorted(set(locales))
    }
    return ", ".join(f"{locale} {value:.3g}" for locale, value in hours.items())


def describe_language_shares(data: TrainingData, alpha: float) -> str:
    from phonetune.train.batching import language_shares

    names, languages = np.unique(data.train.locales[data.train_rows], return_inverse=True)
    seconds = np.bincount(languages, weights=data.train.durations[data.train_rows])
    shares = language_shares(seconds, alpha)
    return ", ".join(
        f"{name} {100 * share:.1f}% ({100 * own:.1f}%)"
        for name, share, own in zip(names, shares, seconds / seconds.sum(), strict=True)
    )


def print_summary(
    say: Say,
    config: Config,
    data: TrainingData,
    origin: str,
    parameters: tuple[int, int],
    parallel: Parallel,
    sampler: DurationBatchSampler,
    run_dir: Path,
    resume_from: Path | None,
    state: TrainState,
) -> None:
    """The derived numbers a run starts with: data, model, processes, batch, schedule, resume."""
    trainable, total = parameters
    steps_per_epoch = sampler.batches_per_epoch() // config.train.grad_accum
    shapes = sampler.shapes()
    t = config.train
    train_seconds = float(data.train.durations[data.train_rows].sum())
    locales = sorted(set(data.train.locales[data.train_rows]))
    skipped = ", ".join(
        f"{count} {reason.replace('_', ' ')}" for reason, count in data.skipped.items() if count
    )
    processes = parallel.num_processes
    effective = t.batch_seconds * processes * t.grad_accum
    say(
        "phonetune train\n"
        f"  run directory:   {run_dir} (config.yaml, {METRICS_FILE}, checkpoints/)\n"
        f"  data:            {config.data.prepared_dir}: {config.data.train_split} {len(data.train_rows)} clips, "
        f"{train_seconds / 3600:.2f} h, {len(locales)} locale(s) ({', '.join(locales)})"
        + (f"; skipped {skipped}" if skipped else "")
        + (
            f"\n                   hours per locale (data.max_hours_per_locale "
            f"{config.data.max_hours_per_locale:g}): {describe_hours_per_locale(data)}"
            if config.data.max_hours_per_locale is not None
            else ""
        )
        + (
            f"\n                   locale shares of each epoch (data.language_sampling_alpha "
            f"{config.data.language_sampling_alpha:g}; the data's own in brackets): "
            f"{describe_language_shares(data, config.data.language_sampling_alpha)}"
            if config.data.language_sampling_alpha != 1.0
            else ""
        )
        + (
            f"\n                   {config.data.eval_split}: {len(data.eval_rows)} clips"
            if data.eval is not None
            else f"\n                   no {config.data.eval_split!r} split: no evaluation"
        )
        + f"\n  vocabulary:      {len(data.vocab)} tokens (blank <pad> = 0)\n"
        f"  model:           {origin}\n"
        f"  parameters:      {trainable / 1e6:.2f}M trainable / {total / 1e6:.2f}M total "
        f"(feature encoder frozen"
        + (
            f"; transformer frozen for the first {t.freeze_finetune_updates} steps"
            if t.freeze_finetune_updates
            else ""
        )
        + ")\n"
        f"  processes:       {parallel.describe()}, mixed precision {t.mixed_precision}\n"
        f"  batch:           ≤{t.batch_seconds:g} s audio per process × {processes} process(es) × "
        f"{t.grad_accum} accumulation = ≤{effective:g} s per optimizer step\n"
        + describe_budget_table(t.batch_seconds_by_width)
        + f"  steps per epoch: {steps_per_epoch} ({t.max_steps} steps ≈ {t.max_steps / steps_per_epoch:.1f} epochs)\n"
        f"  batch shapes:    {len(shapes)} distinct (clips × samples) in the first epoch"
        + (", clip counts filled to the budget" if t.pad_clips_to_budget else "")
        + (
            f", widths a multiple of {t.pad_to_multiple_of} samples"
            if t.pad_to_multiple_of > 1
            else ""
        )
        + "\n"
        f"  schedule:        {t.lr_schedule}, peak lr {t.lr:g}, warm-up {t.warmup_ratio:g} / hold {t.hold_ratio:g} "
        f"of the steps\n"
        + (
            f"  resumed from:    {resume_from} (step {state.step}, epoch {state.epoch})\n"
            if resume_from
            else ""
        )
    )


def print_done(
    say: Say,
    state: TrainState,
    first_step: int,
    seconds: float,
    run_dir: Path,
    last_saved: Path | None,
) -> None:
    """Where everything is, once the run reached train.max_steps (`first_step`: where this
    session started, after a resume)."""
    from phonetune.train import checkpoint as ckpt

    best = ckpt.find_best_checkpoint(run_dir)
    ran = (
        f"{state.step - first_step} steps ({first_step} -> {state.step})"
        if first_step
        else f"{state.step} steps"
    )
    say(
        f"done: {ran} in {seconds:.0f} s"
        + (f", {state.skipped_steps} skipped (non-finite)" if state.skipped_steps else "")
        + f"\n  run directory: {run_dir}\n  metrics:       {run_dir / METRICS_FILE}"
        + f"\n  last checkpoint: {last_saved or ckpt.find_latest_checkpoint(run_dir)}"
        + (
            f"\n  best checkpoint: {best} (dev PER {ckpt.read_state(best)['eval_per']:.4f})"
            if best
            else ""
        )
    )


def describe_budget_table(table: dict | None) -> str:
    """The summary line of train.batch_seconds_by_width ("" when not set)."""
    if not table:
        return ""
    pairs = ", ".join(f"≤{float(w):g} s wide: {float(s):g} s" for w, s in sorted(table.items()))
    return f"                   by batch width: {pairs}; wider: batch_seconds\n"
