"""Padding against batch shapes: what a width grid costs and how many shapes it leaves.

    python scripts/shape_grid.py [--budget 80] [--clips 20000]

CUDA graphs (`train.compile=reduce-overhead`) record one graph per batch shape, so they need few
shapes; issue 15 also asks for at most 3% padding. This plans one epoch with phonetune's own
sampler (`DurationBatchSampler`, one process, `train.pad_clips_to_budget` on and off) for grids of
`train.pad_to_multiple_of` with `train.bucket_width` of the same size, on two synthetic duration
distributions: uniform 2-8 s (the corpus of `scripts/bench_gpu.py`) and a log-normal one shaped
like Common Voice's clips (median 4.6 s, cut to 1-11 s); then the recipe's grid on the corpus of
`scripts/bench_gpu.py`. Padding counts filler rows, as the run summary does. Nothing is timed: the numbers are arithmetic of the plan, the same on every machine.
"""

from __future__ import annotations

import argparse

import numpy as np

from phonetune.data.audio import SAMPLE_RATE
from phonetune.train.batching import DurationBatchSampler

GRIDS = (0.1, 0.2, 0.25, 0.5)  # seconds: pad_to_multiple_of / 16000 and bucket_width


def draw_corpora(clips: int) -> dict[str, np.ndarray]:
    # not seed 0: default_rng(0) is the sampler's own stream for seed 0, epoch 0 (default_rng([0, 0]))
    rng = np.random.default_rng(2026)
    return {
        "uniform 2-8 s": rng.uniform(2.0, 8.0, clips),
        "log-normal, median 4.6 s, 1-11 s": np.clip(
            rng.lognormal(np.log(4.6), 0.35, clips), 1.0, 11.0
        ),
    }


def bench_gpu_durations(clips: int = 1500) -> np.ndarray:
    """The training clips' durations of `scripts/bench_gpu.py`'s corpus (its first draw)."""
    rng = np.random.default_rng(np.random.SeedSequence(0).spawn(1)[0])
    return np.round(rng.uniform(2.0, 8.0, clips) * SAMPLE_RATE) / SAMPLE_RATE


def plan(durations: np.ndarray, budget: float, grid: float, fill: bool) -> tuple[float, int]:
    """(padding fraction, distinct batch shapes) of one epoch on this grid."""
    sampler = DurationBatchSampler(
        np.arange(len(durations)),
        durations,
        budget,
        seed=0,
        bucket_width=grid,
        pad_to_multiple_of=round(grid * SAMPLE_RATE),
        pad_clips_to_budget=fill,
    )
    totals = sampler.step_totals(range(sampler.batches_per_epoch()), None)
    return 1.0 - totals["audio_seconds"] / totals["padded_seconds"], len(sampler.shapes())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=80.0, help="train.batch_seconds")
    parser.add_argument("--clips", type=int, default=20000)
    args = parser.parse_args()
    print(f"batch budget {args.budget:g} s, {args.clips} clips, one epoch")
    print("| durations | grid (s) | padding | shapes | padding, clips filled | shapes, filled |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, durations in draw_corpora(args.clips).items():
        for grid in GRIDS:
            loose, filled = (plan(durations, args.budget, grid, fill) for fill in (False, True))
            print(
                f"| {name} | {grid:g} | {loose[0]:.1%} | {loose[1]} | {filled[0]:.1%} | {filled[1]} |"
            )
    print("\nthe recipe's 0.1 s grid on the 1500 clips of bench_gpu.py's corpus (its GPU tables)")
    print("| batch budget (s) | padding | shapes |")
    print("|---:|---:|---:|")
    for budget in (80.0, 160.0):
        padding, shapes = plan(bench_gpu_durations(), budget, 0.1, False)
        print(f"| {budget:g} | {padding:.1%} | {shapes} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
