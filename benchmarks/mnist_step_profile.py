"""Where a step of `reproduce mnist` spends its time on one core: matmuls, the batch's gather, the rest.

Each net (without and with BN) takes --steps steps as a worker process of `reproduce mnist` takes
them (one thread, the paper's batches, the first layer reading each batch's width), under
torch.profiler. The script prints each net's wall time per step (timed without the profiler),
then the profiler's share of it by kind of op, and the matmuls' rate in GFLOP/s next to one
core's rate on a 512^3 matmul: how close the step is to the arithmetic it cannot avoid.

    .venv/bin/python benchmarks/mnist_step_profile.py --data ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bngraph.data import resolve_dataset
from bngraph.reproduce.mnist import MnistConfig, _Widths, mnist_nets
from bngraph.training import TensorData
from bngraph.training.data import EpochSampler
from bngraph.training.fused_mlp import StackedMLP

MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"}
GATHER = {"aten::index_select"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="MNIST folder (default: $BNGRAPH_DATA or the cache)")
    parser.add_argument("--steps", type=int, default=2000, help="steps timed per net (default: 2000)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    data, widths = _Widths.reorder(TensorData.from_dataset(resolve_dataset(args.data)))
    cfg = MnistConfig()
    sampler = EpochSampler(data.n_train, cfg.batch_size, cfg.seed)
    big = torch.randn(512, 512)
    started = time.perf_counter()
    for _ in range(20):
        big @ big
    peak = 20 * 2 * 512**3 / (time.perf_counter() - started) / 1e9
    print(f"torch {torch.__version__}, 1 thread; a 512^3 matmul runs at {peak:.0f} GFLOP/s")

    for name, net in zip(("plain", "BN"), mnist_nets(cfg.seed, cfg.init_std)):
        stack = StackedMLP([net], input_order=widths.order)
        hidden = [w.shape[-1] for w in stack.weights]
        flops = 0.0

        def run(first: int, count: int) -> None:
            nonlocal flops
            for step in range(first, first + count):
                index = sampler(step)
                width = int(widths.train.index_select(0, index).max())
                stack.step(data.x_train.index_select(0, index), data.y_train.index_select(0, index), cfg.lr, width)
                # forward and weight gradient of every layer, the input gradient of all but the first
                ins = [width, *hidden[:-1]]
                flops += sum(2 * cfg.batch_size * i * o * (2 if l == 0 else 3) for l, (i, o) in enumerate(zip(ins, hidden)))

        run(0, 300)  # warm
        started = time.perf_counter()
        run(300, args.steps)
        wall = (time.perf_counter() - started) / args.steps
        flops = 0.0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(300 + args.steps, args.steps)
        per_step = {"matmul": 0.0, "gather": 0.0, "other": 0.0}
        for event in prof.key_averages():
            kind = "matmul" if event.key in MATMULS else "gather" if event.key in GATHER else "other"
            per_step[kind] += event.self_cpu_time_total / 1e6 / args.steps
        profiled = sum(per_step.values())
        shares = ", ".join(f"{kind} {t / profiled:.0%}" for kind, t in per_step.items())
        rate = flops / args.steps / per_step["matmul"] / 1e9
        print(f"{name:>5}: {wall * 1e6:4.0f} us a step; under the profiler {shares}; "
              f"matmuls at {rate:.0f} GFLOP/s ({flops / args.steps / 1e6:.1f} MFLOP a step)")


if __name__ == "__main__":
    main()
