"""train.ctc_implementation on this machine's device: the Triton CTC against PyTorch's, at the
recipe's shapes (a batch of 80 s: 10 clips of 8 s, 400 frames, ~100 phones each, the released
model's 392 tokens).

Checks, then measures:
- the same losses and gradients (w.r.t. the logits) to float32 rounding;
- on a GPU, host synchronisations: each implementation's forward and backward run under
  `torch.cuda.set_sync_debug_mode("warn")`, and the warnings it raises are counted;
- forward + backward time per call (CUDA events on a GPU, wall clock on a CPU, where Triton's
  interpreter runs the kernels: a correctness check there, not a speed).

    python scripts/check_ctc.py [--rows 10 --frames 400 --labels 100] [--out ctc.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from phonetune.train.loop import ctc_losses


def make_batch(args: argparse.Namespace, device: torch.device) -> tuple:
    """Random logits and labels; lengths spread between 60% and 100% of the longest."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.frames, args.classes, generator=generator)
    spread = torch.linspace(0.6, 1.0, args.rows)
    frames = (spread * args.frames).long()
    labels = (spread * args.labels).long()
    targets = torch.randint(4, args.classes, (args.rows, args.labels), generator=generator)
    targets[torch.arange(args.labels)[None, :] >= labels[:, None]] = -100
    # the lengths twice, as the training step has them: host lists (the batch's own numbers, for
    # PyTorch's CTC) and device tensors (for the Triton CTC)
    on_device = tuple(t.to(device) for t in (logits, frames, targets, labels))
    return (*on_device, frames.tolist(), labels.tolist())


def run(implementation: str, batch: tuple) -> tuple[torch.Tensor, ...]:
    """One forward and backward: the losses and the logits' gradient."""
    logits, frames, targets, labels, host_frames, host_labels = batch
    leaf = logits.clone().requires_grad_()
    if implementation == "pytorch":
        frames, labels = host_frames, host_labels
    losses = ctc_losses(leaf, frames, targets, labels, True, implementation)
    losses.sum().backward()
    return losses.detach(), leaf.grad


def count_syncs(implementation: str, batch: tuple) -> int:
    """Synchronising CUDA calls in one forward and backward (torch's sync debug mode)."""
    if batch[0].device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(implementation, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def time_calls(implementation: str, batch: tuple, repeats: int) -> float:
    """Seconds per forward + backward, after one warm-up call (Triton compiles on its first)."""
    run(implementation, batch)
    if batch[0].device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            run(implementation, batch)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        run(implementation, batch)
    return (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--classes", type=int, default=392)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = make_batch(args, device)

    (want_loss, want_grad), (loss, grad) = run("pytorch", batch), run("triton", batch)
    # The kernels round one log-sum-exp per frame into log alpha and log beta: ~T eps |loss|
    # each, doubled; the gradient's occupancies (<= 1) carry three such errors.
    eps = torch.finfo(torch.float32).eps
    loss_tolerance = 2 * args.frames * eps * (want_loss.abs() + 1)
    loss_error = (loss - want_loss).abs()
    grad_error = (grad - want_grad).abs().amax(dim=(1, 2))
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("rows", "frames", "labels", "classes")},
        "max_loss_error_over_tolerance": float((loss_error / loss_tolerance).max()),
        "max_grad_error_over_tolerance": float((grad_error / (3 * loss_tolerance)).max()),
        "syncs": {impl: count_syncs(impl, batch) for impl in ("pytorch", "triton")},
        "seconds_per_call": {
            impl: time_calls(impl, batch, args.repeats) for impl in ("pytorch", "triton")
        },
    }
    result["same_result"] = (
        result["max_loss_error_over_tolerance"] <= 1
        and result["max_grad_error_over_tolerance"] <= 1
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if not result["same_result"]:
        raise SystemExit("the Triton CTC differs from PyTorch's beyond float32 rounding")


if __name__ == "__main__":
    main()
