"""Training throughput (seconds of audio per second) and padding, for a config on a prepared corpus.

    python scripts/bench_train.py --prepared-dir PREP [--config configs/tiny_cpu.yaml] [--steps 40]

Runs the real training loop (`train.loop.train`) for `--steps` optimizer steps without evaluation,
skips the first `--warmup-steps` (allocator and thread-pool start-up), and prints a final JSON line:
audio seconds per wall-clock second, the fraction of padded audio in the batches trained on and in a
whole epoch's plan, the median step time, and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prepared-dir", required=True, type=Path, help="output of `phonetune prepare`"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml",
    )
    parser.add_argument(
        "--steps", type=int, default=40, help="optimizer steps to time (after warm-up)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=5, help="steps run before timing starts"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.batch_seconds=60",
    )
    args = parser.parse_args()

    import numpy as np
    import torch

    from train.batching import padding_fraction, plan_epoch
    from train.config import load_config
    from train.loop import load_data, train

    with tempfile.TemporaryDirectory(prefix="bench_train_") as run_dir:
        total = args.warmup_steps + args.steps
        config = load_config(
            args.config,
            [
                f"data.prepared_dir={args.prepared_dir}",
                f"run.output_dir={run_dir}",
                f"train.max_steps={total}",
                f"train.eval_steps={total + 1}",
                f"train.save_steps={total + 1}",
                "log.every_steps=1",
                "log.progress_bar=false",
                "log.report_to=[]",
                *args.overrides,
            ],
        )
        # the end-of-run evaluation and checkpoint are outside the timed steps
        train(config)
        lines = [
            json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
    steps = [r for r in lines if "loss" in r and r["step"] > args.warmup_steps]
    audio = sum(r["audio_seconds"] for r in steps)
    seconds = [r["audio_seconds"] / r["audio_seconds_per_second"] for r in steps]
    padded = sum(r["audio_seconds"] / (1 - r["padding_fraction"]) for r in steps)

    data = load_data(config)
    durations = data.train.durations[data.train_rows]
    plan = plan_epoch(
        durations,
        config.train.batch_seconds,
        config.train.seed,
        0,
        bucket_width=config.train.bucket_width,
    )
    result = {
        "config": str(args.config),
        "prepared_dir": str(args.prepared_dir),
        "steps_timed": len(steps),
        "audio_seconds_per_second": round(audio / sum(seconds), 2),
        "median_step_seconds": round(statistics.median(seconds), 4),
        "padding_fraction": round(1 - audio / padded, 4),
        "epoch_plan_padding_fraction": round(
            padding_fraction(durations, [group[0] for group in plan]), 4
        ),
        "batch_seconds": config.train.batch_seconds,
        "mean_batch_audio_seconds": round(float(np.mean([r["audio_seconds"] for r in steps])), 2),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
