"""Export a model to ONNX, BN folded and the file verified: bngraph export MODEL -o model.onnx.

The model is folded by the FX passes, exported with torch.onnx.export (dynamo=True) with a
dynamic batch axis, folded again at the ONNX level (whatever the FX fold could not reach),
then run in onnxruntime on verify's batches (1 and 7) and an even one against the unfolded
model. A BN that no layer can take exactly stays a BatchNormalization, the fastest exact form in onnxruntime, or becomes a
Mul and an Add with --standalone-bn mul-add (for a runtime without a BN kernel). Exit 1, and no file,
when they differ beyond tolerance (default: atol = rtol = 1e-4).
"""

from __future__ import annotations

import argparse

from bngraph.atomic import ONNX
from bngraph.commands import args as shared


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    parser.add_argument(
        "--exporter-optimize",
        action="store_true",
        help="turn on torch.onnx's own optimizer (it also folds BN into Conv/Gemm)",
    )
    parser.add_argument("--no-fold", action="store_true", help="skip the FX fold (the ONNX passes still fold)")
    shared.add_standalone_bn_argument(parser)
    shared.add_tolerance_arguments(parser)
    shared.add_force_argument(parser, ".onnx file (its producer is bngraph)")
    shared.add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    shared.check_output_first(args, ONNX)
    from bngraph.export import export  # torch and onnx: only once the command runs
    from bngraph.load import module_with_its_meaning

    loaded = shared.load_from_args(args)
    result = export(
        module_with_its_meaning(loaded),  # its input scale and classes go into the file's metadata
        loaded.example_inputs(),
        args.output,
        fold=not args.no_fold,
        exporter_optimize=args.exporter_optimize,
        atol=args.atol,
        rtol=args.rtol,
        force=args.force,
        standalone_bn=args.standalone_bn or "batchnorm",
    )
    result.report.facts = {"model": args.model, **result.report.facts}
    shared.emit(result.report, args)
    shared.print_lines(result.verification, args)
    return 0 if result else 1
