"""Helpers for the ONNX tests: export a model the ways users do, fold it, measure the error.

What each exporter leaves on torch 2.13 (measured; tests/passes/test_onnx_fold_constants.py
and test_onnx_fold_bn_into_preceding_layer.py pin it):
  dynamo       torch.onnx.export(dynamo=True, optimize=False): every BN, and a bias-free conv's
               bias as Expand(CastLike(0, x), Shape(W)[0:1])
  torchscript  dynamo=False, defaults: folds Conv+BN itself, leaves Gemm, MatMul and
               ConvTranspose before a BN, and every BN not after a layer
  preserve     dynamo=False, training=PRESERVE: every BN (training_mode=1 and three outputs
               when the model is in train mode)
  nofold       dynamo=False, do_constant_folding=False: every BN, Linear weights as Transpose(W)
  dynamo_optimize  dynamo=True, optimize=True (`bngraph export --exporter-optimize`): folds BN into
               Conv and Gemm, not into the MatMul of a Linear on (N, T, C)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings

import onnx
import onnx_ir as ir
import torch

from bngraph.onnx_fold import fold_onnx
from bngraph.runners import onnx_inputs, random_batches
from bngraph.compare import VerifyResult
from bngraph.verify import verify

MODES = ("dynamo", "torchscript", "preserve", "nofold", "dynamo_optimize")
# Folding reorders float32 arithmetic once per layer: errors of a few 1e-7 on these small
# models, so 1e-4 has a wide margin while a wrong fold (off by a BN statistic, ~0.1) fails.
FOLD_ATOL = 1e-4


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], mode: str = "dynamo") -> onnx.ModelProto:
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
    quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    quiet.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")  # TorchScript's TracerWarnings and PRESERVE advice
    log = logging.getLogger("torch.onnx")  # a warning per torchvision op it cannot find
    level = log.level
    log.setLevel(logging.ERROR)
    with quiet:
        try:
            if mode in ("dynamo", "dynamo_optimize"):
                batch = torch.export.Dim("batch")
                optimize = mode == "dynamo_optimize"
                program = torch.onnx.export(model, (x,), dynamo=True, optimize=optimize, dynamic_shapes=({0: batch},))
                return program.model_proto
            options = {
                "torchscript": {},
                "preserve": {"training": torch.onnx.TrainingMode.PRESERVE},
                "nofold": {"do_constant_folding": False},
            }[mode]
            buffer = io.BytesIO()
            torch.onnx.export(model, (x,), buffer, dynamo=False, **options)
            return onnx.load_from_string(buffer.getvalue())
        finally:
            log.setLevel(level)


def ops(model: onnx.ModelProto | ir.Model) -> list[str]:
    nodes = model.graph.node if isinstance(model, onnx.ModelProto) else model.graph
    return [n.op_type for n in nodes]


def check_against_input(original: onnx.ModelProto, folded: ir.Model) -> VerifyResult:
    """The folded model against the exported one, in onnxruntime at both levels."""
    data = original.SerializeToString()
    spec = onnx_inputs(data)
    sizes = (1, 3) if spec.fixed_batch is None else (spec.fixed_batch,)
    batches = random_batches(spec.shapes, sizes, spec.dtypes, batch_axes=spec.batch_axes)
    return verify(data, ir.serde.serialize_model(folded).SerializeToString(), batches, FOLD_ATOL, FOLD_ATOL)


def fold_and_check(original: onnx.ModelProto, **options):
    """fold_onnx (with `options`), then the comparison: (folded model, report, verification)."""
    folded, report = fold_onnx(original, **options)
    return folded, report, check_against_input(original, folded)


def run_in_ort(model: onnx.ModelProto | ir.Model, feeds: dict, level: str = "ORT_DISABLE_ALL") -> list:
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_error(original: onnx.ModelProto, folded: ir.Model, feeds: dict) -> float:
    """Largest |folded - original| / max |original| over the outputs, at both onnxruntime levels:
    relative, so that a wrong fold on small outputs cannot hide under an absolute tolerance."""
    import numpy as np

    worst = 0.0
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        for want, got in zip(run_in_ort(original, feeds, level), run_in_ort(folded, feeds, level), strict=True):
            want, got = want.astype(np.float64), got.astype(np.float64)
            worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)))
    return worst


def fold_file(in_path, out_path, *flags: str) -> tuple[int, dict]:
    """`bngraph fold IN [-o OUT] --json FLAGS...` as a user runs it: the exit code and the report."""
    from bngraph.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["fold", str(in_path), *(["-o", str(out_path)] if out_path else []), "--json", *flags])
    return code, json.loads(out.getvalue())
