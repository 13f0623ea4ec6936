"""A BN after a max pool with scales >= 0 moves before it and folds into the conv; one with a
negative scale stays (max(s x) = s min(x) for s < 0)."""

from __future__ import annotations

import onnx_ir as ir
import torch
from torch import nn

from bngraph.passes.base import run_passes
from bngraph.passes.onnx_fold_constants import onnx_fold_constants
from bngraph.passes.onnx_move_bn_before_max_pool import onnx_move_bn_before_max_pool
from tests.onnx_util import FOLD_ATOL, export_onnx, fold_and_check, ops
from tests.util import randomize_bn


def conv_pool_bn(gamma_sign: str, padding: int = 0) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(3, 2, padding=padding), nn.BatchNorm2d(8)))
    with torch.no_grad():
        gamma = model[2].weight
        if gamma_sign == "positive":
            gamma.abs_()
        elif gamma_sign == "zero_and_positive":
            gamma.abs_()[::3] = 0.0
        else:  # mixed, with at least one negative
            gamma[0] = -gamma[0].abs() - 0.1
    return model


def test_a_bn_with_positive_scales_moves_before_the_pool_and_folds_into_the_conv():
    for padding in (0, 1):  # MaxPool never takes the max over its padding
        original = export_onnx(conv_pool_bn("positive", padding), (2, 3, 13, 13), "dynamo")
        folded, report, check = fold_and_check(original)
        assert ops(folded) == ["Conv", "MaxPool"] and report.sections["kept"] == []
        assert [row["how"] for row in report.sections["folded"]] == ["into the layer before it"]
        assert check and check.worst.max_abs < FOLD_ATOL


def test_zero_scales_move_too():
    original = export_onnx(conv_pool_bn("zero_and_positive"), (2, 3, 13, 13), "dynamo")
    folded, _, check = fold_and_check(original)
    assert ops(folded) == ["Conv", "MaxPool"] and check and check.worst.max_abs < FOLD_ATOL


def test_a_negative_scale_keeps_the_bn_after_the_pool_with_the_reason():
    original = export_onnx(conv_pool_bn("mixed"), (2, 3, 13, 13), "dynamo")
    model = ir.serde.deserialize_model(original)
    _, results = run_passes(model, [onnx_fold_constants, onnx_move_bn_before_max_pool])
    [skip] = results["onnx_move_bn_before_max_pool"].skipped
    assert "scales are negative" in skip.reason
    folded, report, check = fold_and_check(original)
    assert ops(folded) == ["Conv", "MaxPool", "BatchNormalization"] and report.sections["remaining"] == []
    assert check and check.worst.max_abs < FOLD_ATOL


def test_does_nothing_when_a_relu_stands_between_the_conv_and_the_pool():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(8)))
    with torch.no_grad():
        model[3].weight.abs_()
    result = onnx_move_bn_before_max_pool(ir.serde.deserialize_model(export_onnx(model, (2, 3, 10, 10), "dynamo")))
    assert result.changed == [] and result.skipped == []
