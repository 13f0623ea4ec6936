"""Put a BatchNorm before every nonlinearity of a model and save the result.

Traces MODEL with torch.fx and inserts a BatchNorm{1,2,3}d in front of each elementwise
nonlinearity (module, functional or method form) whose input is not already normalized: one
feature per channel for convolutions, per last-axis feature for Linear on (N, T, C). The bias of
a conv/linear feeding only the new BatchNorm is dropped (beta replaces it; paper Sec. 3.2).
Running it on its own output changes nothing.

--preserve calibrates the new BatchNorms so that the model in eval mode computes exactly what it
computed before (for pretrained weights); training then continues from there.

Examples:
  bngraph insert zoo:inception -o inception-bn
  bngraph insert model.py:Net --input-shape 8,3,32,32 --weights net.pt --preserve -o net-bn
"""

from __future__ import annotations

import argparse

from bngraph.atomic import ARTIFACT, check_output
from bngraph.commands.common import (
    add_force_argument, add_model_arguments, add_report_arguments, emit, input_paths, load_from_args,
)  # fmt: skip
from bngraph.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", metavar="DIR", help="artifact folder to write")
    parser.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    parser.add_argument(
        "--preserve", action="store_true", help="calibrate the new BatchNorms so the eval-mode function is unchanged"
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="with --preserve: calibrate on these MNIST-format training images instead of random "
        "inputs shaped like the example",
    )
    parser.add_argument(
        "--no-fallback",
        action="store_true",
        help="fail when torch.fx cannot trace the model instead of wrapping activation modules",
    )
    add_force_argument(parser, "artifact folder")
    add_report_arguments(parser)


def _calibration_batches(data_dir: str, example_inputs, count: int = 8, batch: int = 64):
    import torch

    from bngraph.data import resolve_dataset

    if len(example_inputs) != 1:
        raise UserError("--data calibrates models with one image input; this model takes several inputs")
    dataset = resolve_dataset(data_dir)
    images = dataset.as_float()[0]
    want = tuple(example_inputs[0].shape[1:])
    if tuple(images.shape[1:]) != want:
        raise UserError(f"--data gives {dataset.name} images of shape {tuple(images.shape[1:])}; the model takes {want}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: count * batch]
    return [(images[order[i : i + batch]],) for i in range(0, len(order), batch)]


def run(args: argparse.Namespace) -> int:
    if args.data and not args.preserve:
        raise UserError("--data is the calibration data of --preserve; add --preserve")
    if not args.output and not args.dry_run:
        raise UserError("insert needs -o DIR (or --dry-run to only report)")
    if args.output and not args.dry_run:
        check_output(args.output, ARTIFACT, force=args.force, inputs=input_paths(args))  # before the work
    from bngraph.api import FALLBACK, insert
    from bngraph.artifacts import fallback_source, history_entry, module_source, save, wrapped_source

    loaded = load_from_args(args)
    example_inputs = loaded.example_inputs()
    calibration = _calibration_batches(args.data, example_inputs) if args.data else None
    model, report = insert(
        loaded.module,
        example_inputs,
        preserve=args.preserve,
        calibration_data=calibration,
        fallback=not args.no_fallback,
    )
    report.title = f"bngraph insert {args.model}"
    if args.output and not args.dry_run:
        code = None
        if report.facts["tracing"] == FALLBACK:
            code = wrapped_source(*fallback_source(loaded), report.passes["wrap_activation_modules"].details)
        elif loaded.spec.kind == "file":  # layers kept opaque are rebuilt by the user's own code
            shapes = [list(x.shape) for x in example_inputs]
            code = module_source(model, input_shapes=shapes, source=args.model, base=fallback_source(loaded))
        entry = {
            **history_entry("insert", report.passes),
            "preserve": args.preserve,
            "data": args.data,
            "report": report.to_json(),
        }
        save(
            model,
            args.output,
            example_inputs=example_inputs,
            history=[*loaded.history, entry],
            source=args.model,
            code=code,
            force=args.force,
        )
        report.facts["output"] = args.output
    emit(report, args)
    return 0
