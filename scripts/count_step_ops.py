"""Operations one training step dispatches, by `train.mixed_precision`: a count of the work the host
issues, the same on any machine (each dispatched operation is at least one kernel launch on a GPU).

    python scripts/count_step_ops.py                      # XLSR-53 architecture, no, bf16, bf16-weights
    python scripts/count_step_ops.py --architecture '' --modes bf16,bf16-weights   # the tiny recipe

At 80 s of audio per GPU the training step is bound by the host launching kernels (BENCHMARKS.md,
GPU section), so fewer operations per step is what `train.mixed_precision=bf16-weights` is for;
this measures that on a CPU, where it can run in CI, and says where the difference comes from.

Each mode runs in its own process (Accelerate keeps one state per process), with phonetune's own
step (`scripts/bench_gpu.py`'s `Bench`, as the training loop sets it up): the recipe
(`configs/xlsr53_espeak_cv.yaml`: SpecAugment, dropout, a frozen feature encoder) on one batch of
two synthetic clips of 2-3 s, LayerDrop off so that every step runs the same layers. After one
warm-up step, a `TorchDispatchMode` counts the ATen operations of the next step as they reach the
kernels' dispatch (forward, backward and the update; composite operations counted as what they
decompose into), and separately those of the update (`Parallel.update`); operations that return a
view of their input (`view`, `t`, `detach`...) change metadata only and are counted apart
("not_views": the ones that run a kernel on a GPU). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

MODES = ("no", "bf16", "bf16-weights")


def count_one_mode(mode: str, architecture: str, config_path: Path) -> dict:
    """This process: the operations of one step in `mode` (its corpus in a folder removed after)."""
    with tempfile.TemporaryDirectory(prefix="count_step_ops_") as folder:
        return count_in(mode, architecture, config_path, Path(folder))


def count_in(mode: str, architecture: str, config_path: Path, folder: Path) -> dict:
    """`count_one_mode` with its synthetic corpus and run folder in `folder`."""
    import torch
    from bench_gpu import Bench, write_synthetic_prepared
    from torch.utils._python_dispatch import TorchDispatchMode

    from phonetune.train.config import load_config

    torch.manual_seed(0)
    prepared = write_synthetic_prepared(folder / "prep", 8, 0, 2.0, 3.0)
    model = ["model.name_or_path=null", f"model.config={architecture}"] if architecture else []
    overrides = [
        f"data.prepared_dir={prepared}",
        f"run.output_dir={folder / 'run'}",
        "data.locales=null",
        "log.report_to=[]",
        *model,
        "model.layerdrop=0",
        "train.freeze_finetune_updates=0",
        "train.grad_accum=1",
        f"train.mixed_precision={mode}",
    ]
    config = load_config(config_path, overrides)
    bench = Bench(config)
    steps = bench.batches(6.0)  # two clips of 2-3 s per batch
    phase = {"name": "forward_backward"}
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    views: set[str] = set()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            name = str(func.overloadpacket.__name__)
            counts[phase["name"]][name] += 1
            if is_view(func):
                views.add(name)
            return func(*args, **(kwargs or {}))

    update = bench.parallel.update

    def counted_update(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        phase["name"] = "update"
        try:
            return update(*args, **kwargs)
        finally:
            phase["name"] = "after_update"

    bench.parallel.update = counted_update
    bench.step(next(steps))  # warm-up: the optimizer's state is made, caches filled
    step = next(steps)
    phase["name"] = "forward_backward"
    with Count():
        bench.step(step)
    everything = sum((c for c in counts.values()), collections.Counter())
    kernels = {name: n for name, n in everything.items() if name not in views}
    return {
        "mode": mode,
        "batch_shape": list(step.batches[0].input_values.shape),
        "parameters": {"trainable": bench.trainable, "total": bench.total},
        "total": sum(everything.values()),
        "not_views": sum(kernels.values()),
        "forward_backward": sum(counts["forward_backward"].values()),
        "update": sum(counts["update"].values()),
        "after_update": sum(counts["after_update"].values()),
        "casts": everything["_to_copy"],
        "most_common": collections.Counter(kernels).most_common(12),
    }


def is_view(func) -> bool:  # noqa: ANN001 - an OpOverload
    """Whether an operation returns a view of an input (its first result aliases without
    writing): it changes metadata and runs no kernel."""
    returns = func._schema.returns
    alias = returns[0].alias_info if returns else None
    return alias is not None and not alias.is_write


def run_modes(modes: list[str], architecture: str, config: Path) -> dict:
    """Each mode in a process of its own; their results by mode."""
    results = {}
    for mode in modes:
        command = [sys.executable, __file__, "--worker", mode, "--architecture", architecture]
        done = subprocess.run(
            [*command, "--config", str(config)], stdout=subprocess.PIPE, text=True, check=True
        )
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--architecture",
        default=str(REPO / "configs" / "xlsr53_architecture.json"),
        help="a config.json of Wav2Vec2Config values; '' keeps the --config recipe's model",
    )
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "xlsr53_espeak_cv.yaml")
    parser.add_argument("--modes", default=",".join(MODES), help="train.mixed_precision values")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one mode, in this process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = count_one_mode(args.worker, args.architecture, args.config)
    else:
        modes = [mode for mode in args.modes.split(",") if mode]
        result = run_modes(modes, args.architecture, args.config)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
