"""Pass speed: bngraph insert and fold against torch.fx tracing + fx.experimental fuse.

Nets of 10, 100 and 1000 blocks. insert runs on conv-ReLU blocks (there is nothing to insert into
conv-BN-ReLU); fold and the torch.fx baseline run on conv-BN-ReLU blocks. Each contender runs
interleaved, `--repeats` times, and the medians are printed with their ratio to the baseline.

    .venv/bin/python benchmarks/passes.py [--sizes 10,100,1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

import bngraph


def blocks(n: int, with_bn: bool, width: int = 4) -> nn.Sequential:
    layers = []
    for _ in range(n):
        layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not with_bn))
        if with_bn:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(2, 4, 8, 8)
    try:
        from bngraph.fold import fold
    except ImportError:
        fold = None

    bngraph.insert(blocks(2, with_bn=False), [x])  # warm up: first calls pay for imports and caches
    print(f"{'blocks':>7} {'fx trace+fuse s':>16} {'insert s':>9} {'ratio':>6} {'fold s':>8} {'ratio':>6}")
    for n in (int(s) for s in args.sizes.split(",")):
        plain, with_bn = blocks(n, with_bn=False), blocks(n, with_bn=True)
        times = {"fx": [], "insert": [], "fold": []}
        for _ in range(args.repeats):  # interleaved, so drift hits every contender alike
            times["fx"].append(seconds(lambda: fuse(fx.symbolic_trace(with_bn))))
            times["insert"].append(seconds(lambda: bngraph.insert(plain, [x])))
            if fold is not None:
                times["fold"].append(seconds(lambda: fold(with_bn, [x])))
        fx_s, insert_s = statistics.median(times["fx"]), statistics.median(times["insert"])
        fold_s = statistics.median(times["fold"]) if times["fold"] else float("nan")
        print(f"{n:>7} {fx_s:>16.3f} {insert_s:>9.3f} {insert_s / fx_s:>6.2f} {fold_s:>8.3f} {fold_s / fx_s:>6.2f}")


if __name__ == "__main__":
    main()
