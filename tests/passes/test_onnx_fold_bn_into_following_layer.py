"""A BN with no layer before it folds into the Conv or Gemm after it, where that is exact."""

from __future__ import annotations

import onnx_ir as ir
import torch
from torch import nn

from bngraph.passes.base import run_passes
from bngraph.passes.onnx_fold_bn_into_preceding_layer import onnx_fold_bn_into_preceding_layer
from bngraph.passes.onnx_fold_bn_into_following_layer import onnx_fold_bn_into_following_layer
from bngraph.passes.onnx_fold_constants import onnx_fold_constants
from tests.onnx_util import FOLD_ATOL, export_onnx, fold_and_check, ops
from tests.util import randomize_bn


def model(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(*layers))


def test_folds_bn_into_a_following_conv_without_padding():
    original = export_onnx(model(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3)), (2, 3, 8, 8), "dynamo")
    folded, report, check = fold_and_check(original)
    assert ops(folded) == ["Conv"]
    [row] = report.sections["folded"]
    assert row["how"] == "into the layer after it" and row["into"].startswith("Conv ")
    assert "graph input" in row["note"]  # why it could not go backwards
    assert check and check.worst.max_abs < FOLD_ATOL


def test_folds_bn_into_a_following_grouped_conv():
    original = export_onnx(model(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2, bias=False)), (2, 4, 8, 8), "preserve")
    folded, report, check = fold_and_check(original)
    assert ops(folded) == ["Conv"]
    assert check and check.worst.max_abs < FOLD_ATOL


def test_folds_bn_into_a_following_linear():
    original = export_onnx(model(nn.BatchNorm1d(6), nn.Linear(6, 5)), (2, 6), "torchscript")
    folded, report, check = fold_and_check(original)
    assert ops(folded) == ["Gemm"]
    assert check and check.worst.max_abs < FOLD_ATOL


def test_skips_a_conv_with_zero_padding():
    # The padded border is 0 after the BN; folded, it would be 0 before it: not the same.
    original = export_onnx(model(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1)), (2, 3, 8, 8), "dynamo")
    _, results = run_passes(ir.serde.deserialize_model(original), [onnx_fold_constants, onnx_fold_bn_into_following_layer])
    [skip] = results["onnx_fold_bn_into_following_layer"].skipped
    assert "pads with zeros" in skip.reason
    folded, report, check = fold_and_check(original, standalone_bn="mul-add")
    assert ops(folded) == ["Mul", "Add", "Conv"]
    assert [row["how"] for row in report.sections["folded"]] == ["multiply-add"]
    assert check and check.worst.max_abs < FOLD_ATOL
    folded, report, check = fold_and_check(original)  # for onnxruntime: the BN stays, reported
    assert ops(folded) == ["BatchNormalization", "Conv"] and report.sections["remaining"] == []
    [kept] = report.sections["kept"]
    assert "pads with zeros" in kept["note"] and check and check.worst.max_abs < FOLD_ATOL


def test_does_nothing_when_every_bn_follows_a_layer():
    original = export_onnx(model(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)), (2, 3, 8, 8), "preserve")
    passes = [onnx_fold_constants, onnx_fold_bn_into_preceding_layer, onnx_fold_bn_into_following_layer]
    _, results = run_passes(ir.serde.deserialize_model(original), passes)
    assert results["onnx_fold_bn_into_following_layer"].changed == []
    assert results["onnx_fold_bn_into_following_layer"].skipped == []
