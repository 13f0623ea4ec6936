"""The last ONNX pass: dead weights removed, nodes sorted, the full checker passes."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

from bngraph.passes.base import run_passes
from bngraph.passes.onnx_check import onnx_check
from bngraph.passes.onnx_fold_bn_into_preceding_layer import onnx_fold_bn_into_preceding_layer
from tests.onnx_util import export_onnx
from tests.util import randomize_bn


def test_removes_the_statistics_a_fold_left_behind():
    torch.manual_seed(0)
    original = export_onnx(randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))), (2, 3, 6, 6), "preserve")
    model, results = run_passes(ir.serde.deserialize_model(original), [onnx_fold_bn_into_preceding_layer, onnx_check])
    assert {"1.running_mean", "1.running_var", "1.weight", "1.bias"} <= set(results["onnx_check"].changed)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_raises_on_a_model_the_checker_rejects():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    relu = ir.node("Relu", [x, x])  # Relu takes one input
    graph = ir.Graph([x], relu.outputs, nodes=[relu], opset_imports={"": 21})
    relu.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    with pytest.raises(onnx.checker.ValidationError):
        onnx_check(ir.Model(graph, ir_version=10))
