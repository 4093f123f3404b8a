"""`phonetune train`: fine-tune a wav2vec 2.0 encoder with CTC on a prepared dataset.

One process (CPU or one GPU) with `phonetune train --config FILE [key=value ...]`; several with
`accelerate launch [options] -m phonetune train --config FILE [key=value ...]` (train/parallel.py:
DDP, FSDP version 2, DeepSpeed ZeRO-2). The run can be killed at any moment and continued with
`resume=auto`: the next steps are the ones the uninterrupted run would have taken (same batches,
same masks and dropout, same updates).

Read top to bottom: `train` sets up (`set_up`: data, model, optimizer, resume), runs the steps
(`run_steps`: `train_step`, and every so often `evaluate_dev` and a checkpoint), and ends with a
summary. The pieces live beside it: batching.py (what the model is fed), parallel.py (how processes
share the work), resume.py (saving and resuming), report.py (metrics and the console).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from phonetune.data.ctc import count_frames, count_min_frames_padded, greedy_decode
from phonetune.data.errors import PhonetuneError
from phonetune.data.per import first_per_locale, score_predictions
from phonetune.data.progress import progress_bar
from phonetune.data.vocab import BLANK_ID
from phonetune.train import checkpoint as ckpt
from phonetune.train import report, resume
from phonetune.train.adapter import add_adapter, load_adapter
from phonetune.train.batching import (
    IGNORE_INDEX,
    Batch,
    BatchStream,
    DurationBatchSampler,
    StepBatches,
    TrainingData,
    drop_unalignable,
    load_training_data,
    make_loader,
    make_sampler,
    plan_eval,
)
from phonetune.train.config import (
    Config,
    dump_config,
    load_config,
    shipped_config,
    shipped_recipes,
    write_config,
)
from phonetune.train.model import CTCModel, build_model, count_parameters, load_checkpoint_model
from phonetune.train.parallel import Parallel, exit_launched_process, make_parallel
from phonetune.train.run_dir import (
    discard_unused_run_dir,
    lock_run_dir,
    missing_folders,
    unlock_run_dir,
)
from phonetune.train.schedule import make_optimizer, make_scheduler
from phonetune.train.stop import StopRequest, TrainingStopped, explain_stop


# --- command line ---------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML training recipe: a path, or the name of a shipped recipe (tiny_cpu, "
        "xlsr53_espeak_cv, zero_shot_tiny, adapter_tiny; see --list-configs)",
    )
    parser.add_argument(
        "--list-configs", action="store_true", help="list the shipped recipes and exit"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config values with dotted keys, e.g. data.prepared_dir=prep run.output_dir=runs/x "
        "train.max_steps=100 resume=auto",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="validate the configuration, print it resolved, and exit",
    )


def run(args: argparse.Namespace, hooks: Hooks | None = None) -> int:
    if args.list_configs:
        for name, description in shipped_recipes().items():
            print(f"{name:<18} {description}")
        print(f"(in {shipped_config('.').resolve()}; use: phonetune train --config NAME ...)")
        return 0
    if args.config is None:
        raise PhonetuneError(
            "--config is required: a YAML recipe, or a shipped one by name "
            f"({', '.join(shipped_recipes())}); see --list-configs"
        )
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    summary = train(config, hooks)
    if summary["is_main"]:
        last_eval = summary["eval"]
        if last_eval is not None and last_eval["eval_empty"] == last_eval["eval_utterances"]:
            print(report.explain_blank_model(summary["step"], "`resume=auto train.max_steps=N`"))
        run_dir = Path(summary["run_dir"])
        choice = " --best" if summary["best_checkpoint"] else ""
        out = run_dir.with_name(f"{run_dir.name}-model")
        print(f"next: phonetune export {quote(str(run_dir))}{choice} --out {quote(str(out))}")
    exit_launched_process()  # the command's end (see there why a launched one ends here)
    return 0


# --- the run ----------------------------------------------------------------------------------------
@dataclass
class Hooks:
    """Public seams for tests and benchmarks, so that none of them patches the loop's internals.

    `make_parallel(config)` builds the processes' backend (tests set FSDP or DeepSpeed up on CPU
    processes). The others get the run and the number of the step (1-based):
    `before_step(run, step)` before its batches are loaded (a benchmark's gate, a test's kill or
    signal), `on_batches(run, step, batches)` before they run (to see or alter them),
    `after_step(run, step, result)` once it is counted.
    """

    make_parallel: Callable[[Config], Parallel] = make_parallel
    before_step: Callable[[Run, int], None] | None = None
    on_batches: Callable[[Run, int, list[Batch]], None] | None = None
    after_step: Callable[[Run, int, StepResult], None] | None = None


@dataclass
class Run:
    """Everything a run holds once it is set up."""

    config: Config
    parallel: Parallel
    run_dir: Path
    data: TrainingData
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: DurationBatchSampler
    state: resume.TrainState
    logger: report.MetricsLogger
    resume_from: Path | None
    first_step: int = 0  # where this session started (a resumed run's checkpoint step)
    last_saved: Path | None = None
    last_eval: dict[str, Any] | None = None
    tally: Tally | None = None
    last_loss: float | None = None  # of the last logging interval (the progress bar shows it)
    last_grad_norm: float | None = None
    clock: dict[str, float] = field(default_factory=dict)
    warned_blank: bool = False  # the blank-collapse warning is given once a session
    base_sha256: str | None = None  # model.adapter: of the frozen base, at the first save


def train(config: Config, hooks: Hooks | None = None) -> dict[str, Any]:
    """Train as `config` says; returns a summary (final step, last evaluation, checkpoint paths)."""
    hooks = hooks or Hooks()
    parallel = hooks.make_parallel(config)
    run_dir = Path(config.run.output_dir).resolve()
    created = missing_folders(run_dir)
    # One run per directory (a second would delete this one's checkpoint writes); released at the
    # end, or by the kernel if the process dies.
    lock_run_dir(run_dir, parallel)
    try:
        try:
            run = set_up(config, parallel, run_dir)
        except BaseException:
            unlock_run_dir(run_dir)
            if parallel.is_main:
                discard_unused_run_dir(run_dir, created)
            raise
        try:
            run_steps(run, hooks)
        finally:
            run.logger.close()
    finally:
        unlock_run_dir(run_dir)
    report.print_done(
        parallel.print,
        run.state,
        run.first_step,
        time.time() - run.clock["started"],
        run_dir,
        run.last_saved,
    )
    best = ckpt.find_best_checkpoint(run_dir)
    return {
        "step": run.state.step,
        "run_dir": str(run_dir),
        "last_checkpoint": str(run.last_saved) if run.last_saved else None,
        "best_checkpoint": str(best) if best else None,
        "eval": run.last_eval,
        "skipped_steps": run.state.skipped_steps,
        "is_main": parallel.is_main,
    }


def set_up(config: Config, parallel: Parallel, run_dir: Path) -> Run:
    """Data, model, optimizer and sampler, from scratch or from the checkpoint to resume."""
    say = parallel.print
    check_ctc_implementation(config, parallel)
    if parallel.is_main:
        for line in ckpt.clean_interrupted_saves(run_dir):
            say(f"{run_dir}: {line}")
    parallel.wait()  # everyone looks for the checkpoint after the clean-up
    resume_from = resume.find_resume_checkpoint(config, run_dir, say)
    data = load_training_data(config)
    if resume_from is not None:
        resume.check_resume_compatible(config, resume_from, data.vocab, say)

    # Model: the same initialisation on every process (DDP also broadcasts rank 0's weights).
    resume.seed_everything(config.train.seed)
    if config.model.adapter:  # the base model again, then the adapter (see train/adapter.py)
        model, origin = build_model(config.model, data.vocab)
        origin += "; " + add_adapter(model, config.model)
        if resume_from is not None:
            load_adapter(model, resume_from)
            origin = f"checkpoint {resume_from} ({origin})"
    elif resume_from is not None:
        model, _ = load_checkpoint_model(resume_from, config.model)
        origin = f"checkpoint {resume_from}"
    else:
        model, origin = build_model(config.model, data.vocab)
    module = CTCModel.for_training(model, config.train.compile)
    parallel.check_model(module)
    drop_unalignable(data, module.conv_layers, config)
    parameters = count_parameters(module)
    optimizer = make_optimizer(module, config)
    scheduler = make_scheduler(optimizer, config)
    module, optimizer = parallel.prepare(module, optimizer)
    sampler = make_checked_sampler(data, parallel, config)

    if parallel.is_main:
        with report.explain_write_failure(run_dir / ckpt.CONFIG_FILE):
            write_config(config, run_dir / ckpt.CONFIG_FILE)
    parallel.wait()
    resume_step = None if resume_from is None else ckpt.read_state(resume_from)["step"]
    logger = report.MetricsLogger(run_dir, config, parallel.is_main, resume_step)
    if logger.cut_lines:
        say(
            f"{logger.path}: dropped {logger.cut_lines} line(s) cut short when the run was "
            "stopped; their steps are logged again as they are retrained"
        )
    run = Run(
        config, parallel, run_dir, data, module, optimizer, scheduler, sampler,
        resume.TrainState(), logger, resume_from,
    )  # fmt: skip
    # Masking and dropout draw from the RNGs: seed each process differently, or restore them.
    if resume_from is not None:
        run.state = resume.restore_training_state(run, resume_from)
        run.first_step = run.state.step
    else:
        seed = config.train.seed + 1000 * parallel.process_index
        resume.seed_everything(seed, parallel.unwrap(module))
    report.print_summary(
        say, config, data, origin, parameters, parallel, sampler, run_dir, resume_from, run.state
    )
    return run


def check_ctc_implementation(config: Config, parallel: Parallel) -> None:
    """train.ctc_implementation=triton: an error without the triton package, a warning off GPUs."""
    if config.train.ctc_implementation != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise PhonetuneError(
            "train.ctc_implementation=triton needs the triton package, which CUDA builds of "
            "PyTorch come with (pip install triton); or use train.ctc_implementation=pytorch"
        )
    if parallel.device.type != "cuda":
        parallel.print(
            f"warning: train.ctc_implementation=triton on a {parallel.device.type}: Triton's "
            "interpreter runs its kernels, with the same results, far slower than on a GPU"
        )


def make_checked_sampler(
    data: TrainingData, parallel: Parallel, config: Config
) -> DurationBatchSampler:
    """This process's sampler of the global batches; an error if the data fills no step."""
    t = config.train
    sampler = make_sampler(data, config, parallel.num_processes, parallel.process_index)
    if sampler.batches_per_epoch() // t.grad_accum == 0:
        raise PhonetuneError(
            f"the {config.data.train_split} split ({len(data.train_rows)} usable clips, "
            f"{data.train.durations[data.train_rows].sum():.0f} s) fills less than one optimizer step of "
            f"{parallel.num_processes} process(es) × {t.grad_accum} batch(es) of ≤{t.batch_seconds:g} s; "
            "lower train.batch_seconds or train.grad_accum"
        )
    return sampler


def run_steps(run: Run, hooks: Hooks) -> None:
    """Optimizer steps until train.max_steps, evaluating and saving on schedule; on SIGTERM or
    SIGINT, a checkpoint at the step boundary and TrainingStopped. Between logging steps nothing is
    read back from the device: the host queues step after step."""
    config, state, parallel, t = run.config, run.state, run.parallel, run.config.train
    stream = BatchStream(run.data, run.sampler, config, pin_memory=parallel.device.type == "cuda")
    progress = report.progress_bar(config, parallel.is_main, state.step)
    run.clock.update(started=time.time(), last_log=time.time(), session_audio=0.0)
    run.tally = Tally(parallel.device, state.consecutive_nonfinite)
    run.module.train()
    # SIGTERM/SIGINT only set a flag: every process stops at the same step boundary, after saving.
    stop = StopRequest(announce=parallel.is_main)
    stop.install()
    saved_step, signum = state.step, 0  # (step 0: nothing to save)
    try:
        while state.step < t.max_steps:
            signum = stop.agreed(parallel)
            if signum:
                break
            if hooks.before_step is not None:
                hooks.before_step(run, state.step + 1)
            step = stream.next_step(state)
            if hooks.on_batches is not None:
                hooks.on_batches(run, state.step + 1, step.batches)
            frozen = state.step < t.freeze_finetune_updates
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
            result = train_step(
                run.module, run.optimizer, run.scheduler, step, parallel, config, frozen
            )
            account_step(run, result)
            if hooks.after_step is not None:
                hooks.after_step(run, state.step, result)
            report.show_progress(progress, run.clock, run.last_loss, lr)
            at_end = state.step == t.max_steps
            if state.step % config.log.every_steps == 0 or at_end:
                log_interval(run, lr, frozen)
            if state.step % t.eval_steps == 0 or at_end:
                evaluate_and_log(run, progress)
            if state.step % t.save_steps == 0 or at_end:
                run.last_saved, saved_step = save(run), state.step
        if signum:
            if state.step != saved_step:
                run.last_saved = save(run)
            checkpoint = run.last_saved or run.resume_from
            (progress.write if progress is not None else parallel.print)(
                explain_stop(signum, state.step, t.max_steps, checkpoint, run.run_dir)
            )
            raise TrainingStopped(signum, state.step, checkpoint)
    finally:
        stop.uninstall()
        if progress is not None:
            progress.close()


def account_step(run: Run, result: StepResult) -> None:
    """Count the step: host numbers in the run's state, device values in the tally."""
    state = run.state
    state.step += 1
    state.audio_seconds += result.audio_seconds
    state.interval_audio += result.audio_seconds
    state.interval_padded += result.padded_seconds
    for locale, seconds in result.locale_seconds.items():
        state.interval_locale_seconds[locale] = (
            state.interval_locale_seconds.get(locale, 0.0) + seconds
        )
    run.clock["session_audio"] += result.audio_seconds
    run.tally.add(result)


def read_tally(run: Run) -> None:
    """Fold what the steps since the last read left on the device into the run's state (one
    transfer); too many non-finite steps in a row stop the run."""
    tally, state, t = run.tally.read(run.parallel), run.state, run.config.train
    state.interval_loss += tally["loss"]
    state.interval_steps += int(tally["counted"])
    state.skipped_steps += int(tally["skipped"])
    state.consecutive_nonfinite = int(tally["consecutive"])
    state.ctc_infeasible += int(tally["infeasible"])
    run.last_grad_norm = tally["grad_norm"] if math.isfinite(tally["grad_norm"]) else None
    if tally["worst"] >= t.max_consecutive_nonfinite:
        latest = ckpt.find_latest_checkpoint(run.run_dir)
        raise PhonetuneError(
            f"stopped at step {state.step}: {int(tally['worst'])} steps in a row had a "
            f"NaN/inf gradient and were skipped ({state.skipped_steps} in all; "
            f"train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}). Likely causes: "
            "a learning rate too high for the model (lower train.lr or lengthen "
            "train.warmup_ratio); fp16 overflow (train.mixed_precision=bf16 or no); clips with "
            "fewer frames than phones while model.ctc_zero_infinity=false; NaN/inf in the "
            "audio (prepare the data again). "
            f"Last checkpoint: {latest or 'none'} (continue from it with resume=auto)."
        )


def log_interval(run: Run, lr: float, frozen: bool) -> None:
    """A training line of metrics.jsonl: the interval's mean loss, throughput and counters."""
    read_tally(run)
    state, now = run.state, time.time()
    run.last_loss = state.interval_loss / state.interval_steps if state.interval_steps else None
    run.logger.log(
        {
            "step": state.step,
            "loss": run.last_loss,
            "lr": lr,
            "grad_norm": run.last_grad_norm,
            "epoch": state.epoch + state.position / max(run.sampler.batches_per_epoch(), 1),
            "audio_seconds": state.interval_audio,
            "locale_seconds": {k: round(v, 3) for k, v in state.interval_locale_seconds.items()},
            "audio_seconds_per_second": state.interval_audio
            / max(now - run.clock["last_log"], 1e-9),
            "padding_fraction": 1.0 - state.interval_audio / max(state.interval_padded, 1e-9),
            "frozen_transformer": frozen,
            "skipped_steps": state.skipped_steps,
            "ctc_infeasible": state.ctc_infeasible,
        }
    )
    state.interval_loss, state.interval_steps = 0.0, 0
    state.interval_audio = state.interval_padded = 0.0
    state.interval_locale_seconds = {}
    run.clock["last_log"] = now


def evaluate_and_log(run: Run, progress: Any) -> None:
    run.last_eval = evaluate_dev(run.module, run.data, run.parallel, run.config)
    if run.last_eval is not None:
        run.state.eval_per, run.state.eval_step = run.last_eval["eval_per"], run.state.step
        run.logger.log({"step": run.state.step, **run.last_eval})
        report.print_eval(progress, run.state.step, run.last_eval)
        if not run.warned_blank and report.is_blank_collapse(
            run.state.step, run.last_eval, run.config
        ):
            run.warned_blank = True
            (progress.write if progress is not None else run.parallel.print)(
                report.explain_blank_collapse(run.state.step)
            )


def save(run: Run) -> Path:
    read_tally(run)  # the state saved holds every step's counts
    return resume.save_checkpoint(run)


# --- the training step ------------------------------------------------------------------------------
def ctc_losses(
    logits: torch.Tensor,
    output_lengths: list[int] | torch.Tensor,
    labels: torch.Tensor,
    label_lengths: list[int] | torch.Tensor,
    zero_infinity: bool,
    implementation: str = "pytorch",
) -> torch.Tensor:
    """Each utterance's CTC loss, in fp32 whatever the autocast dtype (half-precision CTC gives NaN).

    Targets go in padded form (rows of labels), which needs no boolean indexing.
    `train.ctc_implementation`:
    - "pytorch": PyTorch's CTC reads the lengths on the host: give them as lists of numbers (the
      batch's own), so that they are not read back from the device. (On a GPU it still copies them
      there itself, waiting for the device twice in the forward pass and twice in the backward.)
    - "triton": train/ctc_triton.py reads them on the device: give tensors there.
    """
    with (
        torch.autocast(device_type=logits.device.type, enabled=False),
        torch.backends.cudnn.flags(enabled=False),
    ):
        precision = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 in tests
        log_probs = F.log_softmax(logits.to(precision), dim=-1)
        targets = labels.clamp(min=0)  # label padding (IGNORE_INDEX) lies past each length: unread
        if implementation == "triton":
            from phonetune.train.ctc_triton import ctc_loss

            return ctc_loss(
                log_probs, targets, output_lengths, label_lengths, BLANK_ID, zero_infinity
            )
        return F.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            output_lengths,
            label_lengths,
            blank=BLANK_ID,
            reduction="none",
            zero_infinity=zero_infinity,
        )


@dataclass
class StepResult:
    """One optimizer step: device tensors (read back only at logging steps, see `Tally`) and what
    the step held over every process (host numbers, from the sampler's plan)."""

    loss_share: torch.Tensor  # this process's part of the step's normalised loss
    grad_norm: torch.Tensor  # of the whole gradient, before clipping
    skipped: torch.Tensor  # bool: NaN/inf gradient, no update
    infeasible: torch.Tensor  # this process's clips whose CTC loss was infinite
    audio_seconds: float  # all processes
    padded_seconds: float
    locale_seconds: dict[str, float]  # of audio_seconds


def train_step(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: StepBatches,
    parallel: Parallel,
    config: Config,
    freeze_transformer: bool,
) -> StepResult:
    """Forward/backward over the step's batches (gradient accumulation), clip, update, schedule,
    without reading any value back from the device.

    The loss is normalised by the number of label tokens of the whole step (`step.normaliser`: all
    accumulated batches on all processes, or the number of utterances with reduction "mean"), so
    long and short batches weigh by their content and the result does not depend on the process
    count. Filler rows (same-shape padding, `Batch.weights` 0) run and count for nothing.
    """
    unwrapped: CTCModel = parallel.unwrap(module)
    audio_dtype = parallel.input_dtype(module)
    loss_sum = torch.zeros((), device=parallel.device)
    infeasible = torch.zeros((), dtype=torch.long, device=parallel.device)
    per_utterance = config.model.ctc_loss_reduction == "mean"
    for index, host in enumerate(step.batches):
        batch = host.to(parallel.device, audio_dtype)
        frames = unwrapped.output_lengths(batch.input_lengths)
        if config.train.ctc_implementation == "triton":  # read on the device
            frame_counts, label_counts = frames, batch.label_lengths
        else:  # read on the host: the batch's own numbers, not the device's copies
            frame_counts = count_frames(np.asarray(host.samples), unwrapped.conv_layers).tolist()
            label_counts = host.phone_counts
        with parallel.accumulating(module, last=index == len(step.batches) - 1):
            logits = module(
                batch.input_values, batch.input_lengths, freeze_transformer=freeze_transformer
            )
            losses = ctc_losses(
                logits,
                frame_counts,
                batch.labels,
                label_counts,
                config.model.ctc_zero_infinity,
                config.train.ctc_implementation,
            )
            # reduction "mean": each utterance's loss divided by its label length first
            weights = (
                batch.weights / batch.label_lengths.clamp(min=1) if per_utterance else batch.weights
            )
            loss = (losses * weights).sum()
            # DDP, FSDP and ZeRO average gradients over processes: scaling by the process count
            # makes that average the gradient of (sum of all losses) / normaliser.
            parallel.backward(module, loss * parallel.num_processes / step.normaliser)
        loss_sum += loss.detach()
        too_few = frames < count_min_frames_padded(batch.labels, IGNORE_INDEX)
        infeasible += (too_few & (batch.weights > 0)).sum()

    grad_norm, skipped = parallel.update(module, optimizer, config.train.max_grad_norm)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss_share=loss_sum / step.normaliser,
        grad_norm=grad_norm,
        skipped=skipped,
        infeasible=infeasible,
        audio_seconds=step.audio_seconds,
        padded_seconds=step.padded_seconds,
        locale_seconds=step.locale_seconds,
    )


class Tally:
    """What the steps report, kept on the device and read back all at once (`read`): once per
    logging step (and at checkpoints), so the host never waits on the device between them.

    `consecutive` continues a run of skipped steps across reads (and resumes from the state).
    """

    # the row of `values`: summed over processes when read / the same on every process
    LOSS, INFEASIBLE, COUNTED, SKIPPED, CONSECUTIVE, WORST, GRAD_NORM = range(7)

    def __init__(self, device: torch.device, consecutive: int) -> None:
        self.values = torch.zeros(7, dtype=torch.float64, device=device)
        self.values[self.CONSECUTIVE] = consecutive
        self.values[self.WORST] = consecutive
        self.steps = 0

    def add(self, result: StepResult) -> None:
        skipped = result.skipped.to(torch.float64)
        v = self.values
        consecutive = (v[self.CONSECUTIVE] + 1) * skipped
        update = torch.stack(
            [
                v[self.LOSS] + torch.where(result.skipped, 0.0, result.loss_share.double()),
                v[self.INFEASIBLE] + result.infeasible,
                v[self.COUNTED] + 1 - skipped,
                v[self.SKIPPED] + skipped,
                consecutive,
                torch.maximum(v[self.WORST], consecutive),
                result.grad_norm.double(),
            ]
        )
        self.values = update
        self.steps += 1

    def read(self, parallel: Parallel) -> dict[str, float]:
        """The tally since the last read, in one transfer (collective: the loss and infeasible
        clips are summed over the processes); then it starts again."""
        summed = parallel.sum(self.values[: self.COUNTED])
        values = torch.cat([summed, self.values[self.COUNTED :]]).tolist()
        names = ("loss", "infeasible", "counted", "skipped", "consecutive", "worst", "grad_norm")
        read = dict(zip(names, values, strict=True))
        read["grad_norm"] = read["grad_norm"] if self.steps else math.nan
        self.values = torch.zeros_like(self.values)
        self.values[self.CONSECUTIVE] = self.values[self.WORST] = read["consecutive"]
        self.steps = 0
        return read


# --- evaluation on the dev split --------------------------------------------------------------------
def evaluate_dev(
    module: torch.nn.Module, data: TrainingData, parallel: Parallel, config: Config
) -> dict[str, Any] | None:
    """Dev PER per locale and overall, blank fraction, a few decoded examples (main process only).

    Each process decodes a disjoint share of the clips; the shares are gathered whole, so no clip
    is dropped or counted twice however the split divides among processes.
    """

    if data.eval is None or len(data.eval_rows) == 0:
        return None
    unwrapped: CTCModel = parallel.unwrap(module)
    id_to_token = {index: token for token, index in data.vocab.items()}
    batch_seconds = config.train.eval_batch_seconds or config.train.batch_seconds
    durations = data.eval.durations[data.eval_rows]
    count, index = parallel.num_processes, parallel.process_index
    mine = plan_eval(durations, batch_seconds, count, index)
    fillers = 0
    if parallel.equal_eval_batches:
        # Every process must run the same number of forward passes: one with a batch fewer
        # decodes the first batch again, unscored.
        everyone = plan_eval(durations, batch_seconds)
        fillers = math.ceil(len(everyone) / count) - len(mine)
        mine = mine + [everyone[0]] * fillers
    loader = make_loader(
        data.eval, [data.eval_rows[b] for b in mine], None, config.data.num_workers
    )
    records: list[tuple[int, str, str, str]] = []
    blank_frames = total_frames = 0
    audio_dtype = parallel.input_dtype(module)
    bar = progress_bar(
        sum(len(b) for b in mine[: len(mine) - fillers]),
        "dev",
        "clip",
        show=parallel.is_main and config.log.progress_bar,
        leave=False,  # the PER line replaces it
    )
    unwrapped.eval()
    try:
        for number, batch in enumerate(loader):
            batch = batch.to(parallel.device, audio_dtype)
            with torch.no_grad(), parallel.autocast(), unwrapped.evaluating():
                logits = unwrapped(batch.input_values, batch.input_lengths, freeze_transformer=True)
            if number >= len(mine) - fillers:
                continue
            ids = logits.argmax(dim=-1).cpu()
            lengths = unwrapped.output_lengths(batch.input_lengths).cpu()
            bar.update(len(batch.rows))
            for i, row in enumerate(batch.rows):
                frames = ids[i, : int(lengths[i])]
                blank_frames += int((frames == BLANK_ID).sum())
                total_frames += len(frames)
                records.append(
                    (
                        row,
                        batch.locales[i],
                        batch.phones[i],
                        greedy_decode(frames.tolist(), id_to_token),
                    )
                )
    finally:
        bar.close()
        unwrapped.train()
    records = parallel.gather_objects(records)
    frame_counts = parallel.sum(
        torch.tensor([blank_frames, total_frames], dtype=torch.float64, device=parallel.device)
    )
    if not parallel.is_main:
        return None
    records.sort(key=lambda record: record[0])
    scores = score_predictions(
        [r[3] for r in records], [r[2] for r in records], [r[1] for r in records]
    )
    return {
        "eval_per": scores["overall"]["per"],
        "eval_per_locale": {loc: counts["per"] for loc, counts in scores["per_locale"].items()},
        "eval_counts": scores["overall"],
        "eval_counts_per_locale": scores["per_locale"],
        "eval_blank_fraction": float(frame_counts[0] / frame_counts[1].clamp(min=1)),
        "eval_utterances": len(records),
        "eval_empty": sum(1 for record in records if not record[3]),
        "eval_examples": pick_examples(records, config.train.eval_num_examples),
    }


def pick_examples(records: list[tuple[int, str, str, str]], count: int) -> list[dict[str, str]]:
    """The first clip of each locale in turn, `count` in all (the same clips at every evaluation)."""
    by_locale = first_per_locale(
        [locale for _, locale, _, _ in records],
        [{"reference": ref, "prediction": hyp} for _, _, ref, hyp in records],
        count,
    )
    rounds = [
        {"locale": locale, **kept[depth]}
        for depth in range(count)
        for locale, kept in by_locale.items()
        if depth < len(kept)
    ]
    return rounds[:count]
