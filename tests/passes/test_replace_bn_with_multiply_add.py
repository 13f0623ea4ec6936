"""replace_bn_with_multiply_add: any BN with fixed statistics becomes one addcmul, exactly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bngraph.passes.replace_bn_with_multiply_add import replace_bn_with_multiply_add
from bngraph.trace import trace
from tests.passes.fold_util import assert_matches, batch_norms_left, traced
from tests.util import randomize_bn

Seq = nn.Sequential

PATTERNS = {
    "after_maxpool": (lambda: Seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4)), (2, 3, 8, 8)),
    "model_input_2d": (lambda: Seq(nn.BatchNorm1d(5)), (4, 5)),
    "sequence_axis_1": (lambda: Seq(nn.Linear(5, 5), nn.BatchNorm1d(5)), (2, 5, 5)),  # over T, not C
    "3d_affine_false": (lambda: Seq(nn.BatchNorm3d(2, affine=False)), (2, 2, 3, 3, 3)),
    "eps_0.3": (lambda: Seq(nn.ReLU(), nn.BatchNorm2d(3, eps=0.3)), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("name", PATTERNS)
def test_becomes_one_multiply_add(name):
    build, shape = PATTERNS[name]
    model, gm, x = traced(build(), shape)
    result = replace_bn_with_multiply_add(gm)
    assert len(result.changed) == 1 and result.skipped == [] and batch_norms_left(gm) == []
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.addcmul]
    assert_matches(gm, model, x)


def test_keeps_the_input_dtype():
    model = randomize_bn(Seq(nn.BatchNorm2d(3))).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    gm = trace(model, [x])
    replace_bn_with_multiply_add(gm)
    assert [b.dtype for name, b in gm.named_buffers() if name.startswith("_0_")] == [torch.float64] * 2
    assert_matches(gm, model, x, rtol=1e-12, atol=1e-12)


def test_leaves_a_bn_without_running_statistics():
    model, gm, x = traced(Seq(nn.ReLU(), nn.BatchNorm2d(3, track_running_stats=False)), (2, 3, 4, 4))
    result = replace_bn_with_multiply_add(gm)
    assert result.changed == [] and batch_norms_left(gm) == ["_1"]
    assert "track_running_stats=False" in result.skipped[0].reason


class FunctionalBn(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.register_buffer("mean", torch.randn(3))
        self.register_buffer("var", torch.rand(3) + 0.5)

    def forward(self, x):
        if self.form == "training":
            return F.batch_norm(x, self.mean, self.var, training=True)
        return F.batch_norm(x, x.mean(0), self.var)  # statistics of this very batch


@pytest.mark.parametrize(
    "form, reason",
    [
        ("training", "it calls F.batch_norm with training=True, normalizing with each batch's statistics"),
        ("computed", "its running_mean is computed by mean, not a constant of the model"),
    ],
)
def test_leaves_a_functional_bn_that_is_not_a_fixed_map(form, reason):
    model = FunctionalBn(form).eval()
    x = torch.randn(2, 3)
    gm = trace(model, [x])
    result = replace_bn_with_multiply_add(gm)
    assert result.changed == [] and result.skipped[0].reason == reason and batch_norms_left(gm) == ["batch_norm"]


def test_leaves_integer_statistics():
    model, gm, x = traced(Seq(nn.BatchNorm1d(3)), (2, 3))
    gm.get_submodule("0").running_mean = torch.zeros(3, dtype=torch.int64)  # as a bad checkpoint might
    result = replace_bn_with_multiply_add(gm)
    assert result.changed == [] and result.skipped[0].reason == "its running_mean is torch.int64, not floating point"


def test_needs_recorded_shapes():
    gm = trace(randomize_bn(Seq(nn.BatchNorm1d(3))))  # no example input: no shapes
    result = replace_bn_with_multiply_add(gm)
    assert result.changed == [] and "no shape was recorded" in result.skipped[0].reason


def test_does_nothing_without_batchnorm():
    model, gm, x = traced(Seq(nn.Linear(3, 3)), (2, 3))
    result = replace_bn_with_multiply_add(gm)
    assert result.changed == [] and result.skipped == []
