"""Constant subgraphs become initializers, so that the BN rules see constants."""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule
from torch import nn

from bngraph.passes.onnx_fold_constants import onnx_fold_constants
from tests.onnx_util import FOLD_ATOL, export_onnx, fold_and_check, ops
from tests.util import randomize_bn


def model(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(*layers))


def test_folds_the_computed_bias_of_a_bias_free_conv():
    original = export_onnx(model(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 3, 8, 8), "dynamo")
    assert {"Shape", "Expand", "CastLike"} <= set(ops(original))  # the exporter computes a zero bias
    result = onnx_fold_constants(ir.serde.deserialize_model(original))
    assert ops(result.graph) == ["Conv", "BatchNormalization"]
    conv = next(iter(result.graph.graph))
    assert conv.inputs[2].is_initializer() and not conv.inputs[2].const_value.numpy().any()
    assert {"Expand", "CastLike", "Shape"} <= {d["op"] for d in result.details}
    folded, report, check = fold_and_check(original)
    assert report.facts["batchnorms_after"] == 0 and check and check.worst.max_abs < FOLD_ATOL


def test_the_computed_bias_blocks_onnxscripts_rule_without_it():
    # Why this pass runs first: the stock rule needs the bias as an initializer.
    original = export_onnx(model(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 3, 8, 8), "dynamo")
    assert fuse_batchnorm_into_conv_rule.apply_to_model(ir.serde.deserialize_model(original)) == 0
    folded = onnx_fold_constants(ir.serde.deserialize_model(original)).graph
    assert fuse_batchnorm_into_conv_rule.apply_to_model(folded) == 1


def test_folds_the_transposed_weight_of_a_torchscript_linear():
    class LinearOnSequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.linear(x).transpose(1, 2)).transpose(1, 2)

    torch.manual_seed(0)
    original = export_onnx(randomize_bn(LinearOnSequence()), (2, 4, 6), "nofold")
    assert ops(original)[0] == "Transpose"  # Transpose(W), computed at every run
    result = onnx_fold_constants(ir.serde.deserialize_model(original))
    assert ops(result.graph) == ["MatMul", "Add", "Transpose", "BatchNormalization", "Transpose"]
    folded, report, check = fold_and_check(original)
    assert report.facts["batchnorms_after"] == 0 and check and check.worst.max_abs < FOLD_ATOL


def test_does_nothing_when_weights_are_already_initializers():
    original = export_onnx(model(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8), "preserve")
    result = onnx_fold_constants(ir.serde.deserialize_model(original))
    assert result.changed == [] and ops(result.graph) == ops(original)
