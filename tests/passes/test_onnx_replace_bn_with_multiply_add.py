"""A BN that no layer can absorb becomes Mul + Add when the target has no BN kernel (for
onnxruntime it stays: tests/test_onnx_trust.py); one in training mode stays either way."""

from __future__ import annotations

import onnx_ir as ir
import torch
from torch import nn

from bngraph.passes.base import run_passes
from bngraph.passes.onnx_replace_bn_with_multiply_add import onnx_replace_bn_with_multiply_add
from bngraph.passes.onnx_fold_constants import onnx_fold_constants
from tests.onnx_models import ConvOutputShared
from tests.onnx_util import FOLD_ATOL, export_onnx, fold_and_check, ops
from tests.util import randomize_bn


def built(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(module)


def test_bn_after_a_max_pool_becomes_mul_add():
    model = built(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4)))
    original = export_onnx(model, (2, 3, 8, 8), "dynamo")
    folded, report, check = fold_and_check(original, standalone_bn="mul-add")
    assert ops(folded) == ["Conv", "MaxPool", "Mul", "Add"]
    [row] = report.sections["folded"]
    assert row["how"] == "multiply-add" and "MaxPool" in row["note"]
    scale = next(n for n in folded.graph if n.op_type == "Mul").inputs[1]
    assert scale.const_value.shape == (4, 1, 1)  # per channel, broadcast over H and W
    assert check and check.worst.max_abs < FOLD_ATOL


def test_bn_on_a_conv_output_that_also_feeds_an_add_becomes_mul_add():
    original = export_onnx(built(ConvOutputShared()), (2, 3, 6, 6), "dynamo")
    folded, report, check = fold_and_check(original, standalone_bn="mul-add")
    [row] = report.sections["folded"]
    assert "BatchNormalization" not in ops(folded) and row["how"] == "multiply-add"
    assert "also feeds" in row["note"]
    assert check and check.worst.max_abs < FOLD_ATOL


def test_bn_on_2d_features_broadcasts_over_the_batch_only():
    original = export_onnx(built(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5))), (2, 6), "nofold")
    folded, report, check = fold_and_check(original, standalone_bn="mul-add")
    assert ops(folded)[-2:] == ["Mul", "Add"]
    assert check and check.worst.max_abs < FOLD_ATOL


def test_keeps_a_training_mode_bn():
    model = built(nn.Sequential(nn.MaxPool2d(2), nn.BatchNorm2d(3))).train()
    original = export_onnx(model, (2, 3, 6, 6), "preserve")
    folded, results = run_passes(ir.serde.deserialize_model(original), [onnx_fold_constants, onnx_replace_bn_with_multiply_add])
    [skip] = results["onnx_replace_bn_with_multiply_add"].skipped
    assert "training mode" in skip.reason
    assert ops(folded).count("BatchNormalization") == 1


def test_does_nothing_without_batchnorm():
    original = export_onnx(built(nn.Sequential(nn.Conv2d(3, 4, 3))), (2, 3, 6, 6), "preserve")
    result = onnx_replace_bn_with_multiply_add(ir.serde.deserialize_model(original))
    assert result.changed == [] and result.skipped == []
