"""reproduce mnist speed: the shipped path against a plain PyTorch loop, measured in one run.

The plain loop is what one would write: the two nets (the paper's MLP and its BN version, as
`reproduce` builds them), data in memory, random batch indices, torch.optim.SGD, autograd, and
the whole test set every 500 steps. The shipped path is `bngraph.reproduce.mnist.reproduce_mnist`
(hand-written gradients, one process per core). Both run `--steps` pair-steps; the script prints
pair-steps per second while training, the shipped path's fixed setup (starting its processes),
the wall time each would need for the paper's 50,000 steps, and the ratio of those.

    .venv/bin/python benchmarks/train_mnist.py --data ../shared/data/mnist [--steps 5000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bngraph.data import resolve_dataset
from bngraph.reproduce.mnist import MnistConfig, mnist_nets, reproduce_mnist
from bngraph.training import TensorData

PAPER_STEPS = 50_000


def plain_loop(data: TensorData, steps: int, cfg: MnistConfig) -> float:
    """Seconds for `steps` pair-steps of the straightforward loop."""
    nets = mnist_nets(cfg.seed, cfg.init_std)
    optimizers = [torch.optim.SGD(net.parameters(), lr=cfg.lr) for net in nets]
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(data.x_train), (cfg.batch_size,), generator=gen)
        x, y = data.x_train[index], data.y_train[index]
        for net, optimizer in zip(nets, optimizers):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        if step % cfg.eval_every == 0:
            with torch.no_grad():
                for net in nets:
                    net.eval()
                    (net(data.x_test).argmax(1) == data.y_test).float().mean().item()
                    net.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="MNIST folder (default: $BNGRAPH_DATA or the cache)")
    parser.add_argument("--steps", type=int, default=5000, help="pair-steps per contender (default: 5000)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; medians are printed")
    args = parser.parse_args()
    data = TensorData.from_dataset(resolve_dataset(args.data))
    cfg = MnistConfig(steps=args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} pair-steps on {data.source}")

    plain, shipped_train, shipped_setup = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        plain.append(plain_loop(data, args.steps, cfg))
        run = reproduce_mnist(data, cfg, progress=False)
        shipped_train.append(run.train_s)
        shipped_setup.append(run.wall_s - run.train_s)  # building the nets, starting the workers
    rows = [
        ("plain loop", statistics.median(plain), 0.0),
        ("shipped (reproduce_mnist)", statistics.median(shipped_train), statistics.median(shipped_setup)),
    ]
    plain_estimate = rows[0][1] / args.steps * PAPER_STEPS
    print(f"{'contender':<26} {'pair-steps/s':>12} {'setup s':>8} {'50k steps est. s':>17} {'x plain':>8}")
    for name, seconds, setup in rows:
        estimate = setup + seconds / args.steps * PAPER_STEPS
        ratio = plain_estimate / estimate
        print(f"{name:<26} {args.steps / seconds:>12.0f} {setup:>8.1f} {estimate:>17.1f} {ratio:>8.2f}")

if __name__ == "__main__":
    main()
