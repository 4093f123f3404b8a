"""Sharded training on a real GPU: `phonetune train` under configs/accelerate/fsdp_8gpu.yaml (FSDP)
or deepspeed_zero2_8gpu.yaml (DeepSpeed ZeRO-2), checked against the same run without sharding,
resumed, and its checkpoint loaded with plain transformers.

    python scripts/check_sharded_gpu.py --prepared-dir PREP [--processes N] [--out DIR]
        [--mixed-precision bf16|no] [--accelerate-config FILE]

CI cannot run this (Accelerate enables FSDP and DeepSpeed only on accelerators; tests/fsdp_on_cpu.py
and tests/deepspeed_on_cpu.py cover the same code on CPU processes). With one GPU, `--processes 1`
still goes through the whole sharded path (torchrun, the sharded model, gathered checkpoints), with
a shard that is the whole tensor. Runs the tiny recipe (bf16 unless `--mixed-precision` says
otherwise) for `--steps` steps: (1) sharded, (2) one process without sharding, (3) sharded, resumed
from the middle checkpoint. Prints one JSON object as the last line: the run's sharding (from its
summary), losses of (1) and (2) and their largest relative difference, the largest weight
difference of (3) against (1) at the last step, and whether the checkpoint loads with
`Wav2Vec2ForCTC.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(
    launcher: list[str], prepared: Path, run_dir: Path, steps: int, precision: str, *extra: str
) -> str:
    """One training run; returns its standard output (also printed)."""
    settings = [
        "--config",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        f"data.prepared_dir={prepared}",
        f"run.output_dir={run_dir}",
        f"train.max_steps={steps}",
        f"train.save_steps={steps // 2}",
        f"train.eval_steps={steps // 2}",
        "train.keep_last=5",
        f"train.mixed_precision={precision}",
        "log.progress_bar=false",
        "log.every_steps=1",
        *extra,
    ]
    command = [sys.executable, *launcher, "-m", "phonetune", "train", *settings]
    print(" ".join(command), flush=True)
    done = subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout, flush=True)
    return done.stdout


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "check_sharded_gpu")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mixed-precision", choices=["bf16", "no"], default="bf16")
    parser.add_argument(
        "--accelerate-config", type=Path, default=REPO / "configs" / "accelerate" / "fsdp_8gpu.yaml"
    )
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import load_file
    from transformers import Wav2Vec2ForCTC

    if args.out.exists():
        shutil.rmtree(args.out)
    sharded = ["-m", "accelerate.commands.launch", "--config_file", str(args.accelerate_config)]
    sharded += ["--num_processes", str(args.processes)]
    straight, plain, resumed = args.out / "sharded", args.out / "plain", args.out / "resumed"
    precision = args.mixed_precision
    summary = train(sharded, args.prepared_dir, straight, args.steps, precision)
    train([], args.prepared_dir, plain, args.steps, precision)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{args.steps}")
    train(sharded, args.prepared_dir, resumed, args.steps, precision, "resume=auto")

    last = f"checkpoints/step_{args.steps}/model"
    first, again = (
        load_file(straight / last / "model.safetensors"),
        load_file(resumed / last / "model.safetensors"),
    )
    model = Wav2Vec2ForCTC.from_pretrained(straight / last)
    with torch.inference_mode():
        logits = model(torch.zeros(1, 16000)).logits
    sharded_losses, plain_losses = losses(straight), losses(plain)
    processes_line = next(line for line in summary.splitlines() if "processes:" in line)
    result = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "processes": args.processes,
        "accelerate_config": str(args.accelerate_config),
        "mixed_precision": precision,
        "sharding": processes_line.split(":", 1)[1].strip(),
        "sharded_losses": sharded_losses,
        "plain_losses": plain_losses,
        "max_relative_loss_difference": max(
            abs(a - b) / abs(b) for a, b in zip(sharded_losses, plain_losses, strict=True)
        ),
        "resumed_losses_equal": losses(resumed) == sharded_losses,
        "resumed_max_weight_difference": max(
            float((first[k] - again[k]).abs().max()) for k in first
        ),
        "checkpoint_loads": list(logits.shape),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
