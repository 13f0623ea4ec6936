"""Compare two models on the same inputs: bngraph verify A B [--json].

A (the reference) and B (the candidate) are any model specs: zoo:NAME, file.py[:Symbol], an
artifact folder or a .onnx file; --weights loads a state dict into A, --candidate-weights into B
(an artifact carries its own). Both run in eval mode, as deployed (what a model does in training
mode is not compared), on random batches of 1 and of 7 (the batch axis must be
dynamic; --static-input names inputs without one), and on real images with --data PATH. An ONNX
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

from bngraph.commands import args as shared


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="model A: zoo:NAME, file.py[:Symbol], an artifact folder or a .onnx file")
    parser.add_argument("candidate", help="model B, the same kinds")
    parser.add_argument("--weights", metavar="FILE", help="load this state dict into A (a PyTorch model) first")
    parser.add_argument("--candidate-weights", metavar="FILE", help="load this state dict into B first")
    shared.add_input_arguments(parser)
    shared.add_tolerance_arguments(parser)
    parser.add_argument("--reference", dest="evaluator", action="store_true", help="also run onnx's ReferenceEvaluator")
    parser.add_argument("--data", metavar="PATH", help="also compare on the first 97 test images of any data train "
                        "reads (MNIST IDX, image folder made the model's size, .npz, CIFAR binary, factory)")
    shared.add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from bngraph.verify import verify_models  # torch and onnx: only once the command runs

    result, report = verify_models(
        args.reference,
        args.candidate,
        weights=args.weights,
        candidate_weights=args.candidate_weights,
        input_shape=args.input_shape,
        input_dtype=args.input_dtype,
        static_inputs=args.static_input or (),
        data=args.data,
        atol=args.atol,
        rtol=args.rtol,
        evaluator=args.evaluator,
    )
    shared.emit(report, args)
    shared.print_lines(result, args)
    return 0 if result else 1
