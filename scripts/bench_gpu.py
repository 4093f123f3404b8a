"""XLSR-53 on one GPU in bf16: throughput, model FLOPs utilisation, peak memory, largest batch.

    python scripts/bench_gpu.py --out runs/bench_gpu            # on a CUDA machine: the whole run
    python scripts/bench_gpu.py --write-section before=old/bench_gpu.json after=runs/bench_gpu/bench_gpu.json
                                                    # one table of several runs into BENCHMARKS.md
    python scripts/bench_gpu.py --out runs/width --budgets '' --search-start 0 --harness-rounds 0 --width-table 2,4,8,16,30
                                                    # only the budget-by-width table

What it runs, all with phonetune's own code (config loading, model building, sampler, loader,
`phonetune.train.loop.train_step`) and the recipe `configs/xlsr53_espeak_cv.yaml` (bf16 autocast, SpecAugment,
LayerDrop 0.1, frozen feature encoder) on the architecture of `configs/xlsr53_architecture.json`
(XLSR-53's config.json values, randomly initialised: the weights do not change the work of a step):

1. The card's bf16 matrix-multiply rate, measured (8192^3 products, CUDA events), next to the
   datasheet's dense bf16 rate.
2. For each `--budgets` value B (seconds of audio per batch, padding included): `--steps` timed
   optimizer steps after `--warmup` untimed ones, the whole transformer training
   (`train.freeze_finetune_updates=0`); audio seconds per second, padding, peak memory
   (`torch.cuda.max_memory_allocated`, and reserved). Model FLOPs per audio second are counted
   with `torch.utils.flop_counter.FlopCounterMode` over two further steps (forward and backward
   operations as dispatched, so LayerDrop's skipped layers are not counted); model FLOPs
   utilisation = throughput x FLOPs per audio second / the card's bf16 rate.
3. The largest budget whose longest batch (the sampler puts it first) trains one step without
   running out of memory: doubling from `--search-start` (halving if that does not fit), then
   bisection to 10%. Every memory measurement runs one step with every layer (LayerDrop off for
   that step: the worst case, not a step that happened to skip layers).
4. With `--width-table W1,W2,...` (seconds; needs a GPU): a budget by batch width for
   `train.batch_seconds_by_width` (NeMo's OOMptimizer idea). For each width w, the most clips of
   w seconds (padded as the sampler pads: w rounded down to `train.pad_to_multiple_of`, random
   phones at the corpus's phone rate) whose training step fits in memory, by the same doubling
   and bisection (to 5%), from 160 s of clips at the narrowest width and from the previous width's
   seconds after it. The budget of w is `--width-margin` (0.9) x the seconds that fitted (see
   `budget_table`). Writes `width_table.yaml` (a config's `train:` section) to `--out` and prints the
   command-line override. `--memory-gib G` caps what this process may allocate on the card at
   G GiB for every phase but the harness (torch.cuda.set_per_process_memory_fraction: running out
   of memory then happens at the cap), to size a table for a smaller card or to leave room.
5. Unless `--harness-rounds 0`: `scripts/bench_train.py` (phonetune vs the Hugging Face Trainer recipe vs
   the compute limit) at XLSR-53 size in bf16 on the same kind of corpus.

The corpus is synthetic (no dataset can be downloaded here): a prepared dataset (docs/formats.md)
of noise clips with uniformly distributed durations (`--min-seconds`..`--max-seconds`, Common
Voice's clips are mostly 2 to 8 s) and random phone strings of the released model's 392-token
vocabulary at 12 phones per second. Speed does not depend on what the audio says.
Writes `bench_gpu.json` (and the harness's logs) to `--out`; the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_train import write_benchmarks  # noqa: E402  (one way to rewrite a BENCHMARKS.md section)

from phonetune.data.audio import SAMPLE_RATE  # noqa: E402
from phonetune.data.vocab import SPECIAL_TOKENS  # noqa: E402

RECIPE = REPO / "configs" / "xlsr53_espeak_cv.yaml"
ARCHITECTURE = REPO / "configs" / "xlsr53_architecture.json"
BENCHMARKS_HEADING = "## GPU: `scripts/bench_gpu.py`"
EARLIER_GPU_HEADING = "\n## GPU, earlier sessions"  # the generated section goes before it
# Dense bf16 tensor-core rates from NVIDIA's datasheets (FLOP/s, without sparsity).
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
WIDTH_SEARCH_START = 160.0  # seconds of clips tried first at the narrowest --width-table width
WIDTH_TOLERANCE = 0.05  # bisection of clip counts to 5%: what is left is lost under the margin
# What the budget table keeps of each width's measurement (and the markdown shows).
TABLE_COLUMNS = ("width", "samples", "clips", "seconds", "peak_allocated_gib", "peak_reserved_gib")


# --- the synthetic corpus --------------------------------------------------------------------------
def write_synthetic_prepared(
    out: Path, clips: int, seed: int, min_seconds: float, max_seconds: float
) -> Path:
    """A prepared dataset of `clips` noise clips (train) and a few dev clips, in docs/formats.md's
    columns, with the released model's vocabulary."""
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()
    from phonetune.data.vocab import load_released_vocab, save_vocab

    vocab = load_released_vocab()
    phones = np.array([token for token in vocab if token not in SPECIAL_TOKENS])
    # A stream of its own: numpy's default_rng([s, 0]) is default_rng(s), the sampler's draws for
    # epoch 0 of seed s, which would otherwise sort each duration bucket by length (too little
    # padding to be true of real data).
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    splits = {}
    for split, count in (("train", clips), ("dev", max(4, clips // 100))):
        samples = np.round(rng.uniform(min_seconds, max_seconds, count) * SAMPLE_RATE).astype(
            np.int64
        )
        offsets = np.concatenate([[0], np.cumsum(samples)]).astype(np.int64)
        audio = rng.normal(0.0, 3000.0, int(offsets[-1])).clip(-32768, 32767).astype(np.int16)
        texts = [" ".join(rng.choice(phones, max(1, int(n / SAMPLE_RATE * 12)))) for n in samples]
        table = pa.table(
            {
                "audio": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(audio)),
                "phones": texts,
                "num_phones": pa.array([len(t.split()) for t in texts], pa.int32()),
                "locale": ["xx"] * count,
                "split": [split] * count,
                "duration": pa.array(samples / SAMPLE_RATE, pa.float32()),
                # wav2vec 2.0's feature encoder: a 400-sample receptive field, a 320-sample hop
                "num_frames": pa.array((samples - 400) // 320 + 1, pa.int32()),
                "client_id": ["synthetic"] * count,
                "sentence": [""] * count,
                "path": [f"xx/clips/{split}_{i}.mp3" for i in range(count)],
            }
        )
        splits[split] = datasets.Dataset(
            datasets.table.InMemoryTable(table), fingerprint=f"synthetic_{split}_{count}_{seed}"
        )
    datasets.DatasetDict(splits).save_to_disk(str(out))
    save_vocab(vocab, out / "vocab.json")
    report = {"versions": {"phonetune": "synthetic"}, "synthetic": {"clips": clips, "seed": seed}}
    (out / "prep_report.json").write_text(json.dumps(report), encoding="utf-8")
    return out


# --- measurements ----------------------------------------------------------------------------------
def measure_matmul_rate() -> float:
    """bf16 FLOP/s of 8192^3 matrix products on fresh random data (median of 10 after 3 warm-ups)."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for index in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if index >= 3:
            times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / float(np.median(times))


def datasheet_rate(gpu_name: str) -> float | None:
    for key, value in DATASHEET_BF16.items():  # "H100 PCIe" is looked for before "H100"
        if all(part in gpu_name for part in key.split()):
            return value
    return None


class Bench:
    """phonetune's training pieces, set up once (as `phonetune.train.loop.set_up` sets them up)."""

    def __init__(self, config) -> None:  # noqa: ANN001 - Config
        import torch

        from phonetune.train.batching import drop_unalignable, load_training_data
        from phonetune.train.model import CTCModel, build_model, count_parameters
        from phonetune.train.parallel import make_parallel
        from phonetune.train.resume import seed_everything
        from phonetune.train.schedule import make_optimizer

        self.config = config
        self.parallel = make_parallel(config)
        self.data = load_training_data(config)
        seed_everything(config.train.seed)
        model, _ = build_model(config.model, self.data.vocab)
        module = CTCModel.for_training(model, config.train.compile)
        drop_unalignable(self.data, module.conv_layers, config)
        self.trainable, self.total = count_parameters(module)
        optimizer = make_optimizer(module, config)
        # A constant learning rate: the schedule does not change the work of a step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        self.module, self.optimizer = self.parallel.prepare(module, optimizer)
        self.module.train()
        self.cuda = self.parallel.device.type == "cuda"
        self.shapes_seen: set[tuple[int, ...]] = set()

    def batches(self, budget: float):  # -> an endless iterator of StepBatches
        """Steps of one process with `budget` seconds per batch, as the training loop takes them."""
        import dataclasses

        from phonetune.train.batching import BatchStream, make_sampler
        from phonetune.train.resume import TrainState

        config = dataclasses.replace(
            self.config, train=dataclasses.replace(self.config.train, batch_seconds=budget)
        )
        stream = BatchStream(self.data, make_sampler(self.data, config), config, self.cuda)
        state = TrainState()
        while True:
            yield stream.next_step(state)

    def step(self, step):  # noqa: ANN001, ANN201 - StepBatches -> StepResult
        from phonetune.train.loop import train_step

        self.shapes_seen.update(tuple(batch.input_values.shape) for batch in step.batches)
        return train_step(
            self.module,
            self.optimizer,
            self.scheduler,
            step,
            self.parallel,
            self.config,
            freeze_transformer=False,
        )

    def synchronize(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self) -> None:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gib(self) -> dict:
        import torch

        if not self.cuda:
            return {}
        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        }

    def time_budget(self, budget: float, warmup: int, steps: int, flop_steps: int) -> dict:
        from torch.utils.flop_counter import FlopCounterMode

        self.reset_memory()
        stream = self.batches(budget)
        started = time.perf_counter()
        for done in range(
            1, warmup + 1
        ):  # the longest batch of the epoch comes first: it is in here
            self.step(next(stream))
            if done % 25 == 0:  # a long warm-up (compilation, CUDA graph recording) shows progress
                self.synchronize()
                print(
                    f"warm-up at {budget:g} s: {done}/{warmup} steps, "
                    f"{time.perf_counter() - started:.1f} s, {len(self.shapes_seen)} batch shapes",
                    flush=True,
                )
        self.synchronize()
        audio = padded = 0.0
        started = time.perf_counter()
        for _ in range(steps):
            result = self.step(next(stream))
            audio += result.audio_seconds
            padded += result.padded_seconds
        self.synchronize()
        wall = time.perf_counter() - started
        memory = self.peak_memory_gib()
        flops = counted_audio = counted_padded = 0.0
        for _ in range(flop_steps):
            with FlopCounterMode(display=False) as counter:
                result = self.step(next(stream))
                self.synchronize()
            flops += counter.get_total_flops()
            counted_audio += result.audio_seconds
            counted_padded += result.padded_seconds
        return {
            "batch_seconds": budget,
            "steps": steps,
            "audio_s": round(audio, 2),
            "wall_s": round(wall, 4),
            "audio_s_per_s": round(audio / wall, 2),
            "step_s": round(wall / steps, 4),
            "padding_fraction": round(1 - audio / padded, 4) if padded else 0.0,
            "model_flop_per_audio_s": flops / counted_audio if counted_audio else None,
            "model_flop_per_padded_s": flops / counted_padded if counted_padded else None,
            "batch_shapes_seen": len(self.shapes_seen),
            **memory,
        }

    def profile(self, budget: float, warmup: int, steps: int, path: Path) -> dict:
        """torch.profiler over `steps` steps: operators by self CPU time and by device time
        (written to `path`), and per step: host time, device kernel time, kernel launches, host
        synchronisations (calls that wait for the device), and the attention kernels that ran."""
        from torch.profiler import ProfilerActivity, profile

        stream = self.batches(budget)
        for _ in range(warmup):
            self.step(next(stream))
        self.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        started = time.perf_counter()
        with profile(activities=activities) as profiler:
            for _ in range(steps):
                self.step(next(stream))
            self.synchronize()
        wall = time.perf_counter() - started
        averages = profiler.key_averages()
        tables = [f"# {steps} steps at a {budget:g} s budget, after {warmup} untimed ones"]
        for key in ("self_cpu_time_total", "self_device_time_total" if self.cuda else None):
            if key:
                tables += [f"## by {key}", averages.table(sort_by=key, row_limit=40)]
        path.write_text("\n".join(tables), encoding="utf-8")
        syncs = ("Synchronize", "cudaMemcpy ", "cudaMemcpy\t")
        launches = ("LaunchKernel", "cuLaunch", "cudaGraphLaunch")
        summary = {
            "budget": budget,
            "steps": steps,
            "wall_s_per_step": round(wall / steps, 4),
            "host_syncs_per_step": sum(
                e.count for e in averages if any(n in e.key + " " for n in syncs)
            )
            / steps,
            "sync_calls": {e.key: e.count for e in averages if "Synchronize" in e.key},
            "kernel_launches_per_step": sum(
                e.count for e in averages if any(n in e.key for n in launches)
            )
            / steps,
        }
        if self.cuda:
            kernels = [e for e in averages if e.device_type.name == "CUDA"]
            summary["device_kernel_s_per_step"] = round(
                sum(e.self_device_time_total for e in kernels) / 1e6 / steps, 4
            )
            attention = ("fmha", "flash", "attention", "sdpa", "mha", "efficient")
            summary["attention_kernels"] = sorted(
                {e.key for e in kernels if any(n in e.key.lower() for n in attention)}
            )[:8]
        print(json.dumps(summary), flush=True)
        return summary

    def fits(self, budget: float) -> tuple[bool, dict]:
        """Whether one step on the worst batch of this budget runs without running out of memory:
        the longest clips of the corpus, as many as the budget holds."""
        from phonetune.data.prepared import pack_batches
        from phonetune.train.batching import collate

        t = self.config.train
        durations = self.data.train.durations[self.data.train_rows]
        # (The sampler's first batch holds the longest clip, but with a large budget it is the
        # remainder of the packing, far from full.)
        longest = pack_batches(np.argsort(-durations, kind="stable"), durations, budget)[0]
        rows = self.data.train_rows[longest]
        memory = self.try_step(
            lambda: collate(self.data.train, rows, self.data.vocab, t.pad_to_multiple_of)
        )
        if memory is None:
            return False, {"batch_seconds": budget, "fits": False}
        return True, {"batch_seconds": budget, "fits": True, "clips": len(rows), **memory}

    def fits_clips(self, clips: int, samples: int, phones: int) -> tuple[bool, dict]:
        """Whether one step on `clips` clips of `samples` samples with `phones` phones each runs
        without running out of memory."""
        phone_ids = [i for token, i in self.data.vocab.items() if token not in SPECIAL_TOKENS]
        memory = self.try_step(lambda: synthetic_batch(clips, samples, phones, phone_ids))
        if memory is None:
            return False, {"clips": clips, "fits": False}
        return True, {"clips": clips, "fits": True, **memory}

    def try_step(self, make_batch) -> dict | None:  # noqa: ANN001 - () -> Batch
        """The peak memory of one training step on the batch `make_batch()` makes, every layer
        run; None when it runs out of memory."""
        import torch

        from phonetune.train.batching import StepBatches

        self.reset_memory()
        try:
            batch = make_batch()
            tokens, samples = int(batch.label_lengths.sum()), batch.input_values.numel()
            with self.every_layer():
                self.step(StepBatches([batch], float(tokens), 0.0, samples / SAMPLE_RATE))
            self.synchronize()
        except torch.OutOfMemoryError:
            # (the traceback holds the step's tensors until this block ends: freed below)
            memory = None
        else:
            memory = self.peak_memory_gib()
        self.reset_memory()
        return memory

    @contextlib.contextmanager
    def every_layer(self):  # noqa: ANN201 - a context manager
        """LayerDrop off inside: a memory measurement needs the step that runs every layer, the
        largest one, not a step that happened to skip some (each skipped layer saves its
        activations: ~10% of them at XLSR-53's 0.1 over 24 layers)."""
        config = self.parallel.unwrap(self.module).model.config
        drop, config.layerdrop = config.layerdrop, 0.0
        try:
            yield
        finally:
            config.layerdrop = drop

    def largest_budget(self, start: float, limit: float) -> dict:
        longest = float(self.data.train.durations[self.data.train_rows].max())
        found = search_largest(self.fits, start, limit, lowest=longest, unit="s")
        return {
            "largest_fitting_batch_seconds": found["largest_fitting"],
            "smallest_failing_batch_seconds": found["smallest_failing"],
            "searched_up_to": limit,
            "trials": found["trials"],
        }

    def largest_clips(self, width: float, start: int, memory_bytes: int) -> dict:
        """The most clips of `width` seconds, padded as the sampler pads a batch of that width,
        whose training step fits in `memory_bytes`; the search from `start` clips."""
        samples = padded_width_samples(width, self.config.train.pad_to_multiple_of)
        phones = max(1, round(corpus_phone_rate(self.data) * samples / SAMPLE_RATE))
        # More clips than this could not hold even their fp32 audio: the doubling stops there.
        limit = max(1, memory_bytes // (4 * samples))
        found = search_largest(
            lambda clips: self.fits_clips(clips, samples, phones),
            start,
            limit,
            lowest=1,
            tolerance=WIDTH_TOLERANCE,
            unit="clips",
        )
        return width_record(width, samples, phones, found)


# --- the search and the budget table by width -----------------------------------------------------
def search_largest(
    fits,  # noqa: ANN001 - value -> (fits, record)
    start: float,
    limit: float,
    lowest: float = 1,
    tolerance: float = 0.1,
    unit: str = "",
) -> dict:
    """The largest value (a batch budget, a clip count) in [lowest, limit] for which `fits`
    says a step fits in memory: doubling from `start` (at most `limit`) while it fits (halving
    while it does not),
    then bisection until the failing value is within `tolerance` of the fitting one, or within 1
    (values are whole numbers: clips, or whole seconds). Returns the largest value that fitted
    (None: none did), the smallest that failed (None: none did up to `limit`), and every trial's
    record in order."""
    trials: list[dict] = []
    good = bad = None

    def attempt(value: float) -> bool:
        ok, record = fits(value)
        trials.append(record)
        print(f"  {value:g} {unit}: {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    value = min(start, limit)
    while lowest <= value <= limit and (good is None or bad is None):
        if attempt(value):
            good, value = value, value * 2
        else:
            bad, value = value, round(value / 2)
    while good is not None and bad is not None and bad - good > max(tolerance * good, 1):
        middle = round((good + bad) / 2)  # strictly between them: they are more than 1 apart
        good, bad = (middle, bad) if attempt(middle) else (good, middle)
    return {"largest_fitting": good, "smallest_failing": bad, "trials": trials}


def padded_width_samples(width: float, pad_to_multiple_of: int) -> int:
    """The widest batch (in samples) that a budget entry for `width` seconds covers: the sampler
    rounds batch widths up to multiples of `pad_to_multiple_of` and gives a batch the entry of
    the narrowest width at least as wide as that, so the widest is `width` rounded down."""
    samples = round(width * SAMPLE_RATE) // pad_to_multiple_of * pad_to_multiple_of
    if samples == 0:
        raise ValueError(
            f"a width of {width:g} s holds no batch padded to multiples of {pad_to_multiple_of} "
            "samples (train.pad_to_multiple_of)"
        )
    return samples


def corpus_phone_rate(data) -> float:  # noqa: ANN001 - TrainingData
    """Phones per second of audio over the training clips."""
    rows = data.train_rows
    phones = np.asarray(data.train.column("num_phones", rows), dtype=np.float64)
    return float(phones.sum() / data.train.durations[rows].sum())


def synthetic_batch(clips: int, samples: int, phones: int, phone_ids: list[int], seed: int = 0):  # noqa: ANN201 - Batch
    """`clips` clips of `samples` samples each, none padded (the sampler's batch of that width,
    filled), their audio normalised noise (zero mean, unit variance, as `collate` normalises),
    each with `phones` random phones of `phone_ids` as its labels."""
    import torch

    from phonetune.train.batching import Batch

    generator = torch.Generator().manual_seed(seed)
    choices = torch.randint(len(phone_ids), (clips, phones), generator=generator)
    return Batch(
        input_values=torch.randn(clips, samples, generator=generator),
        input_lengths=torch.full((clips,), samples, dtype=torch.long),
        weights=torch.ones(clips),
        labels=torch.tensor(phone_ids, dtype=torch.long)[choices],
        label_lengths=torch.full((clips,), phones, dtype=torch.long),
        samples=[samples] * clips,
        phone_counts=[phones] * clips,
    )


def width_record(width: float, samples: int, phones: int, found: dict) -> dict:
    """One width's measurement from `search_largest`'s result: the most clips that fitted, the
    padded seconds they hold, and the peak memory of that step."""
    clips = found["largest_fitting"]
    peak = next((t for t in found["trials"] if t["fits"] and t["clips"] == clips), {})
    return {
        "width": width,
        "samples": samples,
        "phones_per_clip": phones,
        "clips": clips,
        "seconds": clips * samples / SAMPLE_RATE if clips else None,
        "smallest_failing_clips": found["smallest_failing"],
        "peak_allocated_gib": peak.get("peak_allocated_gib"),
        "peak_reserved_gib": peak.get("peak_reserved_gib"),
        "trials": found["trials"],
    }


def budget_table(
    measured: list[dict], margin: float, batch_seconds: float, max_duration: float | None = None
) -> dict:
    """`train.batch_seconds_by_width` from the measurements by width (`width_record`'s): each
    width's budget is `margin` x the padded seconds of the most clips of that width that trained
    one step, rounded down to 0.1 s.

    Why a budget measured at a bin's upper edge w holds for every batch of that bin: the sampler
    gives a batch of width w' in (previous width, w] the budget B = margin x n x w (n clips of w
    fitted; widths here are padded widths, w the entry's width rounded down to
    train.pad_to_multiple_of as the sampler rounds w' up to it) and packs at most n' clips with n' x w' <= B. Such a batch holds no more padded audio
    than B < n x w, so every cost linear in the audio (convolutions, projections, feed-forward
    layers, their activations) is below the measured step's; its attention, and CTC's alignment
    table, grow as clips x width^2: n' x w'^2 <= B x w' <= B x w < n x w^2, again below what was
    measured. (Only costs per clip, not per second, could grow with more, shorter clips: small
    next to the audio's.) The margin leaves room for what one measured step does not see: memory
    fragmentation over a run, and under several processes a share holding one clip more than its
    budget (train.batch_seconds' note) and DDP's gradient buckets.

    Batches wider than the widest width get `train.batch_seconds` (`BatchBudget`): that is measured
    by nothing here, so a note says when `batch_seconds` is larger than the widest width's budget
    (those batches would hold more audio than any measured step), when clips up to `max_duration`
    are wider than the widest width (their attention is larger than measured at any budget), and
    when a width fits no budget (no clip fitted, or margin x what fitted is less than one clip:
    the config refuses a budget smaller than its width); such widths are left out of the table.
    """
    rows, notes = [], []
    for record in sorted(measured, key=lambda r: r["width"]):
        width, seconds = record["width"], record["seconds"]
        # Rounded down to 0.1 s (after rounding away float noise: 0.9 x 520 is 468.00000000000006,
        # some products land just below their decimal value).
        budget = math.floor(round(margin * seconds * 10, 6)) / 10 if seconds else None
        if budget is not None and budget < width:
            budget = None
        if budget is None:
            notes.append(
                f"{width:g} s: {record['clips'] or 'no'} clip(s) fitted, so no budget holds one "
                f"clip with the margin {margin:g}; left out of the table"
            )
        row = {key: record.get(key) for key in TABLE_COLUMNS}
        rows.append({**row, "budget": budget})
    table = {row["width"]: row["budget"] for row in rows if row["budget"] is not None}
    if table:
        widest = max(table)
        if batch_seconds > table[widest]:
            notes.append(
                f"train.batch_seconds ({batch_seconds:g} s) is larger than the budget of the "
                f"widest width ({table[widest]:g} s at {widest:g} s): batches wider than "
                f"{widest:g} s would hold more than any measured step; lower it or measure wider"
            )
        if max_duration is not None and max_duration > widest:
            notes.append(
                f"clips up to data.max_duration ({max_duration:g} s) are wider than the widest "
                f"width measured ({widest:g} s): their batches get train.batch_seconds, unmeasured; "
                f"add {max_duration:g} to --width-table"
            )
    else:
        notes.append("no width fitted a budget: the table is empty")
    return {
        "margin": margin,
        "batch_seconds": batch_seconds,
        "rows": rows,
        "batch_seconds_by_width": table,
        "override": budget_override(table),
        "notes": notes,
    }


def budget_override(table: dict[float, float]) -> str:
    """The command-line override that sets `table` (a YAML flow mapping, as the config reads it)."""
    return f"train.batch_seconds_by_width={flow_mapping(table)}"


def flow_mapping(table: dict[float, float]) -> str:
    """`{2: 576, 4: 460.8}`: every number exact (repr, not a rounding %g), `null` when empty."""
    if not table:
        return "null"
    pairs = (f"{exact_number(w)}: {exact_number(s)}" for w, s in sorted(table.items()))
    return "{" + ", ".join(pairs) + "}"


def exact_number(value: float) -> str:
    """`576` for 576.0, `460.8` for 460.8: the shortest text that reads back as the same float."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_width_yaml(table: dict, path: Path, origin: str) -> None:
    """The table as a config's `train:` section, to merge into a recipe; `origin` (the card and
    the command) goes into its comments."""
    lines = [
        f"# train.batch_seconds_by_width measured by scripts/bench_gpu.py --width-table: {origin};",
        f"# budget = {table['margin']:g} x the seconds of the most clips of each width that trained",
        "# one step. Merge into a config's train: section, or give on the command line:",
        f"#   {shlex.quote(table['override'])}",
        *(f"# note: {note}" for note in table["notes"]),
        "train:",
        f"  batch_seconds_by_width: {flow_mapping(table['batch_seconds_by_width'])}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_harness(args: argparse.Namespace, prepared: Path, overrides: list[str]) -> dict:
    """scripts/bench_train.py at XLSR-53 size; its JSON result (its last line)."""
    command = [
        sys.executable,
        str(REPO / "scripts" / "bench_train.py"),
        "--prepared-dir",
        str(prepared),
        "--config",
        str(args.config),
        "--rounds",
        str(args.harness_rounds),
        "--steps",
        str(args.harness_steps),
        "--warmup-steps",
        str(args.harness_warmup),
        "--work-dir",
        str(args.out / "harness"),
        "--no-write",
        *overrides,
        f"train.batch_seconds={args.harness_budget}",
    ]
    print(" ".join(command), flush=True)
    completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    print(completed.stdout, flush=True)
    if completed.returncode != 0:
        return {"error": f"bench_train.py exited {completed.returncode}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def check_widths(widths: list[float], pad_to_multiple_of: int) -> None:
    """Stops with a one-line error (before the model is built) on a width narrower than one
    padding multiple."""
    try:
        for width in widths:
            padded_width_samples(width, pad_to_multiple_of)
    except ValueError as error:
        raise SystemExit(f"--width-table: {error}") from None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def describe_machine() -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    info["cpu_count"] = os.cpu_count()
    return info


def run(args: argparse.Namespace) -> dict:
    import torch

    from phonetune.train.config import load_config

    args.out.mkdir(parents=True, exist_ok=True)
    model_overrides = (
        ["model.name_or_path=null", f"model.config={args.architecture.resolve()}"]
        if args.architecture
        else []
    )
    overrides = [
        *model_overrides,
        "train.freeze_finetune_updates=0",  # time the main phase: the whole transformer trains
        "data.locales=null",  # the synthetic corpus has one locale, "xx"
        "log.report_to=[]",
        "train.grad_accum=1",  # one batch per step, as the Trainer recipe of the harness
        *args.overrides,
    ]
    result: dict = {
        "machine": describe_machine(),
        "config": str(args.config),
        "overrides": overrides,
        "harness_budget": args.harness_budget,
        "label": args.label,
        "command": " ".join(["python", "scripts/bench_gpu.py", *args.argv]),
    }

    def save() -> None:  # after every phase: a run cut short still leaves what it measured
        (args.out / "bench_gpu.json").write_text(json.dumps(result, indent=1), encoding="utf-8")

    if torch.cuda.is_available():
        result["memory_limit_gib"] = cap_memory(args.memory_gib)
        result["matmul_bf16_flop_per_s"] = measure_matmul_rate()
        result["datasheet_bf16_flop_per_s"] = datasheet_rate(result["machine"]["gpu"])
        print(f"bf16 matmul: {result['matmul_bf16_flop_per_s'] / 1e12:.0f} TFLOP/s", flush=True)

    started = time.perf_counter()
    sweep_corpus = write_synthetic_prepared(
        args.out / "corpus_sweep", args.clips, 0, args.min_seconds, args.max_seconds
    )
    print(f"synthetic corpus: {time.perf_counter() - started:.1f} s", flush=True)
    config = load_config(
        args.config,
        [f"data.prepared_dir={sweep_corpus}", f"run.output_dir={args.out / 'unused'}", *overrides],
    )
    check_widths(args.width_table, config.train.pad_to_multiple_of)
    bench = Bench(config)
    # what the step really ran with (a trained weight's dtype)
    weight = next(p for p in bench.module.parameters() if p.requires_grad)
    result["weights_dtype"] = str(weight.dtype).removeprefix("torch.")
    result["parameters"] = {"trainable": bench.trainable, "total": bench.total}
    result["mixed_precision"] = config.train.mixed_precision
    result["gradient_checkpointing"] = config.model.gradient_checkpointing
    result["budgets"] = []
    for budget in args.budgets:
        record = bench.time_budget(budget, args.warmup, args.steps, args.flop_steps)
        if record["model_flop_per_audio_s"] is None and args.model_flop_per_audio_s:
            # FlopCounterMode does not see inside compiled blocks: the eager count of the same model
            record["model_flop_per_audio_s"] = args.model_flop_per_audio_s
        for name in ("matmul_bf16_flop_per_s", "datasheet_bf16_flop_per_s"):
            rate = result.get(name)
            if rate and record["model_flop_per_audio_s"]:
                key = "mfu_vs_" + name.split("_")[0]
                record[key] = round(
                    record["audio_s_per_s"] * record["model_flop_per_audio_s"] / rate, 4
                )
        result["budgets"].append(record)
        save()
        print(json.dumps(record), flush=True)
    if args.profile_budget:
        profiled = bench.profile(args.profile_budget, args.warmup, 4, args.out / "profile.txt")
        result["profile"] = profiled
        save()
    if config.train.compile:  # graphs, graph breaks, recompilations: did the blocks stay compiled?
        from torch._dynamo.utils import counters

        result["dynamo_counters"] = {
            group: {str(k): v for k, v in values.items()}
            for group, values in counters.items()
            if group in ("stats", "graph_break", "recompiles", "inductor")
        }
        save()
    if bench.cuda and args.search_start > 0:
        total_seconds = float(bench.data.train.durations[bench.data.train_rows].sum())
        print("largest batch budget:", flush=True)
        result["largest"] = bench.largest_budget(args.search_start, 0.9 * total_seconds)
        save()
    if bench.cuda and args.width_table:
        write_width_table(bench, args, config, result, save)
    del bench
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if args.harness_rounds > 0:
        harness_corpus = write_synthetic_prepared(
            args.out / "corpus_harness", args.harness_clips, 1, args.min_seconds, args.max_seconds
        )
        result["harness"] = run_harness(args, harness_corpus, overrides)
        save()
    return result


def cap_memory(memory_gib: float | None) -> float:
    """Caps what this process may allocate on the card at `memory_gib` (None: the whole card);
    returns the cap in GiB."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    if memory_gib is None:
        return round(total / 2**30, 2)
    if memory_gib * 2**30 > total:
        raise SystemExit(
            f"--memory-gib {memory_gib:g} is more than the card has ({total / 2**30:.1f} GiB)"
        )
    torch.cuda.set_per_process_memory_fraction(memory_gib * 2**30 / total)
    return memory_gib


def write_width_table(bench: Bench, args: argparse.Namespace, config, result: dict, save) -> None:  # noqa: ANN001 - Config, () -> None
    """The --width-table phase: measures every width into `result["width_table"]` (saved after
    each), adds the budget table, writes width_table.yaml and prints the override."""
    measured: list[dict] = []
    result["width_table"] = {"measured": measured}
    limit = round(result["memory_limit_gib"] * 2**30)
    for record in measure_widths(bench, args.width_table, limit):
        measured.append(record)
        save()
    t = config.train
    table = budget_table(measured, args.width_margin, t.batch_seconds, config.data.max_duration)
    result["width_table"].update(table)
    origin = (
        f"{result['machine']['gpu']}, {result['memory_limit_gib']:g} GiB, `{result['command']}`"
    )
    write_width_yaml(table, args.out / "width_table.yaml", origin)
    save()
    print(f"wrote {args.out / 'width_table.yaml'}; as an override:", flush=True)
    print(f"  {shlex.quote(table['override'])}", flush=True)
    for note in table["notes"]:
        print(f"  note: {note}", flush=True)


def measure_widths(bench: Bench, widths: list[float], memory_bytes: int):  # noqa: ANN201 - Iterator[dict]
    """For each width in turn, the most clips of it that train one step in `memory_bytes`
    (`Bench.largest_clips`'s record)."""
    first = padded_width_samples(widths[0], bench.config.train.pad_to_multiple_of)
    # AdamW makes its moments at its first step and every later step holds them: a one-clip step
    # first, so that every measured step holds them too (as in training).
    bench.fits_clips(1, first, 1)
    seconds = WIDTH_SEARCH_START
    for width in widths:
        print(f"most clips of {width:g} s:", flush=True)
        record = bench.largest_clips(width, max(1, round(seconds / width)), memory_bytes)
        yield record
        # The next, wider width fits fewer seconds: its search starts from this one's.
        seconds = record["seconds"] or seconds


# --- BENCHMARKS.md ---------------------------------------------------------------------------------
def markdown_section(results: list[dict]) -> str:
    """The GPU section of BENCHMARKS.md: one table over every run given (e.g. before and after a
    change, or eager and compiled), each row labelled with its run."""
    first = results[0]
    m = first["machine"]
    lines = [
        BENCHMARKS_HEADING,
        "",
        f"Card: **{m.get('gpu', 'no GPU')}** ({m.get('gpu_memory_gib')} GiB, "
        f"{m.get('multiprocessors')} SMs, CUDA {m.get('cuda')}), {m['cpu_count']} CPU cores; "
        f"torch {m['torch']}, transformers {m['transformers']}. Model: XLSR-53 architecture "
        f"({first['parameters']['total'] / 1e6:.1f} M parameters, "
        f"{first['parameters']['trainable'] / 1e6:.1f} M trained: the feature encoder is frozen), "
        f"random init, `{Path(first['config']).name}`; mixed precision {first['mixed_precision']}. "
        "Synthetic corpus (noise clips of 2-8 s, random phones at 12/s; see the script's "
        "docstring).",
        "",
    ]
    if first.get("matmul_bf16_flop_per_s"):
        sheet = first.get("datasheet_bf16_flop_per_s")
        lines += [
            f"bf16 matrix product (8192^3) measured on this card: "
            f"{first['matmul_bf16_flop_per_s'] / 1e12:.0f} TFLOP/s"
            + (f"; datasheet dense bf16: {sheet / 1e12:.0f} TFLOP/s." if sheet else "."),
            "",
        ]
    lines += [
        "| run | batch budget (s) | step (s) | audio s/s | padding | model TFLOP per audio s | MFU (datasheet) | MFU (measured matmul) | peak allocated (GiB) | peak reserved (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for r in result["budgets"]:
            flops = r.get("model_flop_per_audio_s")
            lines.append(
                f"| {result.get('label') or '-'} | {r['batch_seconds']:g} | {r['step_s']:.3f} | "
                f"{r['audio_s_per_s']:.0f} | {100 * r['padding_fraction']:.1f}% | "
                f"{flops / 1e12 if flops else float('nan'):.3f} | "
                f"{100 * r.get('mfu_vs_datasheet', float('nan')):.1f}% | "
                f"{100 * r.get('mfu_vs_matmul', float('nan')):.1f}% | "
                f"{r.get('peak_allocated_gib', '-')} | {r.get('peak_reserved_gib', '-')} |"
            )
    for result in results:
        lines += section_notes(result)
    lines += ["", "Commands:", ""]
    lines += [
        f"- {r.get('label') or '-'}: `{r.get('command', 'python scripts/bench_gpu.py')}`"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def section_notes(result: dict) -> list[str]:
    """A run's profile, largest batch and harness, where it measured them."""
    label, lines = result.get("label") or "-", []
    profiled = result.get("profile")
    if profiled:
        kernels = profiled.get("device_kernel_s_per_step")
        lines += [
            "",
            f"{label}, profile of {profiled['steps']} steps at {profiled['budget']:g} s "
            f"(torch.profiler): {profiled['wall_s_per_step']:.3f} s per step, "
            + (f"{kernels:.3f} s of device kernels, " if kernels is not None else "")
            + f"{profiled['kernel_launches_per_step']:.0f} kernel launches and "
            f"{profiled['host_syncs_per_step']:.1f} host synchronisations per step "
            f"({', '.join(f'{k} x{v}' for k, v in profiled.get('sync_calls', {}).items()) or 'none'}); "
            f"attention kernels: {', '.join(f'`{k}`' for k in profiled.get('attention_kernels', [])) or 'none seen'}.",
        ]
    largest = result.get("largest")
    if largest:
        fitting = [t for t in largest["trials"] if t["fits"]]
        peak = max(fitting, key=lambda t: t["batch_seconds"]) if fitting else {}
        checkpointing = result.get("gradient_checkpointing", False)
        lines += [
            "",
            f"{label}, largest batch budget that trains (one step on a batch of the corpus's "
            f"longest clips filling the budget, gradient checkpointing "
            f"{'on' if checkpointing else 'off'}): **{largest['largest_fitting_batch_seconds']} s** "
            f"(peak allocated {peak.get('peak_allocated_gib')} GiB); "
            + (
                f"{largest['smallest_failing_batch_seconds']} s ran out of memory."
                if largest["smallest_failing_batch_seconds"]
                else f"the search stopped at the corpus size ({largest['searched_up_to']:.0f} s) without running out of memory."
            ),
        ]
    if result.get("width_table", {}).get("rows"):
        lines += width_table_lines(result, label)
    harness = result.get("harness")
    if harness and "error" not in harness:
        lines += [
            "",
            f"{label}, `scripts/bench_train.py` at this size ({harness.get('rounds')} rounds x "
            f"{harness.get('steps_per_round')} steps, batch budget {result.get('harness_budget')} s): phonetune "
            f"{harness['phonetune_audio_s_per_s']:.0f} audio s/s, the Hugging Face Trainer recipe "
            f"{harness['reference_audio_s_per_s']:.0f}, the compute limit {harness['limit_audio_s_per_s']:.0f}; "
            f"phonetune / reference **{harness['phonetune_audio_s_per_s'] / harness['reference_audio_s_per_s']:.2f}x**, "
            f"phonetune / limit **{harness['phonetune_audio_s_per_s'] / harness['limit_audio_s_per_s']:.2f}**, "
            f"padding {100 * harness['padding_fraction']:.1f}%.",
        ]
    elif harness:
        lines += ["", f"{label}: the `bench_train.py` harness failed: {harness['error']}."]
    return lines


def width_table_lines(result: dict, label: str) -> list[str]:
    """A run's budget table by width (`--width-table`) as a markdown table, its override and notes."""
    table = result["width_table"]
    lines = [
        "",
        f"{label}, batch budget by width (`--width-table`, memory limit "
        f"{result.get('memory_limit_gib')} GiB): the most clips of each width whose step trains "
        "(every clip as wide as the width, every layer run), and the budget = "
        f"{table['margin']:g} x their seconds:",
        "",
        "| width (s) | clips | batch seconds | budget (s) | peak allocated / reserved (GiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in table["rows"]:
        seconds, budget = row["seconds"], row["budget"]
        lines.append(
            f"| {row['width']:g} | {row['clips'] or 0} | "
            f"{f'{seconds:g}' if seconds else '-'} | {f'{budget:g}' if budget else '-'} | "
            f"{row.get('peak_allocated_gib') or '-'} / {row.get('peak_reserved_gib') or '-'} |"
        )
    lines += ["", f"As an override: `{shlex.quote(table['override'])}`."]
    lines += [f"Note: {note}." for note in table["notes"]]
    return lines


def parse_seconds(text: str) -> list[float]:
    """`2,4,8` -> [2.0, 4.0, 8.0], sorted, each once; `` -> [] (the phase is left out)."""
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated seconds: {text!r}") from None
    if any(not (math.isfinite(v) and v > 0) for v in values):
        raise argparse.ArgumentTypeError(f"seconds must be positive: {text!r}")
    return values


def positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_gpu")
    parser.add_argument("--config", type=Path, default=RECIPE)
    parser.add_argument(
        "--architecture",
        default=str(ARCHITECTURE),
        help="model.config to build (random init); '' keeps the config's model",
    )
    parser.add_argument(
        "--budgets",
        type=parse_seconds,
        default=[40, 80, 160, 320, 640],
        help="batch budgets to time (seconds, comma-separated; '': none)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--flop-steps", type=int, default=2)
    parser.add_argument("--clips", type=int, default=2500, help="synthetic training clips")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument(
        "--search-start", type=float, default=160.0, help="0: no search of the largest budget"
    )
    parser.add_argument(
        "--profile-budget", type=float, default=0.0, help="profile 4 steps at this budget (0: no)"
    )
    parser.add_argument("--harness-rounds", type=int, default=6, help="0: no bench_train.py run")
    parser.add_argument("--harness-steps", type=int, default=8)
    parser.add_argument("--harness-warmup", type=int, default=3)
    parser.add_argument("--harness-clips", type=int, default=600)
    parser.add_argument("--harness-budget", type=float, default=80.0)
    parser.add_argument(
        "--write-section",
        nargs="+",
        metavar="[LABEL=]RESULT_JSON",
        help="rewrite BENCHMARKS.md's GPU section from these runs' JSON, one table",
    )
    parser.add_argument("--label", default="", help="the run's name in the table")
    parser.add_argument(
        "--model-flop-per-audio-s",
        type=float,
        default=None,
        help="model FLOPs per audio second to use when --flop-steps 0 (compiled blocks hide "
        "their operations from the FLOP counter)",
    )
    parser.add_argument(
        "--width-table",
        type=parse_seconds,
        default=[],
        metavar="W1,W2,...",
        help="needs a GPU: measure the most clips of each width (seconds) that train one step and "
        "write width_table.yaml, a train.batch_seconds_by_width for this card (e.g. 2,4,8,16,30; "
        "include data.max_duration: wider batches get train.batch_seconds)",
    )
    parser.add_argument(
        "--width-margin",
        type=positive,
        default=0.9,
        help="budget by width = this x the largest seconds that fitted (default 0.9)",
    )
    parser.add_argument(
        "--memory-gib",
        type=positive,
        default=None,
        help="CUDA only: cap what this process may allocate on the card at this many GiB "
        "(default: the whole card), e.g. to size a --width-table for a smaller card",
    )
    parser.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.architecture = Path(args.architecture) if args.architecture else None
    if args.width_margin > 1:
        parser.error(
            f"--width-margin is a fraction of what fitted, at most 1, not {args.width_margin:g}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_section:
        results = []
        for item in args.write_section:
            label, _, path = item.rpartition("=")
            result = json.loads(Path(path).read_text(encoding="utf-8"))
            result["label"] = label or result.get("label", "")
            results.append(result)
        write_benchmarks(
            args.benchmarks_md, markdown_section(results), BENCHMARKS_HEADING, EARLIER_GPU_HEADING
        )
        print(f"wrote the GPU section of {args.benchmarks_md}")
        return 0
    if args.width_table and not cuda_available():
        print(
            "bench_gpu.py: --width-table needs a CUDA GPU (it finds where a training step runs out "
            "of GPU memory), and this machine has none",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    print(markdown_section([result]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
