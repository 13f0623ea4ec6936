"""Recompute each BatchNorm's population statistics over training batches (Algorithm 2, step 2).

Training keeps a moving average of the batch statistics as a stand-in for the statistics the
paper uses at inference. This replaces them with Algorithm 2's: over --batches training
mini-batches of --batch-size m, E[x] is the average of the batch means and Var[x] is m/(m-1)
times the average of the batch variances, with every BN normalizing by its batch statistics as
during training (dropout off). It reports the test accuracy before and after.

Domain adaptation: on images from another domain (--data pointing at them) it re-targets the
model to that domain. The weights stay and only the BN statistics move to the new domain's, as
the paper's future-work note on domain adaptation suggests (Sec. 5). No labels are used to
recalibrate, only to report the accuracy.

Examples:
  bngraph recalibrate runs/mlp-bn/model --data ~/mnist -o runs/mlp-bn-recalibrated
  bngraph recalibrate runs/mlp-bn/model --data ~/mnist-other-scanner -o runs/adapted
"""

from __future__ import annotations

import argparse

from bngraph.atomic import ARTIFACT, check_output
from bngraph.commands.common import (
    add_force_argument, add_model_arguments, add_report_arguments, emit, input_paths, load_from_args,
)  # fmt: skip
from bngraph.commands.train import add_data_arguments, data_from_args
from bngraph.errors import UserError
from bngraph.report import Report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("-o", "--output", metavar="DIR", required=True, help="artifact folder to write")
    parser.add_argument("--batches", type=int, default=100, help="training mini-batches to average over (default: 100)")
    parser.add_argument("--batch-size", type=int, default=60, help="m, examples per mini-batch (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="which training examples make the batches (default: 0)")
    add_force_argument(parser, "artifact folder")
    add_report_arguments(parser)


def _check_has_statistics(model) -> None:
    """A model with no BatchNorm statistics to recompute is the user's mistake, not an output."""
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise UserError("nothing to recalibrate: the model has no BatchNorm")
    if all(bn.running_mean is None for bn in bns):
        raise UserError(
            f"nothing to recalibrate: none of the model's {len(bns)} BatchNorms keeps running statistics "
            "(track_running_stats=False)"
        )


def run(args: argparse.Namespace) -> int:
    check_output(args.output, ARTIFACT, force=args.force, inputs=input_paths(args))  # before the work
    from bngraph.artifacts import save
    from bngraph.equivalence import check_only_statistics_changed
    from bngraph.passes.base import run_passes
    from bngraph.passes.recalibrate_bn import RecalibrateBN
    from bngraph.training import EpochSampler, check_model_fits, evaluate

    if args.batches < 1 or args.batch_size < 2:
        raise UserError("--batches must be at least 1 and --batch-size at least 2 (a variance needs two values)")
    loaded = load_from_args(args)
    model = loaded.module
    _check_has_statistics(model)
    data = data_from_args(args)
    check_model_fits(model, data)
    sampler = EpochSampler(len(data.x_train), args.batch_size, args.seed)
    batches = [(data.x_train[sampler(i)],) for i in range(args.batches)]

    loss_before, accuracy_before = evaluate(model, data.x_test, data.y_test)
    state_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model, results = run_passes(model, [RecalibrateBN(batches)])
    # Not function-preserving by design (the statistics move); the rest of the model must not.
    check_only_statistics_changed(state_before, model, what="the recalibrated model")
    result = results[RecalibrateBN.name]
    loss_after, accuracy_after = evaluate(model, data.x_test, data.y_test)

    example = [data.x_test[:2]]
    entry = {
        "command": "recalibrate",
        "data": f"{data.name} ({data.source})",
        "batches": args.batches,
        "batch_size": args.batch_size,
        "passes": {name: r.summary() for name, r in results.items()},
    }
    save(model, args.output, example_inputs=example, history=[*loaded.history, entry], source=args.model,
         force=args.force)
    notes = []
    report = Report(
        f"bngraph recalibrate {args.model}",
        sections={
            "recalibrated": result.details,
            "skipped": [{"bn": s.site, "reason": s.reason} for s in result.skipped],
        },
        facts={
            "data": f"{data.name} ({data.source})",
            "batches": args.batches,
            "batch_size": args.batch_size,
            "test_accuracy_before": accuracy_before,
            "test_accuracy_after": accuracy_after,
            "test_accuracy_change": accuracy_after - accuracy_before,
            "test_loss_before": loss_before,
            "test_loss_after": loss_after,
            "output": args.output,
        },
        notes=notes,
    )
    emit(report, args)
    return 0

