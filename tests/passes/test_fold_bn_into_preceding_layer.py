"""fold_bn_into_preceding_layer: each pattern folds exactly, each guard leaves the BN with its reason."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

from bngraph.errors import UserError
from bngraph.passes.cancel_inverse_permutes import cancel_inverse_permutes
from bngraph.passes.fold_bn_into_preceding_layer import fold_bn_into_preceding_layer
from bngraph.trace import trace
from tests.passes.fold_util import ConvBn, assert_matches, batch_norms_left, nearly_dead_channel, traced
from tests.util import randomize_bn

Seq = nn.Sequential

PATTERNS = {
    "conv1d": (lambda: Seq(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (2, 3, 10)),
    "conv2d": (lambda: Seq(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)), (2, 3, 8, 8)),
    "conv3d": (lambda: Seq(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    "grouped": (lambda: Seq(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 7, 7)),
    "depthwise": (lambda: Seq(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.BatchNorm2d(4)), (2, 4, 6, 6)),
    "depthwise_x2": (lambda: Seq(nn.Conv2d(4, 8, 3, groups=4), nn.BatchNorm2d(8)), (2, 4, 6, 6)),
    "conv_without_bias": (lambda: Seq(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)), (2, 3, 6, 6)),
    "convtranspose2d": (lambda: Seq(nn.ConvTranspose2d(3, 5, 3, stride=2), nn.BatchNorm2d(5)), (2, 3, 4, 4)),
    "convtranspose2d_groups2": (lambda: Seq(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)), (2, 4, 4, 4)),
    "convtranspose1d_groups2": (lambda: Seq(nn.ConvTranspose1d(4, 2, 3, groups=2, bias=False), nn.BatchNorm1d(2)), (2, 4, 5)),
    "convtranspose3d": (lambda: Seq(nn.ConvTranspose3d(2, 3, 2), nn.BatchNorm3d(3)), (2, 2, 3, 3, 3)),
    "linear": (lambda: Seq(nn.Linear(7, 5), nn.BatchNorm1d(5)), (4, 7)),
    "linear_without_bias": (lambda: Seq(nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5)), (4, 7)),
    "affine_false": (lambda: Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), (2, 3, 5, 5)),
    "eps_0.1": (lambda: Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=0.1)), (2, 3, 5, 5)),
    "bn_after_bn": (lambda: Seq(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)), (3, 6)),
}


@pytest.mark.parametrize("name", PATTERNS)
def test_folds_pattern_exactly(name):
    build, shape = PATTERNS[name]
    model, gm, x = traced(build(), shape)
    result = fold_bn_into_preceding_layer(gm)
    assert len(result.changed) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert result.skipped == [] and batch_norms_left(gm) == []
    assert gm.get_submodule("0").bias is not None  # created where there was none
    assert_matches(gm, model, x)


def test_eps_is_honoured_not_assumed():
    model, _, x = traced(Seq(nn.Linear(3, 2), nn.BatchNorm1d(2, eps=0.5)), (4, 3))
    with torch.no_grad():
        model[1].running_var.fill_(1e-3)  # eps dominates: a fold with eps=1e-5 would be 20x off
    gm = trace(model, [x])
    fold_bn_into_preceding_layer(gm)
    assert_matches(gm, model, x)


class SequenceLinear(nn.Module):
    """A Linear on (N, T, C), normalized per feature the way users (and `bngraph insert`) write it."""

    def __init__(self, form: str, steps: int = 5, features: int = 6):
        super().__init__()
        self.form, self.fc, self.bn = form, nn.Linear(4, features), nn.BatchNorm1d(features)

    def forward(self, x):
        y = self.fc(x)
        if self.form == "transpose":
            return self.bn(y.transpose(1, 2)).transpose(1, 2)
        if self.form == "insert_pass":
            return self.bn(y.transpose(1, -1)).transpose(1, -1)
        return self.bn(y.permute(0, 2, 1).contiguous()).permute(0, 2, 1)


@pytest.mark.parametrize("form", ["transpose", "insert_pass", "permute"])
def test_folds_linear_on_sequences_behind_a_transpose_and_drops_the_pair(form):
    model, gm, x = traced(SequenceLinear(form), (2, 5, 4))
    assert fold_bn_into_preceding_layer(gm).changed == ["bn"]
    cancel_inverse_permutes(gm)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert_matches(gm, model, x)


def test_linear_on_4d_features_last_behind_the_insert_pass_transposes():
    class Image(SequenceLinear):
        def __init__(self):
            super().__init__("insert_pass")
            self.bn = nn.BatchNorm2d(6)

    model, gm, x = traced(Image(), (2, 3, 5, 4))
    assert fold_bn_into_preceding_layer(gm).changed == ["bn"]
    assert_matches(gm, model, x)


def test_equal_sizes_never_fold_onto_the_wrong_axis():
    # BatchNorm1d(5) right after a Linear on (N, T=5, C=5) normalizes T, not the features.
    # torch.fx's fuse matches the module types and folds it onto C: a wrong model.
    model, gm, x = traced(Seq(nn.Linear(5, 5), nn.BatchNorm1d(5)), (2, 5, 5))
    with torch.no_grad():
        assert not torch.allclose(fuse(model)(x), model(x), atol=1e-3)
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == [] and batch_norms_left(gm) == ["_1"]
    assert "normalizes axis 1 of the (2, 5, 5) output of 0, whose features are on axis 2" in result.skipped[0].reason
    assert_matches(gm, model, x)


def test_unbatched_conv_is_refused():
    # Conv1d on (C, L) gives (C', L'); BatchNorm1d then takes axis 1 (length) as its channels.
    model, gm, x = traced(Seq(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(8)), (3, 10))
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == [] and "unbatched" in result.skipped[0].reason


class MyConv(nn.Conv2d):
    """A Conv2d subclass with its own forward: it traces into F.conv2d, not a module call."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3, generator=gen))
        self.register_buffer("mean", torch.randn(6, generator=gen))
        self.register_buffer("var", torch.rand(6, generator=gen) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.randn(6, generator=gen)), nn.Parameter(torch.randn(6, generator=gen))

    def forward(self, x):
        return F.batch_norm(F.conv2d(x, self.w, padding=1), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


@pytest.mark.parametrize(
    "build", [Functional, lambda: Seq(MyConv(3, 4, 3), nn.BatchNorm2d(4))], ids=["F.conv2d+F.batch_norm", "conv_subclass"]
)
def test_folds_functional_forms(build):
    model, gm, x = traced(build(), (2, 3, 6, 6))
    assert any(n.op == "call_function" for n in gm.graph.nodes)
    result = fold_bn_into_preceding_layer(gm)
    assert len(result.changed) == 1 and batch_norms_left(gm) == []
    assert_matches(gm, model, x)


def test_functional_conv_gets_a_bias_parameter():
    model, gm, x = traced(Functional(), (2, 3, 6, 6))
    fold_bn_into_preceding_layer(gm)
    conv = next(n for n in gm.graph.nodes if n.target is F.conv2d)
    assert len(conv.args) == 3 and isinstance(gm.get_parameter(conv.args[2].target), nn.Parameter)


def test_guard_output_with_another_user():
    class Shared(ConvBn):
        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model, gm, x = traced(Shared(), (2, 3, 6, 6))
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == [] and batch_norms_left(gm) == ["bn"]
    assert result.skipped[0].reason == "the output of conv also feeds add, which needs it unnormalized"
    assert_matches(gm, model, x)


def test_guard_shared_weights_fold_into_a_copy():
    class CalledTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))

    model, gm, x = traced(CalledTwice(), (2, 3, 6, 6))
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == ["bn1", "bn2"] and batch_norms_left(gm) == []
    assert result.details[0]["note"] == "folded into a copy of conv, whose weights conv_1 also uses"
    assert result.details[1]["note"] == ""  # by then conv is its own again
    assert len({n.target for n in gm.graph.nodes if n.op == "call_module"}) == 2
    assert_matches(gm, model, x)


def test_guard_tied_weights_fold_into_a_copy():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.bn(self.a(x)) + self.b(x)

    model, gm, x = traced(Tied(), (2, 3, 4, 4))
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == ["bn"] and "copy of a, whose weights b also uses" in result.details[0]["note"]
    assert gm.b.weight is not gm.get_submodule(next(n.target for n in gm.graph.nodes if n.name == "a")).weight
    assert_matches(gm, model, x)


def test_guard_no_running_statistics():
    model, gm, x = traced(ConvBn(track_running_stats=False), (2, 3, 6, 6))
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == [] and batch_norms_left(gm) == ["bn"]
    assert "track_running_stats=False" in result.skipped[0].reason


def test_guard_training_mode():
    model, gm, x = traced(ConvBn(), (2, 3, 6, 6))
    gm.train()
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == [] and "training mode" in result.skipped[0].reason


def test_guard_weight_computed_in_the_graph():
    class Scaled(Functional):
        def forward(self, x):
            return F.batch_norm(F.conv2d(x, self.w * 2), self.mean, self.var, None, None, False, 0.1, 1e-5)

    model, gm, x = traced(Scaled(), (2, 3, 6, 6))
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == [] and result.skipped[0].reason == (
        "the weight of conv2d is computed by mul, not a constant of the model"
    )


def test_guard_non_float_weights():
    # A weight-only quantized layer, say: an integer weight is never rescaled in place.
    model, gm, x = traced(ConvBn(), (2, 3, 6, 6))
    gm.conv.weight = nn.Parameter(gm.conv.weight.to(torch.int8), requires_grad=False)
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == [] and "torch.int8, not floating point" in result.skipped[0].reason
    assert gm.conv.weight.dtype == torch.int8


@pytest.mark.parametrize("stat, value, word", [("running_var", float("nan"), "NaN"), ("running_mean", float("inf"), "infinite")])
def test_broken_statistics_are_a_user_error_naming_the_layer(stat, value, word):
    model, gm, x = traced(ConvBn(), (2, 3, 6, 6))
    getattr(gm.bn, stat)[1] = value
    with pytest.raises(UserError, match=f"BatchNorm 'bn' has {word}.* in its {stat}"):
        fold_bn_into_preceding_layer(gm)


def test_tiny_variance_is_folded_and_flagged():
    model = nearly_dead_channel()
    x = torch.randn(2, 3, 6, 6)
    gm = trace(model, [x])
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == ["bn"] and result.details[0]["rounding_gain"] > 1e5
    # Exact in float64, but rounding the folded weights to float32 costs digits on channel 0:
    # about gain * 2**-24 * |gamma|, which is why the fold is flagged.
    with torch.no_grad():
        error = (gm(x) - model(x)).abs().amax((0, 2, 3))
    gamma = model.bn.weight.detach().abs()
    assert error[0] <= result.details[0]["rounding_gain"] * 2**-24 * gamma[0] * 8
    assert (error[1:] <= 1e-5 * (1 + gamma[1:]) * 10).all()


def test_does_nothing_without_batchnorm():
    model, gm, x = traced(Seq(nn.Conv2d(3, 4, 3), nn.ReLU()), (2, 3, 6, 6))
    result = fold_bn_into_preceding_layer(gm)
    assert result.changed == [] and result.skipped == []


def test_float64_model_stays_float64():
    model = randomize_bn(ConvBn()).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = trace(model, [x])
    fold_bn_into_preceding_layer(gm)
    assert gm.conv.weight.dtype == gm.conv.bias.dtype == torch.float64
    assert_matches(gm, model, x, rtol=1e-12, atol=1e-12)
