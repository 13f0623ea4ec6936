"""BN folded into the layer before it: one test per pattern and per guard, on real exports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bngraph.passes.base import run_passes
from bngraph.passes.onnx_fold_bn_into_preceding_layer import onnx_fold_bn_into_preceding_layer
from bngraph.passes.onnx_fold_constants import onnx_fold_constants
from tests.onnx_models import ConvOutputShared
from tests.onnx_util import FOLD_ATOL, export_onnx, fold_and_check, ops
from tests.util import randomize_bn


def seq(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(*layers))


class LinearOnSequence(nn.Module):
    """A Linear on (N, T, C), and BatchNorm1d over its C features through the transposes users write."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.linear, self.bn = nn.Linear(6, 5, bias=bias), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.linear(x).transpose(1, 2)).transpose(1, 2)


class AddMM(nn.Module):
    """x @ W + b written as addmm: the TorchScript exporter makes a Gemm without transB."""

    def __init__(self):
        super().__init__()
        self.w, self.b, self.bn = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5)), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(torch.addmm(self.b, x, self.w))


def built(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(module)


# (id, model builder, input shape, exporter mode, the op the BN must fold into)
# fmt: off
PATTERNS = [
    ("conv2d_bias", lambda: seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8), "dynamo", "Conv"),
    ("conv2d_no_bias", lambda: seq(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 3, 8, 8), "dynamo", "Conv"),
    ("eps", lambda: seq(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, eps=0.1)), (2, 3, 8, 8), "preserve", "Conv"),
    ("grouped", lambda: seq(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8)), (2, 4, 8, 8), "nofold", "Conv"),
    ("depthwise", lambda: seq(nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4)), (2, 4, 8, 8), "dynamo", "Conv"),
    ("conv1d", lambda: seq(nn.Conv1d(3, 4, 3, bias=False), nn.BatchNorm1d(4)), (2, 3, 9), "preserve", "Conv"),
    ("conv3d", lambda: seq(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5), "nofold", "Conv"),
    ("conv_transpose", lambda: seq(nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm2d(6)), (2, 4, 5, 5), "torchscript", "ConvTranspose"),
    ("conv_transpose_groups_2", lambda: seq(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6)), (2, 4, 5, 5), "dynamo", "ConvTranspose"),
    ("linear_2d", lambda: seq(nn.Linear(6, 5), nn.BatchNorm1d(5)), (2, 6), "torchscript", "Gemm"),
    ("gemm_without_trans_b", lambda: built(AddMM()), (2, 6), "torchscript", "Gemm"),
    ("linear_on_sequence", lambda: built(LinearOnSequence()), (2, 4, 6), "dynamo", "MatMul"),
    ("linear_on_sequence_weight_transposed", lambda: built(LinearOnSequence()), (2, 4, 6), "nofold", "MatMul"),
    ("linear_on_sequence_no_bias", lambda: built(LinearOnSequence(bias=False)), (2, 4, 6), "preserve", "MatMul"),
]
# fmt: on


@pytest.mark.parametrize(("make", "shape", "mode", "into"), [p[1:] for p in PATTERNS], ids=[p[0] for p in PATTERNS])
def test_folds_bn_into_the_layer_before(make, shape, mode, into):
    original = export_onnx(make(), shape, mode)
    assert ops(original).count("BatchNormalization") == 1  # the exporter left it: a real case
    folded, report, check = fold_and_check(original)
    assert "BatchNormalization" not in ops(folded)
    [row] = report.sections["folded"]
    assert row["how"] == "into the layer before it" and row["into"].startswith(f"{into} ")
    assert check, check.lines()
    assert check.worst.max_abs < FOLD_ATOL


@pytest.mark.parametrize(
    ("mode", "conv", "linear", "sequence"),
    [
        ("dynamo", 1, 1, 1),
        ("torchscript", 0, 1, 1),
        ("preserve", 1, 1, 1),
        ("nofold", 1, 1, 1),
        ("dynamo_optimize", 0, 0, 1),
    ],
)
def test_which_exporters_leave_batchnorm(mode, conv, linear, sequence):
    # Measured on torch 2.13: the BNs each exporter leaves, which the cases above are built on.
    def left(model, shape):
        return ops(export_onnx(model, shape, mode)).count("BatchNormalization")

    assert left(seq(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 3, 8, 8)) == conv
    assert left(seq(nn.Linear(6, 5), nn.BatchNorm1d(5)), (2, 6)) == linear
    assert left(built(LinearOnSequence()), (2, 4, 6)) == sequence


def test_skips_bn_whose_conv_output_also_feeds_an_add():
    original = export_onnx(built(ConvOutputShared()), (2, 3, 6, 6), "preserve")
    model, results = run_passes(_ir(original), [onnx_fold_constants, onnx_fold_bn_into_preceding_layer])
    [skip] = results["onnx_fold_bn_into_preceding_layer"].skipped
    assert "also feeds" in skip.reason and "Add" in skip.reason
    assert ops(model).count("BatchNormalization") == 1


def test_skips_bn_over_the_sequence_axis_of_a_linear():
    class WrongAxis(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(4)  # over T, not the features

        def forward(self, x):
            return self.bn(self.linear(x))

    original = export_onnx(built(WrongAxis()), (2, 4, 6), "nofold")
    model, results = run_passes(_ir(original), [onnx_fold_constants, onnx_fold_bn_into_preceding_layer])
    [skip] = results["onnx_fold_bn_into_preceding_layer"].skipped
    assert skip.reason == "it normalizes axis 1 of a rank-3 MatMul output, not its features"


def test_refuses_a_training_mode_bn():
    model = seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    original = export_onnx(model, (2, 3, 6, 6), "preserve")
    folded, results = run_passes(_ir(original), [onnx_fold_constants, onnx_fold_bn_into_preceding_layer])
    [skip] = results["onnx_fold_bn_into_preceding_layer"].skipped
    assert "training mode" in skip.reason
    assert ops(folded).count("BatchNormalization") == 1


def test_does_nothing_without_batchnorm():
    original = export_onnx(seq(nn.Conv2d(3, 4, 3), nn.ReLU()), (2, 3, 6, 6), "preserve")
    _, results = run_passes(_ir(original), [onnx_fold_bn_into_preceding_layer])
    assert results["onnx_fold_bn_into_preceding_layer"].changed == [] and results["onnx_fold_bn_into_preceding_layer"].skipped == []


def _ir(proto):
    import onnx_ir as ir

    return ir.serde.deserialize_model(proto)
