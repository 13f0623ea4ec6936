"""The multiply-add that replaces a BN no layer could take, against the eval-mode BN kernel.

    .venv/bin/python benchmarks/multiply_add_speed.py

Prints, per input shape, the time of each candidate form of y = s * x + t (s, t per channel of
axis 1) divided by the time of F.batch_norm in eval mode, best of several runs, on one thread.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = [(64, 256), (16, 64, 100), (32, 128, 14, 14), (8, 64, 56, 56)]


def best_us(run, repeats: int = 7, calls: int = 20) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'shape':>18} {'batch_norm us':>14} {'addcmul':>8} {'mul,add_':>9} {'dw conv':>8}  (time / batch_norm's)")
    for shape in SHAPES:
        x, channels = torch.randn(shape), shape[1]
        per_channel = (channels,) + (1,) * (len(shape) - 2)
        scale, shift = torch.randn(per_channel), torch.randn(per_channel)
        mean, var, weight, bias = torch.randn(channels), torch.rand(channels) + 0.5, torch.randn(channels), torch.randn(channels)
        bn = best_us(lambda: F.batch_norm(x, mean, var, weight, bias, False, 0.0, 1e-5))
        addcmul = best_us(lambda: torch.addcmul(shift, x, scale))
        mul_add = best_us(lambda: torch.mul(x, scale).add_(shift))
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}.get(len(shape))  # depthwise, 1x1: groups = C
        kernel = scale.reshape(channels, 1, *per_channel[1:])
        depthwise = best_us(lambda: conv(x, kernel, shift.reshape(-1), groups=channels)) / bn if conv else float("nan")
        print(f"{str(shape):>18} {bn:>14.1f} {addcmul / bn:>8.2f} {mul_add / bn:>9.2f} {depthwise:>8.2f}")


if __name__ == "__main__":
    main()
