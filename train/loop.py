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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from phonetune.data.ctc import greedy_decode
from phonetune.data.errors import PhonetuneError
from phonetune.data.per import first_per_locale, score_predictions
from phonetune.data.vocab import BLANK_ID
from phonetune.train import checkpoint as ckpt
from phonetune.train import report, resume
from phonetune.train.batching import (
    IGNORE_INDEX,
    Batch,
    BatchStream,
    DurationBatchSampler,
    TrainingData,
    drop_unalignable,
    load_training_data,
    make_loader,
    plan_eval,
)
from phonetune.train.config import Config, dump_config, load_config, write_config
from phonetune.train.model import CTCModel, build_model, count_parameters, load_checkpoint_model
from phonetune.train.parallel import Parallel, make_parallel
from phonetune.train.run_dir import lock_run_dir, unlock_run_dir
from phonetune.train.schedule import make_optimizer, make_scheduler
from phonetune.train.stop import StopRequest, TrainingStopped, explain_stop


# --- command line ---------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, help="YAML training recipe (see configs/)"
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
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    train(config, hooks)
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
    last_saved: Path | None = None
    last_eval: dict[str, Any] | None = None
    clock: dict[str, float] = field(default_factory=dict)


def train(config: Config, hooks: Hooks | None = None) -> dict[str, Any]:
    """Train as `config` says; returns a summary (final step, last evaluation, checkpoint paths)."""
    hooks = hooks or Hooks()
    parallel = hooks.make_parallel(config)
    run_dir = Path(config.run.output_dir).resolve()
    # One run per directory (a second would delete this one's checkpoint writes); released at the
    # end, or by the kernel if the process dies.
    lock_run_dir(run_dir, parallel)
    try:
        run = set_up(config, parallel, run_dir)
        try:
            run_steps(run, hooks)
        finally:
            run.logger.close()
    finally:
        unlock_run_dir(run_dir)
    report.print_done(
        parallel.print, run.state, time.time() - run.clock["started"], run_dir, run.last_saved
    )
    best = ckpt.find_best_checkpoint(run_dir)
    return {
        "step": run.state.step,
        "run_dir": str(run_dir),
        "last_checkpoint": str(run.last_saved) if run.last_saved else None,
        "best_checkpoint": str(best) if best else None,
        "eval": run.last_eval,
        "skipped_steps": run.state.skipped_steps,
    }


def set_up(config: Config, parallel: Parallel, run_dir: Path) -> Run:
    """Data, model, optimizer and sampler, from scratch or from the checkpoint to resume."""
    say = parallel.print
    if parallel.is_main:
        for line in ckpt.clean_interrupted_saves(run_dir):
            say(f"{run_dir}: {line}")
    parallel.wait()  # everyone looks for the checkpoint after the clean-up
    resume_from = resume.find_resume_checkpoint(config, run_dir)
    data = load_training_data(config)
    if resume_from is not None:
        resume.check_resume_compatible(config, resume_from, data.vocab, say)

    # Model: the same initialisation on every process (DDP also broadcasts rank 0's weights).
    resume.seed_everything(config.train.seed)
    if resume_from is not None:
        model, _ = load_checkpoint_model(resume_from, config.model)
        origin = f"checkpoint {resume_from}"
    else:
        model, origin = build_model(config.model, data.vocab)
    module = CTCModel(model)
    parallel.check_model(module)
    drop_unalignable(data, module.conv_layers, config)
    parameters = count_parameters(module)
    optimizer = make_optimizer(module, config)
    scheduler = make_scheduler(optimizer, config)
    module, optimizer = parallel.prepare(module, optimizer)
    sampler = make_sampler(data, parallel, config)

    if parallel.is_main:
        with report.explain_write_failure(run_dir / ckpt.CONFIG_FILE):
            write_config(config, run_dir / ckpt.CONFIG_FILE)
    parallel.wait()
    resume_step = None if resume_from is None else ckpt.read_state(resume_from)["step"]
    logger = report.MetricsLogger(run_dir, config, parallel.is_main, resume_step)
    # Masking and dropout draw from the RNGs: seed each process differently, or restore them.
    if resume_from is not None:
        state = resume.restore_training_state(
            resume_from, module, optimizer, scheduler, sampler, parallel, config
        )
    else:
        state = resume.TrainState()
        resume.seed_everything(config.train.seed + 1000 * parallel.process_index)
    steps_per_epoch = sampler.batches_per_epoch() // config.train.grad_accum
    report.print_summary(
        say,
        config,
        data,
        origin,
        parameters,
        parallel,
        steps_per_epoch,
        run_dir,
        resume_from,
        state,
    )
    return Run(
        config, parallel, run_dir, data, module, optimizer, scheduler, sampler, state, logger,
        resume_from,
    )  # fmt: skip


def make_sampler(data: TrainingData, parallel: Parallel, config: Config) -> DurationBatchSampler:
    """This process's sampler of the global batches; an error if the data fills no step."""
    t = config.train
    sampler = DurationBatchSampler(
        data.train_rows,
        data.train.durations[data.train_rows],
        t.batch_seconds,
        t.seed,
        parallel.num_processes,
        parallel.process_index,
        t.grad_accum,
        t.bucket_width,
        t.longest_first,
    )
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
    SIGINT, a checkpoint at the step boundary and TrainingStopped."""
    config, state, parallel, t = run.config, run.state, run.parallel, run.config.train
    stream = BatchStream(run.data, run.sampler, config, pin_memory=parallel.device.type == "cuda")
    progress = report.progress_bar(config, parallel.is_main, state.step)
    run.clock.update(started=time.time(), last_log=time.time(), session_audio=0.0)
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
            batches, ghosts = stream.next_step(state)
            if hooks.on_batches is not None:
                hooks.on_batches(run, state.step + 1, batches)
            frozen = state.step < t.freeze_finetune_updates
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
            result = train_step(
                run.module, run.optimizer, run.scheduler, batches, ghosts, parallel, config, frozen
            )
            account_step(run, result)
            if hooks.after_step is not None:
                hooks.after_step(run, state.step, result)
            report.show_progress(progress, run.clock, result, lr)
            if state.step % config.log.every_steps == 0 or state.step == t.max_steps:
                log_interval(run, result, lr, frozen)
            at_end = state.step == t.max_steps
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
    """Count the step in the run's state; too many non-finite steps in a row stop the run."""
    state, t = run.state, run.config.train
    state.step += 1
    state.audio_seconds += result.audio_seconds
    state.ctc_infeasible += result.infeasible
    state.interval_audio += result.audio_seconds
    state.interval_padded += result.padded_seconds
    run.clock["session_audio"] += result.audio_seconds
    if not result.skipped:
        state.consecutive_nonfinite = 0
        state.interval_loss += result.loss
        state.interval_steps += 1
        return
    state.skipped_steps += 1
    state.consecutive_nonfinite += 1
    if state.consecutive_nonfinite >= t.max_consecutive_nonfinite:
        latest = ckpt.find_latest_checkpoint(run.run_dir)
        raise PhonetuneError(
            f"stopped at step {state.step}: {state.consecutive_nonfinite} steps in a row had a "
            f"NaN/inf gradient and were skipped ({state.skipped_steps} in all; "
            f"train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}). Likely causes: "
            "a learning rate too high for the model (lower train.lr or lengthen "
            "train.warmup_ratio); fp16 overflow (train.mixed_precision=bf16 or no); clips with "
            "fewer frames than phones while model.ctc_zero_infinity=false; NaN/inf in the "
            "audio (prepare the data again). "
            f"Last checkpoint: {latest or 'none'} (continue from it with resume=auto)."
        )


def log_interval(run: Run, result: StepResult, lr: float, frozen: bool) -> None:
    """A training line of metrics.jsonl: the interval's mean loss, throughput and counters."""
    state, now = run.state, time.time()
    run.logger.log(
        {
            "step": state.step,
            "loss": state.interval_loss / state.interval_steps if state.interval_steps else None,
            "lr": lr,
            "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
            "epoch": state.epoch + state.position / max(run.sampler.batches_per_epoch(), 1),
            "audio_seconds": state.interval_audio,
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
    run.clock["last_log"] = now


def evaluate_and_log(run: Run, progress: Any) -> None:
    run.last_eval = evaluate_dev(run.module, run.data, run.parallel, run.config)
    if run.last_eval is not None:
        run.state.eval_per, run.state.eval_step = run.last_eval["eval_per"], run.state.step
        run.logger.log({"step": run.state.step, **run.last_eval})
        report.print_eval(progress, run.state.step, run.last_eval)


def save(run: Run) -> Path:
    return resume.save_checkpoint(
        run.run_dir, run.state, run.module, run.optimizer, run.scheduler, run.sampler,
        run.parallel, run.config, run.data,
    )  # fmt: skip


# --- the training step ------------------------------------------------------------------------------
def ctc_loss(
    logits: torch.Tensor,
    output_lengths: torch.Tensor,
    labels: torch.Tensor,
    label_lengths: torch.Tensor,
    reduction: str,
    zero_infinity: bool,
) -> torch.Tensor:
    """Summed CTC loss of a batch, in fp32 whatever the autocast dtype (half-precision CTC gives NaN).

    reduction "sum": per-utterance losses summed; "mean": each divided by its label length first.
    The caller divides by the step's global token (or utterance) count.
    """
    with (
        torch.autocast(device_type=logits.device.type, enabled=False),
        torch.backends.cudnn.flags(enabled=False),
    ):
        log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
        targets = labels[labels != IGNORE_INDEX]
        losses = F.ctc_loss(
            log_probs,
            targets,
            output_lengths,
            label_lengths,
            blank=BLANK_ID,
            reduction="none",
            zero_infinity=zero_infinity,
        )
    if reduction == "mean":
        losses = losses / label_lengths.clamp(min=1)
    return losses.sum()


def count_infeasible(
    output_lengths: torch.Tensor, labels: torch.Tensor, label_lengths: torch.Tensor
) -> int:
    """Utterances whose CTC loss is infinite: fewer frames than phones plus repeated neighbours."""
    repeats = ((labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] != IGNORE_INDEX)).sum(dim=1)
    return int((output_lengths < label_lengths + repeats).sum())


@dataclass
class StepResult:
    loss: float  # global loss of the step (per token or per utterance), NaN if non-finite
    grad_norm: float
    skipped: bool
    audio_seconds: float  # all processes
    padded_seconds: float
    infeasible: int


def train_step(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: list[Batch],
    ghosts: list[bool],
    parallel: Parallel,
    config: Config,
    freeze_transformer: bool,
) -> StepResult:
    """Forward/backward over the step's batches (gradient accumulation), clip, update, schedule.

    `ghosts[i]` marks a zero-weight copy standing in for an empty share of a global batch (fewer
    clips than processes): it runs so that every process joins the gradient reduction, and counts
    for nothing.
    """
    device = parallel.device
    unwrapped: CTCModel = parallel.unwrap(module)
    audio_dtype = parallel.input_dtype(module)
    mean_per_utterance = config.model.ctc_loss_reduction == "mean"
    real = [b for b, ghost in zip(batches, ghosts, strict=True) if not ghost]
    # The loss is normalised by the number of label tokens of the whole step: all accumulated batches
    # on all processes (or by the number of utterances with reduction "mean"). Long and short batches
    # thus weigh by their content, not equally, and the result does not depend on the process count.
    local_count = sum(
        len(b.rows) if mean_per_utterance else int(b.label_lengths.sum()) for b in real
    )
    global_count = parallel.sum(torch.tensor(float(local_count), device=device)).clamp(min=1.0)
    loss_sum = torch.zeros((), device=device)
    infeasible = 0
    for index, (batch, ghost) in enumerate(zip(batches, ghosts, strict=True)):
        batch = batch.to(device, audio_dtype)
        with parallel.accumulating(module, last=index == len(batches) - 1):
            logits = module(
                batch.input_values, batch.attention_mask, freeze_transformer=freeze_transformer
            )
            output_lengths = unwrapped.output_lengths(batch.input_lengths)
            loss = ctc_loss(
                logits,
                output_lengths,
                batch.labels,
                batch.label_lengths,
                config.model.ctc_loss_reduction,
                config.model.ctc_zero_infinity,
            )
            # DDP, FSDP and ZeRO average gradients over processes: scaling by the process count
            # makes that average the gradient of (sum of all losses) / global_count.
            weight = 0.0 if ghost else parallel.num_processes
            parallel.backward(module, loss * weight / global_count)
        if not ghost:
            loss_sum += loss.detach()
            infeasible += count_infeasible(output_lengths, batch.labels, batch.label_lengths)

    grad_norm, skipped = parallel.update(module, optimizer, config.train.max_grad_norm)
    finite = math.isfinite(grad_norm)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    totals = torch.tensor(
        [
            float(loss_sum),
            float(infeasible),
            sum(b.audio_seconds for b in real),
            sum(b.padded_seconds for b in real),
        ],
        dtype=torch.float64,
        device=device,
    )
    totals = parallel.sum(totals)
    loss_value = float(totals[0] / global_count.double())
    return StepResult(
        loss=loss_value if finite and math.isfinite(loss_value) else math.nan,
        grad_norm=grad_norm,
        skipped=skipped,
        audio_seconds=float(totals[2]),
        padded_seconds=float(totals[3]),
        infeasible=int(totals[1]),
    )


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
    unwrapped.eval()
    try:
        for number, batch in enumerate(loader):
            batch = batch.to(parallel.device, audio_dtype)
            with torch.no_grad(), parallel.autocast():
                logits = unwrapped(
                    batch.input_values, batch.attention_mask, freeze_transformer=True
                )
            if number >= len(mine) - fillers:
                continue
            ids = logits.argmax(dim=-1).cpu()
            lengths = unwrapped.output_lengths(batch.input_lengths).cpu()
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
