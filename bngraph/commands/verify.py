"""Compare two models on the same inputs: bngraph verify A B [--json].

A (the reference) and B are any model specs: zoo:NAME, file.py[:Symbol], an artifact folder or
a .onnx file. Both run on random batches of 1 and of 7 (the batch axis must be dynamic), and on
real images with --data DIR. An ONNX model runs in onnxruntime on the CPU, at ORT_DISABLE_ALL
(the graph as written) and at ORT_ENABLE_ALL (as deployed); --reference adds onnx's
ReferenceEvaluator. One PASSED/FAILED line per output and runtime; exit 1 if any fails.

An element fails only beyond both tolerances: |b - a| > atol + rtol * |a|. Defaults:
atol = rtol = 1e-4 against ONNX, 1e-5 between two PyTorch models (see bngraph/verify.py).
"""

from __future__ import annotations

import argparse

import numpy as np

from bngraph.commands.common import add_report_arguments, emit
from bngraph.errors import UserError

DATA_EXAMPLES = 97  # an odd batch of real images, besides the random ones


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="model A: zoo:NAME, file.py[:Symbol], an artifact folder or a .onnx file")
    parser.add_argument("candidate", help="model B, the same kinds")
    parser.add_argument(
        "--input-shape", metavar="SHAPE", help="example input, batch first: 2,3,32,32 (default: declared)"
    )
    add_tolerance_arguments(parser)
    parser.add_argument("--reference", dest="evaluator", action="store_true", help="also run onnx's ReferenceEvaluator")
    parser.add_argument("--data", metavar="DIR", help="also compare on the first test images of an MNIST-format folder")
    add_report_arguments(parser)


def add_tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=float, metavar="X", help="absolute tolerance (default: by what is compared)")
    parser.add_argument("--rtol", type=float, metavar="X", help="relative tolerance (default: by what is compared)")


def run(args: argparse.Namespace) -> int:
    from bngraph.load import load_model
    from bngraph.report import Report
    from bngraph.spec import parse_input_shapes, parse_model_spec
    from bngraph.runners import BATCH_SIZES, onnx_inputs, random_batches
    from bngraph.verify import print_lines, verify

    given = parse_input_shapes(args.input_shape) if args.input_shape else None
    models, torch_shapes, onnx_specs = [], None, []
    for text in (args.reference, args.candidate):
        spec = parse_model_spec(text)
        if spec.kind == "onnx":
            models.append(spec.path)
            onnx_specs.append(onnx_inputs(spec.path, given))
        else:
            loaded = load_model(spec, input_shape=args.input_shape)
            models.append(loaded.module)
            torch_shapes = torch_shapes or loaded.input_shapes
    # The PyTorch side's declared shapes first, else the ONNX graph's (batch axis symbolic).
    shapes = torch_shapes or (onnx_specs[0].shapes if onnx_specs else None)
    if shapes is None:
        raise UserError(f"neither {args.reference} nor {args.candidate} declares an input shape: give --input-shape")
    fixed = {s.fixed_batch for s in onnx_specs} - {None}
    if len(fixed) > 1:
        raise UserError(f"the two ONNX files fix different batch sizes {sorted(fixed)}: no input fits both")
    sizes = (fixed.pop(),) * 2 if fixed else BATCH_SIZES
    dtypes = onnx_specs[0].dtypes if onnx_specs else None
    batches = random_batches(shapes, sizes, dtypes)
    if args.data:
        batches.append(_data_batch(args.data, shapes))
    result = verify(models[0], models[1], batches, args.atol, args.rtol, evaluator=args.evaluator)
    report = Report(
        "bngraph verify",
        facts={"reference": args.reference, "candidate": args.candidate, **result.facts()},
        sections={"outputs": [d.row() for d in result.diffs]},
    )
    if sizes != BATCH_SIZES:
        report.notes.append(f"an ONNX file fixes the batch at {sizes[0]}: compared at that batch only")
    emit(report, args)
    print_lines(result, args)
    return 0 if result else 1


def _data_batch(folder: str, shapes) -> list[np.ndarray]:
    from bngraph.data import resolve_dataset

    if len(shapes) != 1:
        raise UserError(f"--data feeds images to a model with one input, not {len(shapes)}")
    x_test = resolve_dataset(folder).as_float()[2][:DATA_EXAMPLES]
    example, values = tuple(shapes[0][1:]), x_test[0].numel()
    if int(np.prod(example)) != values:
        needs = int(np.prod(example))
        raise UserError(f"--data images have {values} values each; the model's input {example} needs {needs}")
    return [x_test.reshape(len(x_test), *example).numpy()]
