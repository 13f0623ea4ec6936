"""Fold each BatchNorm into a neighbouring layer, for inference (paper, Algorithm 2 step 3).

Puts MODEL in eval mode and traces it. Each BatchNorm then becomes part of the conv, transposed
conv or linear layer that produces its input (matched by operation, with a shape proof that
it normalizes that layer's features), or else of the conv or linear that consumes its output
where that is exact (no zero padding), or else one per-channel multiply-add. A BatchNorm
without running statistics is left, with its reason. The report lists what went where, what
was left and why, and the op counts before and after.

Where torch.fx cannot follow a submodule (a shape check, HF attention), the rest is traced as
above and the BatchNorms inside that submodule fold module by module, into the conv or linear
module that produced their input; where it cannot trace the model's own forward, every
BatchNorm folds that way. The result is checked against MODEL before anything is written.

MODEL may also be an ONNX file, folded in ONNX.

Examples:
  bngraph fold net-bn/ -o net-folded          an artifact: bngraph.load('net-folded')
  bngraph fold model.py:Net --json --strict   no -o: a check, nothing written; exit 1 if any BatchNorm is left
  bngraph fold model.onnx -o folded.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bngraph.atomic import ARTIFACT, refuse_inside_bngraph_folder
from bngraph.commands import args as shared
from bngraph.errors import UserError
from bngraph.spec import parse_input_dtypes, parse_input_shapes, parse_model_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_model_arguments(parser, onnx=True)
    parser.add_argument("-o", "--output", metavar="OUT", help="artifact folder to write (a .onnx file for ONNX input)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any BatchNorm is left (the output is still written)")
    # An ONNX fold is checked against its input in onnxruntime; an FX fold computes in float64.
    parser.add_argument("--atol", type=float, metavar="X", help="ONNX input: absolute tolerance of that check")
    parser.add_argument("--rtol", type=float, metavar="X", help="ONNX input: relative tolerance of that check")
    shared.add_standalone_bn_argument(parser, "ONNX input: ")
    overridable = "ONNX input: initializers also listed as graph inputs stay overridable inputs, not constants"
    parser.add_argument("--keep-initializer-inputs", action="store_true", help=overridable)
    shared.add_force_argument(parser, "artifact folder (ONNX input: .onnx file)")
    shared.add_report_arguments(parser)


# Without -o, a fold is a check: what would fold, and that the result computes what MODEL does.
NOTHING_WRITTEN = "no -o: folded and checked, nothing written"


def run(args: argparse.Namespace) -> int:
    spec = parse_model_spec(args.model)
    if spec.kind == "onnx":
        if args.output is not None:
            refuse_inside_bngraph_folder(args.output)
        return fold_onnx_file(spec.path, args.output, args)
    # Silently ignored, --atol 0.1 read as "checked at 0.1": a PyTorch fold has none of these.
    onnx_only = [flag for flag, value in (("--atol", args.atol), ("--rtol", args.rtol),
                                          ("--standalone-bn", args.standalone_bn),
                                          ("--keep-initializer-inputs", args.keep_initializer_inputs or None))
                 if value is not None]
    if onnx_only:
        raise UserError(f"{', '.join(onnx_only)} {'applies' if len(onnx_only) == 1 else 'apply'} to an ONNX input "
                        f"only; {args.model} is folded in PyTorch")
    if args.output is not None:  # a PyTorch fold writes a folder, never x.onnx
        shared.check_output_first(args, ARTIFACT)
    from bngraph.fold import fold_artifact  # torch: only once the command runs

    _, report = fold_artifact(shared.load_from_args(args), args.output, force=args.force)
    if args.output is None:
        report.notes.append(NOTHING_WRITTEN)
    shared.emit(report, args)
    if args.strict and (left := report.sections["remaining"]):
        print(f"bngraph: --strict: {len(left)} BatchNorm left, not folded (see 'remaining')", file=sys.stderr)
        return 1
    return 0


def fold_onnx_file(in_path: str | Path, out_path: str | Path | None, args: argparse.Namespace) -> int:
    """`bngraph fold in.onnx [-o out.onnx]`: fold, verify against the input in onnxruntime, write.

    Exit 1 and no file when the outputs differ beyond tolerance (--atol/--rtol where the
    command has them); with --strict, exit 1 (the verified file still written) when a
    BatchNormalization is left. Without -o, the folded model is verified but not saved.
    """
    from bngraph.onnx_fold import fold_onnx_verified  # onnx: only once the command runs
    from bngraph.runners import onnx_inputs

    # Both were silently ignored: the file's own weights folded, its own dtypes drawn.
    if args.weights:
        raise UserError(f"--weights loads a PyTorch state dict; {in_path} is an ONNX file with its own weights")
    if args.input_dtype:
        declared = [d.name for d in onnx_inputs(in_path).dtypes]
        if parse_input_dtypes(args.input_dtype) != declared:
            raise UserError(f"--input-dtype gives {args.input_dtype}; {in_path} declares {';'.join(declared)}")
    result, report = fold_onnx_verified(
        in_path,
        out_path,
        standalone_bn=args.standalone_bn or "batchnorm",
        keep_initializer_inputs=args.keep_initializer_inputs,
        input_shapes=parse_input_shapes(args.input_shape) if args.input_shape else None,
        static_inputs=args.static_input or (),
        atol=args.atol,
        rtol=args.rtol,
        force=args.force,
    )
    if out_path is None:
        report.notes.append(NOTHING_WRITTEN)
    shared.emit(report, args)
    shared.print_lines(result, args)
    # --strict is a gate for a runtime that has no BatchNormalization: a BN kept as the exact
    # form of a fixed map is still one in the file (mul-add writes it as Mul and Add instead).
    kept, left = len(report.sections["kept"]), len(report.sections["remaining"])
    if args.strict and (kept or left):
        why = [f"{left} not folded (see 'remaining')"] if left else []
        if kept:
            why.append(f"{kept} kept as the exact form of a BN no layer can take (see 'kept'; "
                       "--standalone-bn mul-add writes them as Mul and Add)")
        print(f"bngraph: --strict: {kept + left} BatchNormalization left: {'; '.join(why)}", file=sys.stderr)
        return 1
    return 0 if result else 1
