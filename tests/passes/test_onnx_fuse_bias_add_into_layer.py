"""A bias written as Add(Conv, c), as Paddle2ONNX writes it, moves into the layer so the BN after it folds."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from bngraph.onnx_fold import fold_onnx
from bngraph.passes.onnx_fuse_bias_add_into_layer import onnx_fuse_bias_add_into_layer
from tests.onnx_models import BN_STATS, onnx_file, random_bn_stats
from tests.onnx_util import ops, relative_error


def layer_add_bn(op: str, add_shape: tuple[int, ...], *, bias: bool, add_also_feeds_output: bool = False):
    """x (N, 4, 6, 6) -> op (8 out channels, 3x3) -> Add(c of add_shape) -> BN [-> and the Add as an output]."""
    rng = np.random.default_rng(1)
    weight_shape = (8, 4, 3, 3) if op == "Conv" else (4, 4, 3, 3)  # ConvTranspose, group 2: 8 out
    arrays = {"W": rng.standard_normal(weight_shape).astype(np.float32), "c": rng.standard_normal(add_shape).astype(np.float32)}
    arrays.update(zip(BN_STATS, random_bn_stats((8,), seed=2)))
    inputs = ["x", "W"] + (["B"] if bias else [])
    if bias:
        arrays["B"] = rng.standard_normal(8).astype(np.float32)
    attrs = {"group": 2} if op == "ConvTranspose" else {}
    nodes = [
        helper.make_node(op, inputs, ["layer"], kernel_shape=[3, 3], **attrs),
        helper.make_node("Add", ["layer", "c"], ["sum"]),
        helper.make_node("BatchNormalization", ["sum", *BN_STATS], ["y"]),
    ]
    size = 4 if op == "Conv" else 8
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, size, size])]
    if add_also_feeds_output:
        outputs.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 8, size, size]))
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])]
    return onnx_file(nodes, x, outputs, arrays, opset=13, ir_version=7)


def feeds() -> dict:
    return {"x": np.random.default_rng(0).standard_normal((3, 4, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize(
    "op, add_shape, bias",
    [("Conv", (1, 8, 1, 1), False), ("Conv", (8, 1, 1), True), ("ConvTranspose", (1, 8, 1, 1), True)],
)
def test_a_bias_written_as_an_add_moves_into_the_layer_and_the_bn_folds(op, add_shape, bias):
    original = layer_add_bn(op, add_shape, bias=bias)
    folded, report = fold_onnx(original)
    assert ops(folded) == [op] and report.sections["remaining"] == report.sections["kept"] == []
    assert relative_error(original, folded, feeds()) < 1e-5


def test_an_add_that_is_not_per_channel_stays():
    original = layer_add_bn("Conv", (1, 1, 4, 4), bias=False)  # per position, not per channel
    result = onnx_fuse_bias_add_into_layer(ir.serde.deserialize_model(original))
    assert result.changed == []


def test_an_add_read_by_another_output_stays():
    original = layer_add_bn("Conv", (1, 8, 1, 1), bias=True, add_also_feeds_output=True)
    result = onnx_fuse_bias_add_into_layer(ir.serde.deserialize_model(original))
    assert result.changed == []
    folded, report = fold_onnx(original)
    assert "BatchNormalization" in ops(folded) and report.sections["remaining"] == []
    assert relative_error(original, folded, feeds()) < 1e-5
