"""reproduce mnist's input widths: what the first layer reads, and what it saves, measured side by side.

`bngraph.training.fused_mlp` orders MNIST's pixels by how many training images use them, so each
image is zero past some width, and a batch's first layer reads only its widest image's prefix; an
evaluation reads only the test images' nonzero pixels (`NonzeroPixels`). This script prints the
mean width of the paper's batches (batch 60, the first --batches of `reproduce mnist`'s own batch
order) and the test images' share of nonzero pixels, then times one core's step of each net and
one evaluation, reading every feature against reading only what is used, interleaved over
--rounds rounds (medians of per-round ratios).

    .venv/bin/python benchmarks/mnist_widths.py --data ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleave, median_ratio  # noqa: E402  (benchmarks/timing.py)

from bngraph.data import resolve_dataset  # noqa: E402
from bngraph.reproduce.mnist import MnistConfig, mnist_nets  # noqa: E402
from bngraph.training import TensorData  # noqa: E402
from bngraph.training.data import EpochSampler  # noqa: E402
from bngraph.training.fused_mlp import NonzeroPixels, StackedMLP, feature_order, prefix_widths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="MNIST folder (default: $BNGRAPH_DATA or the cache)")
    parser.add_argument("--batches", type=int, default=5000, help="batches whose width is averaged (default: 5000)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each process of `reproduce mnist`
    torch.set_flush_denormal(True)
    data = TensorData.from_dataset(resolve_dataset(args.data))
    cfg = MnistConfig()
    x_train, x_test = data.x_train.flatten(1), data.x_test.flatten(1)
    order = feature_order(x_train)
    ordered_train, ordered_test = x_train[:, order], x_test[:, order]
    train_widths = prefix_widths(ordered_train)
    test_pixels = NonzeroPixels.of(ordered_test)
    sampler = EpochSampler(len(x_train), cfg.batch_size, cfg.seed)
    batches = [sampler(step) for step in range(args.batches)]
    batch_widths = torch.tensor([int(train_widths[b].max()) for b in batches], dtype=torch.float)
    features = x_train.shape[1]
    print(f"torch {torch.__version__}, 1 thread, {data.source}")
    print(f"features: {features}; batch of {cfg.batch_size}: mean width {batch_widths.mean():.0f} "
          f"(min {batch_widths.min():.0f}, max {batch_widths.max():.0f}); "
          f"test images: {len(test_pixels.values) / x_test.numel():.0%} of pixels nonzero")

    for name, net in zip(("plain", "BN"), mnist_nets(cfg.seed, cfg.init_std)):
        every, widths = StackedMLP([net]), StackedMLP([net], input_order=order)
        position = {"every": 0, "widths": 0}

        def step_every():
            b = batches[position["every"] % len(batches)]
            position["every"] += 1
            every.step(x_train.index_select(0, b), data.y_train.index_select(0, b), cfg.lr)

        def step_widths():
            b = batches[position["widths"] % len(batches)]
            position["widths"] += 1
            widths.step(ordered_train.index_select(0, b), data.y_train.index_select(0, b), cfg.lr,
                        int(train_widths.index_select(0, b).max()))

        steps = interleave({"every": step_every, "widths": step_widths}, rounds=args.rounds, sample_s=0.3)
        evals = interleave({
            "every": lambda: every.evaluate(x_test, data.y_test, track_unit=0),
            "widths": lambda: widths.evaluate(test_pixels, data.y_test, track_unit=0),
        }, rounds=args.rounds, sample_s=0.3)
        for what, samples in (("step", steps), ("evaluation", evals)):
            a, b = (sorted(samples[k])[len(samples[k]) // 2] for k in ("every", "widths"))
            print(f"{name:>5} {what:<10}  every feature {a * 1e6:8.0f} us   only the used {b * 1e6:8.0f} us   "
                  f"time ratio {median_ratio(samples, 'widths', 'every'):.3f}")


if __name__ == "__main__":
    main()
