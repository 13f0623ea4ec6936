"""Compare two models on the same inputs: bngraph verify A B [--json].

A (the reference) and B (the candidate) are any model specs: zoo:NAME, file.py[:Symbol], an
artifact folder or a .onnx file; --weights loads a state dict into A, --candidate-weights into B
(an artifact carries its own). Both run on random batches of 1 and of 7 (the batch axis must be
dynamic; --static-input names inputs without one), and on real images with --data DIR. An ONNX
model runs in onnxruntime on the CPU, at ORT_DISABLE_ALL (the graph as written) and at
ORT_ENABLE_ALL (as deployed); --reference adds onnx's ReferenceEvaluator. Outputs are compared
by name (dicts, dataclasses, tuples are flattened: 'logits', 'hidden_states.0'), or by position
against an ONNX graph; comparing nothing is an error. One PASSED/FAILED line per output and
runtime; exit 1 if any fails.

What passing means: for every output and every element, with r from A and c from B,
  |c - r| <= atol * scale + rtol * |r|,  scale = RMS of A's output (over all batches)
so atol is a fraction of the output's own magnitude. Defaults: atol = rtol = 1e-4 against
ONNX, 1e-5 between two PyTorch models (see bngraph/verify.py).

Examples:
  bngraph verify model.py:Net folded/ --weights net.pt     the fold computes what Net computed
  bngraph verify runs/x5 x5.onnx --data ~/mnist
  bngraph verify lm.py:Model lm.onnx --input-shape "2,16;16,16" --input-dtype "int64;float32" --static-input 1
"""

from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI builds its parser without numpy, torch or onnx
    import numpy as np

from bngraph.commands.common import add_input_arguments, add_report_arguments, emit
from bngraph.errors import UserError

DATA_EXAMPLES = 97  # an odd batch of real images, besides the random ones


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="model A: zoo:NAME, file.py[:Symbol], an artifact folder or a .onnx file")
    parser.add_argument("candidate", help="model B, the same kinds")
    parser.add_argument("--weights", metavar="FILE", help="load this state dict into A (a PyTorch model) first")
    parser.add_argument("--candidate-weights", metavar="FILE", help="load this state dict into B first")
    add_input_arguments(parser)
    add_tolerance_arguments(parser)
    parser.add_argument("--reference", dest="evaluator", action="store_true", help="also run onnx's ReferenceEvaluator")
    parser.add_argument("--data", metavar="DIR", help="also compare on the first test images of an MNIST-format folder")
    add_report_arguments(parser)


def add_tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--atol",
        type=float,
        metavar="X",
        help="tolerance as a fraction of each output's RMS (default: by what is compared)",
    )
    parser.add_argument(
        "--rtol", type=float, metavar="X", help="tolerance relative to each element |r| (default: by what is compared)"
    )


def run(args: argparse.Namespace) -> int:
    from bngraph.load import load_model
    from bngraph.report import Report
    from bngraph.runners import BATCH_SIZES, onnx_inputs, random_batches
    from bngraph.spec import parse_input_dtypes, parse_input_shapes, parse_model_spec
    from bngraph.verify import print_lines, verify

    given = parse_input_shapes(args.input_shape) if args.input_shape else None
    static = args.static_input or ()
    models, loaded, onnx_specs, onnx_texts = [], [], [], []
    sides = (
        (args.reference, args.weights, "--weights"),
        (args.candidate, args.candidate_weights, "--candidate-weights"),
    )
    for text, weights, flag in sides:
        spec = parse_model_spec(text)
        if spec.kind == "onnx":
            if weights:
                raise UserError(f"{flag} loads a PyTorch state dict; {text} is an ONNX file with its own weights")
            models.append(spec.path)
            onnx_specs.append(onnx_inputs(spec.path, given, static))
            onnx_texts.append(text)
        else:
            model = load_model(
                spec, weights=weights, input_shape=args.input_shape, input_dtype=args.input_dtype, static_inputs=static
            )
            models.append(model.module)
            if model.input_shapes:
                loaded.append(model)
    # The PyTorch side's declared shapes first, else the ONNX graph's (batch axis symbolic); the
    # dtypes the user gave, else the ONNX graph's, else the PyTorch side's.
    if loaded:
        shapes = loaded[0].input_shapes
    elif onnx_specs:
        shapes = onnx_specs[0].shapes
    else:
        raise UserError(f"neither {args.reference} nor {args.candidate} declares an input shape: give --input-shape")
    if args.input_dtype:
        dtypes = parse_input_dtypes(args.input_dtype)
        if len(dtypes) != len(shapes):
            raise UserError(f"--input-dtype gives {len(dtypes)} dtypes for {len(shapes)} inputs")
        for onnx_spec, text in zip(onnx_specs, onnx_texts):
            declared = [d.name for d in onnx_spec.dtypes]
            if declared != dtypes:
                raise UserError(f"--input-dtype gives {';'.join(dtypes)}; {text} declares {';'.join(declared)}")
    else:
        dtypes = onnx_specs[0].dtypes if onnx_specs else loaded[0].input_dtypes
    # An input has a batch axis only where every side says so.
    sides_axes = [m.batch_axes for m in loaded] + [s.batch_axes for s in onnx_specs]
    if any(len(axes) != len(shapes) for axes in sides_axes):
        counts = sorted({len(axes) for axes in sides_axes} | {len(shapes)})
        raise UserError(f"the two models declare different numbers of inputs {counts}: give --input-shape")
    batch_axes = [0 if all(axes[i] == 0 for axes in sides_axes) else None for i in range(len(shapes))]
    fixed = {s.fixed_batch for s in onnx_specs} - {None}
    if len(fixed) > 1:
        raise UserError(f"the two ONNX files fix different batch sizes {sorted(fixed)}: no input fits both")
    sizes = (fixed.pop(),) * 2 if fixed else BATCH_SIZES
    batches = random_batches(shapes, sizes, dtypes, batch_axes=batch_axes)
    batch_sizes = list(sizes)
    if args.data:
        batches.append(_data_batch(args.data, shapes))
        batch_sizes.append(len(batches[-1][0]))
    result = verify(
        models[0], models[1], batches, args.atol, args.rtol, evaluator=args.evaluator, batch_sizes=batch_sizes
    )
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
    import numpy as np

    from bngraph.data import resolve_dataset

    if len(shapes) != 1:
        raise UserError(f"--data feeds images to a model with one input, not {len(shapes)}")
    x_test = resolve_dataset(folder).as_float()[2][:DATA_EXAMPLES]
    example, values = tuple(shapes[0][1:]), x_test[0].numel()
    if int(np.prod(example)) != values:
        needs = int(np.prod(example))
        raise UserError(f"--data images have {values} values each; the model's input {example} needs {needs}")
    return [x_test.reshape(len(x_test), *example).numpy()]
