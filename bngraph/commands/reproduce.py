"""Reproduce the paper's experiments: `mnist` (Sec. 4.1, Figure 1) or `inception` (Sec. 4.2.2).

mnist trains the paper's MLP (3 x 100 sigmoid units) with and without BN side by side, from the
same initial weights and on the same batches: 50,000 steps of 60 examples, evaluated on the
whole test set every 500 steps. It writes OUT/fig1.png ((a) test accuracy, (b, c) the 15/50/85th
percentiles of one sigmoid input of the last hidden layer without and with BN), summary.json
(best accuracies, curves, the speed-up: steps the plain net needs to reach its best accuracy
over the steps the BN net needs to reach the same), table.md and the trained nets in OUT/models/.
About 30 s on two CPU cores; --seeds N adds seeds, drawn as a spread (the table's figures are then
those of the accuracy curves averaged over the seeds, with each seed's speed-up beside them, and
summary.json holds each seed's figures too; OUT/models/ holds the first seed's nets).

inception builds Inception, BN-Baseline, BN-x5, BN-x30 and BN-x5-Sigmoid from zoo:inception-small
with the recipe passes (`bngraph train --help`), trains each on the images, and writes the
paper's table (steps to reach Inception's best accuracy, each variant's best), accuracy.png and
summary.json. Choose with --variants; `inception-sigmoid` adds the paper's control (sigmoid, no
BN). --full uses the 224x224 zoo:inception instead (a GPU's job).

Examples:
  bngraph reproduce mnist --data ~/mnist -o repro/mnist
  bngraph reproduce mnist --data ~/mnist --steps 10000 --seeds 3 -o repro/mnist-3
  bngraph reproduce inception --data ~/mnist --steps 1000 --variants inception,bn-x5,bn-x30 -o repro/inc
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from bngraph.atomic import REPRODUCE, check_output, refuse_inside_bngraph_folder
from bngraph.commands.args import add_data_arguments, add_force_argument, add_report_arguments, data_from_args, emit
from bngraph.errors import UserError

if TYPE_CHECKING:  # the CLI builds its parser without torch: heavy imports wait for run()
    from bngraph.report import Report
    from bngraph.reproduce.inception import InceptionRun
    from bngraph.reproduce.mnist import MnistRun


def _common(parser: argparse.ArgumentParser, steps: int) -> None:
    add_data_arguments(parser, stream=False)  # the experiments hold their data whole
    parser.add_argument("-o", "--output", metavar="DIR", required=True, help="folder to write")
    parser.add_argument("--steps", type=int, default=steps, help=f"training steps (default: {steps:,})")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default: 0)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_force_argument(parser, "reproduce folder")
    add_report_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    paragraphs = (__doc__ or "\n\n" * 3).split("\n\n")  # `python -OO` strips docstrings
    mnist = sub.add_parser("mnist", help="Sec. 4.1: the MLP with and without BN (Figure 1)",
                           description=paragraphs[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(mnist, 50_000)
    mnist.add_argument("--batch-size", type=int, default=60, help="(default: 60, the paper's)")
    mnist.add_argument("--lr", type=float, default=0.5, help="plain SGD learning rate (default: 0.5)")
    mnist.add_argument("--eval-every", type=int, default=500, help="(default: 500)")
    mnist.add_argument("--seeds", type=int, default=1, help="independent runs, drawn as a spread (default: 1)")
    mnist.add_argument(
        "--init-std", default="0.01",
        help="std of the Gaussian initial weights, the paper's 'small random Gaussian values' "
        "(default: 0.01); 'torch' for PyTorch's default initialization",
    )
    mnist.add_argument("--unit", type=int, default=0, help="the sigmoid of the last hidden layer that (b, c) follow (default: 0)")
    mnist.add_argument("--workers", type=int, help="processes (default: one per core)")

    inception = sub.add_parser("inception", help="Sec. 4.2.2: the five Inception variants", description=paragraphs[2],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(inception, 1000)
    inception.add_argument(
        "--variants", default="inception,bn-baseline,bn-x5,bn-x30,bn-x5-sigmoid",
        help="comma-separated recipes (default: the paper's five; add inception-sigmoid for the control)",
    )
    inception.add_argument("--batch-size", type=int, default=32, help="(default: 32, the paper's)")
    inception.add_argument("--lr", type=float, default=0.0015, help="Inception's learning rate (default: 0.0015)")
    inception.add_argument("--eval-every", type=int, help="(default: a tenth of the run)")
    inception.add_argument("--test-examples", type=int, default=2000, help="test images per evaluation (default: 2000)")
    inception.add_argument("--full", action="store_true", help="zoo:inception at 224x224 (upsampled images)")


def _init_std(text: str) -> float | None:
    if text == "torch":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--init-std {text!r}: a positive number, or 'torch'") from None


def run(args: argparse.Namespace) -> int:
    refuse_inside_bngraph_folder(args.output)
    check_output(args.output, REPRODUCE, force=args.force, inputs=[args.data])  # before the work
    _, report = _mnist(args) if args.experiment == "mnist" else _inception(args)
    emit(report, args)
    return 0


def _mnist(args: argparse.Namespace) -> tuple[MnistRun, Report]:
    from bngraph.reproduce.workers import Workers, cpu_processes

    # The worker processes start first, and import torch while this process imports its own
    # and reads the data (on a GPU, where every net trains here, one goes unused).
    on_cpu = args.device in ("auto", "cpu")
    with Workers(cpu_processes(args.workers, args.seeds) - 1 if on_cpu else 0) as workers:
        # Imported here, not above: `bngraph --help` starts without torch.
        from bngraph.reproduce.mnist import MnistConfig, mnist_experiment
        from bngraph.zoo import get_entry

        cfg = MnistConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
            seeds=args.seeds, seed=args.seed, init_std=_init_std(args.init_std), track_unit=args.unit,
            workers=args.workers, device=args.device,
        )
        # An image folder is decoded to what the net takes (1x28x28); other formats must hold that.
        data = data_from_args(args, input_shape=get_entry("mnist-mlp").input_shape)
        return mnist_experiment(data, cfg, args.output, progress=not args.quiet, force=args.force, workers=workers)


def _inception(args: argparse.Namespace) -> tuple[InceptionRun, Report]:
    # Imported here, not above: `bngraph --help` starts without torch.
    from bngraph.reproduce.inception import InceptionConfig, inception_experiment
    from bngraph.training.config import pick_device
    from bngraph.zoo import get_entry

    cfg = InceptionConfig(
        variants=tuple(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip())), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every, test_examples=args.test_examples,
        seed=args.seed, full=args.full, device=args.device,
    )
    # Both sizes take 1x28x28 images (--full upsamples them): an image folder is decoded to that.
    data = data_from_args(args, pick_device(args.device), input_shape=get_entry("inception-small").input_shape)
    return inception_experiment(data, cfg, args.output, progress=not args.quiet, force=args.force)
