"""Put a BatchNorm before every nonlinearity of a model and save the result.

Traces MODEL with torch.fx and inserts a BatchNorm{1,2,3}d in front of each elementwise
nonlinearity (module, functional or method form) whose input is not already normalized: one
feature per channel for convolutions, per last-axis feature for Linear on (N, T, C). The bias of
a conv/linear feeding only the new BatchNorm is dropped (beta replaces it; paper Sec. 3.2).
Running it on its own output changes nothing.

A submodule torch.fx cannot follow (a shape check, HF Swin's windows, `if self.training:`) stays
one call; the activation modules inside it get their BatchNorm by running the model. Where the
model's own forward cannot be traced, every activation module is wrapped that way (the
module-level fallback; --no-fallback does neither). The report lists what got no BatchNorm,
each with why (skipped, not_handled).

--preserve calibrates the new BatchNorms so that the model in eval mode computes exactly what it
computed before (for pretrained weights); training then continues from there.

Examples:
  bngraph insert zoo:inception -o inception-bn
  bngraph insert model.py:Net --input-shape 8,3,32,32 --weights net.pt --preserve -o net-bn
"""

from __future__ import annotations

import argparse

from bngraph.atomic import ARTIFACT
from bngraph.commands import args as shared
from bngraph.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_model_arguments(parser)
    parser.add_argument("-o", "--output", metavar="DIR", help="artifact folder to write")
    parser.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    parser.add_argument(
        "--preserve", action="store_true", help="calibrate the new BatchNorms so the eval-mode function is unchanged"
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="with --preserve: calibrate on 512 training images of this data (any format `bngraph train` reads; "
        "an image folder is decoded to the model's input) instead of random inputs shaped like the example",
    )
    parser.add_argument(
        "--no-fallback",
        action="store_true",
        help="never wrap activation modules by running the model: fail when torch.fx cannot trace the "
        "model's forward, and leave those inside submodules it keeps whole (listed in not_handled)",
    )
    shared.add_force_argument(parser, "artifact folder")
    shared.add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.data and not args.preserve:
        raise UserError("--data is the calibration data of --preserve; add --preserve")
    if not args.output and not args.dry_run:
        raise UserError("insert needs -o DIR (or --dry-run to only report)")
    output = None if args.dry_run else args.output
    if output:
        shared.check_output_first(args, ARTIFACT)
    from bngraph.insert import insert_artifact  # torch: only once the command runs

    loaded = shared.load_from_args(args)
    _, report = insert_artifact(
        loaded, output, preserve=args.preserve, data=args.data, fallback=not args.no_fallback, force=args.force
    )
    if args.dry_run:
        report.notes.append(f"--dry-run: nothing written{f' (not {args.output})' if args.output else ''}")
    shared.emit(report, args)
    return 0
