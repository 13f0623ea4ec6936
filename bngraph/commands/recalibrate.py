"""Recompute each BatchNorm's population statistics over training batches (Algorithm 2, step 2).

Training keeps a moving average of the batch statistics as a stand-in for the statistics the
paper uses at inference. This replaces them with Algorithm 2's: over --batches training
mini-batches of --batch-size m, E[x] is the average of the batch means and Var[x] is m'/(m'-1)
times the average of the batch variances (m' the values per feature in a batch: m, or m x H x W
for a conv's feature map, the paper's effective mini-batch, Sec. 3.2), with every BN normalizing by its batch statistics as
during training (dropout off). It reports the test accuracy before and after.

Domain adaptation: on images from another domain (--data pointing at them) it re-targets the
model to that domain. The weights stay and only the BN statistics move to the new domain's, as
the paper's future-work note on domain adaptation suggests (Sec. 5). No labels are used to
recalibrate, only to report the accuracy. --data is read as train reads it: an image folder is
decoded to the model's input channels and size, and the artifact keeps the input it declares
and records the data's input_scale. For a model trained on uint8 pixels / 255, images used as
stored whose values leave [0, 1] (floats of 0-255) are refused: its statistics would move to
inputs it is not given.

Examples:
  bngraph recalibrate runs/mlp-bn/model --data ~/mnist -o runs/mlp-bn-recalibrated
  bngraph recalibrate runs/mlp-bn/model --data ~/mnist-other-scanner -o runs/adapted
"""

from __future__ import annotations

import argparse

from bngraph.atomic import ARTIFACT
from bngraph.commands import args as shared
from bngraph.commands.args import add_data_arguments, data_for_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_model_arguments(parser)
    add_data_arguments(parser, stream=False)  # its batches are drawn from data held whole
    parser.add_argument("-o", "--output", metavar="DIR", required=True, help="artifact folder to write")
    parser.add_argument("--batches", type=int, default=100, help="training mini-batches to average over (default: 100)")
    parser.add_argument("--batch-size", type=int, default=60, help="m, examples per mini-batch (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="which training examples make the batches (default: 0)")
    shared.add_force_argument(parser, "artifact folder")
    shared.add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    shared.check_output_first(args, ARTIFACT)
    from bngraph.recalibrate import recalibrate  # torch: only once the command runs

    loaded = shared.load_from_args(args)
    _, report = recalibrate(
        loaded,
        data_for_model(args, loaded),  # an image folder decoded as train decoded it
        args.output,
        batches=args.batches,
        batch_size=args.batch_size,
        seed=args.seed,
        force=args.force,
    )
    shared.emit(report, args)
    return 0
