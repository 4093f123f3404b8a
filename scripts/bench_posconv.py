"""The positional convolution, direct (oneDNN / cuDNN) vs through FFTs (`train.model.fft_conv1d`).

    python scripts/bench_posconv.py [--threads 2] [--repeats 20]

Forward + backward of one grouped convolution layer at the tiny recipe's sizes (192 channels, 16
groups, kernel 64, zero padding 32) on batches shaped like the demo's (batch x frames), float32,
after 3 untimed repetitions; prints milliseconds per repetition and the largest difference of the
outputs relative to their scale.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from phonetune.train.model import fft_conv1d

SHAPES = [(8, 150), (16, 60), (4, 300)]  # (clips, frames): ~20 s batches of 3, 1.2 and 6 s clips


def time_layer(layer, arguments: tuple, repeats: int) -> float:  # noqa: ANN001
    upstream = torch.randn_like(layer(*arguments))
    for _ in range(3):
        layer(*arguments).backward(upstream)
    started = time.perf_counter()
    for _ in range(repeats):
        layer(*arguments).backward(upstream)
    return (time.perf_counter() - started) / repeats * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--channels", type=int, default=192)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--kernel", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, g, k = args.channels, args.groups, args.kernel
    weight = torch.randn(c, c // g, k, requires_grad=True)
    bias = torch.randn(c, requires_grad=True)

    def direct(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv1d(x, weight, bias, padding=k // 2, groups=g)

    def through_fft(x: torch.Tensor) -> torch.Tensor:
        return fft_conv1d(x, weight, bias, k // 2, g)

    print(f"{c} channels, {g} groups, kernel {k}, {args.threads} threads, ms per forward+backward")
    print(f"{'clips x frames':>15} {'direct':>8} {'FFT':>8} {'speed-up':>9} {'max rel diff':>13}")
    for clips, frames in SHAPES:
        x = torch.randn(clips, c, frames, requires_grad=True)
        a, b = time_layer(direct, (x,), args.repeats), time_layer(through_fft, (x,), args.repeats)
        with torch.no_grad():
            expected = direct(x)
            difference = (through_fft(x) - expected).abs().max() / expected.abs().max()
        print(f"{clips:>7} x {frames:<5} {a:8.1f} {b:8.1f} {a / b:8.1f}x {float(difference):13.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
