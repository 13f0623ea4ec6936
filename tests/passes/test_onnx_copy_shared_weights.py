"""A conv weight shared by two convs: the folded conv gets its own copy, the other keeps W."""

from __future__ import annotations

import onnx_ir as ir
import torch
from torch import nn

from bngraph.passes.base import run_passes
from bngraph.passes.onnx_copy_shared_weights import onnx_copy_shared_weights
from bngraph.passes.onnx_fold_constants import onnx_fold_constants
from tests.onnx_util import FOLD_ATOL, export_onnx, fold_and_check, ops
from tests.util import randomize_bn


class ConvAppliedTwice(nn.Module):
    """One conv module called twice, each call followed by its own BN: two Conv nodes, one W."""

    def __init__(self, second_bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4) if second_bn else nn.Identity()

    def forward(self, x):
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


def built(module):
    torch.manual_seed(0)
    return randomize_bn(module)


def test_copies_a_weight_shared_by_two_convs():
    original = export_onnx(built(ConvAppliedTwice()), (2, 4, 6, 6), "dynamo")
    _, results = run_passes(ir.serde.deserialize_model(original), [onnx_fold_constants, onnx_copy_shared_weights])
    [row] = results["onnx_copy_shared_weights"].details  # the second conv is then the only user
    assert row["copied"] == "conv.weight, conv.bias"
    folded, report, check = fold_and_check(original)
    assert ops(folded) == ["Conv", "Relu", "Conv"]
    assert [row["how"] for row in report.sections["folded"]] == ["into the layer before it"] * 2
    assert check and check.worst.max_abs < FOLD_ATOL


def test_copies_for_the_folded_conv_only():
    # Only the first call has a BN: the second conv must keep the unfolded weight.
    original = export_onnx(built(ConvAppliedTwice(second_bn=False)), (2, 4, 6, 6), "nofold")
    folded, report, check = fold_and_check(original)
    weights = [n.inputs[1] for n in folded.graph if n.op_type == "Conv"]
    assert weights[0] is not weights[1] and weights[1].name == "conv.weight"
    assert report.facts["batchnorms_after"] == 0 and check and check.worst.max_abs < FOLD_ATOL


def test_does_nothing_when_no_weight_is_shared():
    original = export_onnx(built(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))), (2, 3, 6, 6), "preserve")
    result = onnx_copy_shared_weights(ir.serde.deserialize_model(original))
    assert result.changed == []
