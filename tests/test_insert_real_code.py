"""insert on code written the way people write it (issue 11): the right sites, the right axis,
the same function, or a clear reason.

Each model below is in the style of a real code base (efficientnet-pytorch's drop-connect, a
VAE decoder, attention blocks, in-place ReLUs, HuggingFace-style attention with a shape check).
The tests assert the exact sites, the BatchNorm's feature count and, numerically, the axis it
normalizes; that --preserve keeps the eval-mode function to fp32 rounding; and that eval mode is
deterministic.
"""

import copy
import functools
import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bngraph
from bngraph.cli import main
from bngraph.trace import TraceFailed

GEN = torch.Generator().manual_seed(0)


def _x(*shape):
    return torch.randn(*shape, generator=GEN)


def _sites(report):
    return {r["node"]: (r["norm"], r["features"]) for r in report.sections["inserted"]}


def _skips(report):
    return {r["node"]: r["reason"] for r in report.sections["skipped"]}


def _assert_preserved(model, inputs, probe=None):
    """insert(preserve=True) computes what the model did, in eval mode, deterministically."""
    out, report = bngraph.insert(model.train(), inputs, preserve=True)
    probe = probe or [x * 2 + 0.5 if x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        want = model.eval()(*probe)
        got, again = out.eval()(*probe), out(*probe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, again, rtol=0, atol=0)
    model.train()
    return out, report


def _normalized_axes(bn_model, bn_path, x, feature_dims):
    """What the BN at `bn_path` hands on in train mode, per feature, back in the activation's
    layout: mean 0 and variance 1 over every other axis, for exactly the features in `feature_dims`."""
    seen = {}
    bn = bn_model.get_submodule(bn_path)
    with torch.no_grad():
        bn.weight.fill_(1)
        bn.bias.zero_()
    # Variance 1 to fp32 rounding: with eps a feature of batch variance v comes out as v / (v + eps),
    # and an LSTM's h_n has features of v ~ 1e-3 for a third of the global seeds (test order decides).
    bn.eps = 1e-12  # torch wants it positive
    act_inputs = []
    act = next(n for n in bn_model.graph.nodes if n.op == "call_module" and n.target == bn_path)
    # the value the activation reads: follow the BN's single-user chain (transpose/unflatten back)
    node = act
    while len(node.users) == 1 and next(iter(node.users)).op == "call_method":
        node = next(iter(node.users))
    handle_value = node.name
    interp = torch.fx.Interpreter(bn_model.train())
    orig = interp.run_node

    def run_node(n):
        value = orig(n)
        if n.name == handle_value:
            act_inputs.append(value)
        return value

    interp.run_node = run_node
    with torch.no_grad():
        interp.run(*x)
    value = act_inputs[0]
    others = tuple(d for d in range(value.ndim) if d not in feature_dims)
    torch.testing.assert_close(value.mean(dim=others), torch.zeros_like(value.mean(dim=others)), atol=1e-4, rtol=0)
    var = value.var(dim=others, unbiased=False)
    torch.testing.assert_close(var, torch.ones_like(var), atol=5e-3, rtol=0)
    return seen


# 1. The mode: dropout, drop-connect and `if self.training:` stay mode-dependent.


class FunctionalDropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        x = F.dropout(F.relu(self.fc1(x)), p=0.5, training=self.training)
        x = F.dropout(torch.tanh(self.fc2(x)), p=0.5, training=self.training)
        return self.out(x)


def drop_connect(inputs, p, training):
    """efficientnet-pytorch's utils.drop_connect."""
    if not training:
        return inputs
    batch_size = inputs.shape[0]
    keep_prob = 1 - p
    random_tensor = keep_prob + torch.rand([batch_size, 1, 1, 1], dtype=inputs.dtype, device=inputs.device)
    binary_tensor = torch.floor(random_tensor)
    return inputs / keep_prob * binary_tensor


class MBConvBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self._expand_conv = nn.Conv2d(channels, channels * 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(channels * 2)
        self._project_conv = nn.Conv2d(channels * 2, channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(channels)
        self._swish = nn.SiLU()

    def forward(self, inputs, drop_connect_rate=0.2):
        x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._bn2(self._project_conv(x))
        if drop_connect_rate:
            x = drop_connect(x, p=drop_connect_rate, training=self.training)
        return x + inputs


class EfficientNetStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([MBConvBlock(8), MBConvBlock(8)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


class NoisyTraining(nn.Module):
    """A submodule branching on self.training in Python."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return self.fc(x)


class NoisyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.noisy, self.fc, self.out = NoisyTraining(), nn.Linear(6, 10), nn.Linear(10, 2)

    def forward(self, x):
        return self.out(F.gelu(self.fc(self.noisy(x))))


def test_functional_dropout_keeps_reading_the_mode():
    model = FunctionalDropoutMLP().train()
    x = _x(8, 12)
    out, report = _assert_preserved(model, [x])
    assert _sites(report) == {"relu": ("BatchNorm1d", 32), "tanh": ("BatchNorm1d", 32)}
    assert report.sections["opaque"] == []
    out.train()
    torch.manual_seed(1)
    a = out(x)
    torch.manual_seed(2)
    assert not torch.equal(a, out(x))  # train mode still drops units


def test_drop_connect_is_one_call_that_reads_the_mode():
    model = EfficientNetStyle().train()
    x = _x(4, 3, 6, 6)
    out, report = _assert_preserved(model, [x])
    assert _sites(report) == {"relu": ("BatchNorm2d", 8)}
    skips = _skips(report)
    assert "already normalized by blocks_0__bn0" in skips["blocks_0__swish"]
    # the helper runs as one call with the real mode; the blocks around it are traced
    (opaque,) = report.sections["opaque"]
    assert opaque["type"] == "function" and opaque["module"].endswith("drop_connect")
    assert "if not training" in opaque["reason"]
    assert report.sections["not_handled"] == []
    out.train()
    torch.manual_seed(3)
    a = out(x)
    torch.manual_seed(4)
    assert not torch.equal(a, out(x))


def test_if_self_training_branch_in_a_submodule():
    model = NoisyNet().train()
    x = _x(6, 6)
    out, report = _assert_preserved(model, [x])
    assert _sites(report) == {"gelu": ("BatchNorm1d", 10)}
    assert [o["module"] for o in report.sections["opaque"]] == ["noisy"]


# 2. The feature axis, followed through the ops in between.


class PositionalMLP(nn.Module):
    """Linear on (N, T, C) with T == C, reached through `pos + fc(x)`."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.pos = nn.Parameter(torch.randn(1, 5, 5))

    def forward(self, x):
        return torch.relu(self.pos + self.fc(x))


class ConcatLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):  # (N, 6, 4) -> (N, 6, 6): T == features
        return F.gelu(torch.cat([self.a(x), self.b(x)], dim=-1))


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return F.gelu(y)


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 7, batch_first=True)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return torch.tanh(out), torch.sigmoid(h)


class TransposeFunctions(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(4, 5)

    def forward(self, x):  # (N, 5, 4): after the transposes features sit on axis 1, T on axis 2
        a = torch.relu(torch.transpose(self.fc1(x), 1, 2))
        b = torch.sigmoid(torch.permute(self.fc2(x), (0, 2, 1)))
        return a + b


class VAEDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4 * 3 * 3)
        self.unflatten = nn.Unflatten(1, (4, 3, 3))
        self.fc2 = nn.Linear(8, 4 * 3 * 3)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, z):
        a = F.relu(self.unflatten(self.fc(z)))
        b = F.relu(torch.reshape(self.fc2(z), (-1, 4, 3, 3)))
        return torch.sigmoid(self.up(a + b))


class ViTPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):  # (N, T, C) -> the first token, (N, C); the mean over T
        y = self.fc(x)
        return torch.tanh(y[:, 0]) + F.silu(y.mean(1))


class Unproven(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        scores = torch.sigmoid(self.q(x) @ self.k(x).transpose(1, 2))  # (N, T, T): no layer's features
        return torch.relu(x) + scores.sum(-1, keepdim=True)  # the model's own input: layout unknown


def test_position_table_plus_linear_with_t_equal_c():
    model = PositionalMLP()
    x = _x(16, 5, 5) * 3 + 1
    out, report = _assert_preserved(model, [x])
    assert _sites(report) == {"relu": ("BatchNorm1d", 5)}
    bn_out, _ = bngraph.insert(model, [x])
    _normalized_axes(bn_out, "relu_bn", [x], feature_dims=(2,))


def test_concat_along_the_features():
    model = ConcatLast()
    x = _x(16, 6, 4)
    _assert_preserved(model, [x])
    out, report = bngraph.insert(model, [x])
    assert _sites(report) == {"gelu": ("BatchNorm1d", 6)}
    _normalized_axes(out, "gelu_bn", [x], feature_dims=(2,))


def test_multihead_attention_output():
    model = AttentionBlock()
    x = _x(16, 6, 6)
    _assert_preserved(model, [x])
    out, report = bngraph.insert(model, [x])
    assert _sites(report) == {"gelu": ("BatchNorm1d", 6)}
    _normalized_axes(out, "gelu_bn", [x], feature_dims=(2,))


def test_lstm_outputs():
    model = LSTMHead()
    x = _x(16, 7, 4)  # T == hidden size
    _assert_preserved(model, [x])
    out, report = bngraph.insert(model, [x])
    assert _sites(report) == {"tanh": ("BatchNorm1d", 7), "sigmoid": ("BatchNorm1d", 7)}
    _normalized_axes(out, "tanh_bn", [x], feature_dims=(2,))
    _normalized_axes(out, "sigmoid_bn", [x], feature_dims=(2,))  # h_n: (layers, N, H)


def test_transpose_and_permute_function_forms():
    model = TransposeFunctions()
    x = _x(16, 5, 4)
    _assert_preserved(model, [x])
    out, report = bngraph.insert(model, [x])
    assert _sites(report) == {"relu": ("BatchNorm1d", 5), "sigmoid": ("BatchNorm1d", 5)}
    _normalized_axes(out, "relu_bn", [x], feature_dims=(1,))
    _normalized_axes(out, "sigmoid_bn", [x], feature_dims=(1,))


def test_vae_decoder_linear_reshaped_keeps_one_feature_per_activation():
    model = VAEDecoder()
    z = _x(32, 8)
    _assert_preserved(model, [z])
    out, report = bngraph.insert(model, [z])
    # A Linear's C*H*W outputs are C*H*W activations, not C feature maps (paper, Sec. 3.2)
    assert _sites(report) == {"relu": ("BatchNorm1d", 36), "relu_1": ("BatchNorm1d", 36), "sigmoid": ("BatchNorm2d", 2)}
    _normalized_axes(out, "relu_bn", [z], feature_dims=(1, 2, 3))
    _normalized_axes(out, "sigmoid_bn", [z], feature_dims=(1,))


def test_indexing_and_reduction_keep_the_features():
    model = ViTPool()
    x = _x(16, 6, 4)  # T == features
    _assert_preserved(model, [x])
    out, report = bngraph.insert(model, [x])
    assert _sites(report) == {"tanh": ("BatchNorm1d", 6), "silu": ("BatchNorm1d", 6)}


def test_unproven_axes_are_skipped_with_the_reason():
    model = Unproven()
    x = _x(4, 3, 4)
    out, report = bngraph.insert(model, [x])
    assert _sites(report) == {}
    skips = _skips(report)
    assert "attention-style" in skips["sigmoid"] and "model's input" in skips["relu"]


class GatePerPosition(nn.Module):
    """One score per position (attention pooling): a weight vector, not a matrix."""

    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(6))
        self.w = nn.Parameter(torch.randn(6))

    def forward(self, x):  # (N, T, 6)
        return torch.sigmoid(x @ self.v) + torch.tanh(F.linear(x, self.w))


class GroupedLinear(nn.Module):
    """A linear map per group (per head), its weights stacked: (G, Cin, Cout)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, 5))

    def forward(self, x):  # (G, N, Cin)
        return F.relu(torch.bmm(x, self.w)) + F.relu(torch.matmul(x, self.w))


class UntraceableSigmoidAttention(nn.Module):
    """Scores `q @ k^T` into an activation module, in a forward torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.Sigmoid()

    def forward(self, x):
        if x.sum() > -1e9:  # a data-dependent branch: the module-level fallback
            x = x + 0
        return self.act(self.q(x) @ self.k(x).transpose(-2, -1)) @ self.v(x)


@pytest.mark.parametrize("cls, shape", [(GatePerPosition, (4, 5, 6)), (GroupedLinear, (3, 8, 4)),
                                        (UntraceableSigmoidAttention, (4, 5, 8))])
def test_products_with_what_is_not_a_weight_matrix_have_no_feature_axis(cls, shape):
    # Taken for x @ W: the positions of a vector's scores, or one unit of each stacked matrix
    # pooled with the other groups', normalized as features; the model then took no other length.
    out, report = bngraph.insert(cls(), [_x(*shape)])
    assert _sites(report) == {}
    assert all("not a layer's features" in reason for reason in _skips(report).values()), _skips(report)
    longer = (shape[0], shape[1] + 2, shape[2])
    with torch.no_grad():
        out.train()(_x(*longer))


class TrainOnlyNoise(nn.Module):
    """An activation module whose forward branches on the mode: torch.fx keeps it whole."""

    def forward(self, x):
        if self.training:
            x = x + 0.01 * torch.randn_like(x)
        return F.silu(x)


class WithTrainOnlyNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(6, 8), TrainOnlyNoise(), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def test_an_activation_module_torch_fx_keeps_whole_gets_its_batchnorm():
    # Only modules inside a kept-whole one were wrapped, never that module itself: no BatchNorm,
    # and a reason saying only activation modules could be, which it is.
    out, report = bngraph.insert(WithTrainOnlyNoise(), [_x(16, 6)])
    assert _sites(report) == {"act": ("BatchNorm1d", 8)} and not report.sections.get("not_handled")
    seen = {}
    out.act.act.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    out.train()(_x(16, 6) * 5 + 3)
    torch.testing.assert_close(seen["x"].mean(0), torch.zeros(8), atol=1e-5, rtol=0)


# 3. In-place activations.


class ReluStatement(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        y = self.fc(x)
        y.relu_()  # a statement: its result is unused, y is read afterwards
        return self.out(y)


class InplaceReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.relu = nn.Linear(6, 6), nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        out = self.relu(h)  # writes into h: `out + h` is 2 * relu(h)
        g = self.fc2(x)
        F.relu(g, inplace=True)
        return out + h + g


class BasicBlock(nn.Module):
    """torchvision's residual block without its BatchNorms: `out += identity` then ReLU(inplace)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += identity
        out = self.relu(out)
        return out


class ViewReadAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, x):
        y = self.fc(x)
        flat = y.view(-1)
        y.relu_()
        return flat.sum() + y


def test_relu_statement_writes_into_what_is_read_next():
    model = ReluStatement()
    x = _x(16, 6)
    _assert_preserved(model, [x])
    out, report = bngraph.insert(model, [x])
    assert _sites(report) == {"relu_": ("BatchNorm1d", 8)}
    out.train()
    with torch.no_grad():  # the BN model is g(BN(Wx)), not linear: compute it by hand
        bn = out.get_submodule("relu__bn")
        h = model.fc(x) - model.fc.bias
        want = out.out(torch.relu(F.batch_norm(h, None, None, bn.weight, bn.bias, training=True)))
        torch.testing.assert_close(out(x), want, rtol=1e-5, atol=1e-5)


def test_inplace_module_and_functional_whose_input_is_reused():
    model = InplaceReused()
    x = _x(16, 6)
    _assert_preserved(model, [x])
    out, report = bngraph.insert(model, [x])
    assert _sites(report) == {"relu": ("BatchNorm1d", 6), "relu_1": ("BatchNorm1d", 6)}
    out.train()
    with torch.no_grad():
        a = torch.relu(F.batch_norm(model.fc(x), None, None, training=True))
        b = torch.relu(F.batch_norm(model.fc2(x), None, None, training=True))
        torch.testing.assert_close(out(x), 2 * a + b, rtol=1e-5, atol=1e-5)


def test_residual_block_with_inplace_relu():
    model = BasicBlock()
    x = _x(8, 4, 5, 5)
    _, report = _assert_preserved(model, [x])
    assert _sites(report) == {"relu": ("BatchNorm2d", 4), "relu_1": ("BatchNorm2d", 4)}


def test_inplace_activation_under_a_view_read_later_is_skipped():
    model = ViewReadAfter()
    x = _x(4, 6)
    out, report = bngraph.insert(model, [x])
    assert _sites(report) == {}
    assert "view" in _skips(report)["relu_"]


# 4. A bias read again by forward.


class BiasReadAgain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc(x))) + self.fc.bias.mean()


def test_bias_read_elsewhere_is_kept():
    model = BiasReadAgain()
    x = _x(8, 6)
    out, report = _assert_preserved(model, [x])
    assert out.fc.bias is not None
    assert report.sections["inserted"][0]["bias_removed"] is False
    assert any("fc.bias" in r["reason"] for r in report.sections["skipped"])


class ScaledOutputConv(nn.Module):
    """A forward hook registered in __init__ that scales a conv's output, after its bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv.register_forward_hook(lambda module, args, output: output * 2)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.conv(x))).mean((2, 3))


def test_the_bias_of_a_layer_with_a_hook_is_kept(tmp_path):
    # The BN's running mean takes the bias it cancels, but the hook doubles the output after
    # the bias: dropped, the model was 10% off in eval mode, and its artifact failed to load.
    model = ScaledOutputConv()
    out, report = _assert_preserved(model, [_x(4, 3, 8, 8)])
    assert out.conv.bias is not None and report.sections["inserted"][0]["bias_removed"] is False
    assert "conv has a forward hook" in _skips(report)["relu_bn"]
    source = "import torch.nn.functional as F\nfrom torch import nn\n\n\n" + inspect.getsource(ScaledOutputConv)
    (tmp_path / "model.py").write_text(source + "\n\nScaledOutputConv.example_input_shape = (4, 3, 8, 8)\n")
    assert main(["insert", f"{tmp_path / 'model.py'}:ScaledOutputConv", "-o", str(tmp_path / "inserted")]) == 0
    assert bngraph.load(tmp_path / "inserted").conv.bias is not None


class InPlaceActivations(nn.Module):
    """The in-place functional forms, scipy's name for the sigmoid, and a GLU head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(4)])
        self.gate = nn.Linear(6, 8)
        self.glu = nn.GLU()

    def forward(self, x):
        h = F.leaky_relu_(self.layers[0](x), 0.1)
        h = F.elu_(self.layers[1](h))
        h = F.hardtanh_(self.layers[2](h))
        h = torch.special.expit(self.layers[3](h))
        return self.glu(self.gate(h))


def test_in_place_activation_functions_get_their_batchnorm_and_a_glu_is_named():
    # F.relu_ had its BN; F.leaky_relu_, F.elu_, F.hardtanh_ and expit were passed over in
    # silence ("nothing changed"), and so was the GLU.
    out, report = _assert_preserved(InPlaceActivations(), [_x(8, 6)])
    assert [(r["activation"], r["features"]) for r in report.sections["inserted"]] == [
        ("leaky_relu", 6), ("elu", 6), ("hardtanh", 6), ("sigmoid", 6)]
    assert all(out.get_submodule(f"layers.{i}").bias is None for i in range(4))
    assert "GLU gates one half of its input's features" in _skips(report)["glu"]


class ScaledBias(nn.Module):
    def forward(self, bias):
        return bias * 2

    def right_inverse(self, bias):
        return bias / 2


def test_a_bias_computed_by_a_parametrization_is_kept():
    # Dropping it set `conv.bias = None` inside torch's parametrization: a traceback.
    model = ScaledOutputConv()
    torch.nn.utils.parametrize.register_parametrization(model.conv, "bias", ScaledBias())
    out, report = _assert_preserved(model, [_x(4, 3, 8, 8)])
    assert "conv.bias is computed by a parametrization" in _skips(report)["relu_bn"]


class SpectralNormDiscriminator(nn.Module):
    """A GAN discriminator's conv under torch's spectral_norm parametrization, built in train mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3))
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.head(F.leaky_relu(self.conv(x), 0.2))


def test_a_spectral_norm_layer_in_train_mode_inserts_and_keeps_its_power_iteration_state():
    # The passes ran the copy in train mode, where each weight read takes a power-iteration
    # step: the check compared a copy one step on with the model, and refused it (0.8% off).
    torch.manual_seed(0)
    model = SpectralNormDiscriminator()
    u = model.conv.parametrizations.weight[0]._u.clone()
    inserted, report = bngraph.insert(model, [_x(2, 3, 8, 8)])
    assert list(_sites(report).values()) == [("BatchNorm2d", 8)]
    assert torch.equal(inserted.get_buffer("conv.parametrizations.weight.0._u"), u)
    assert torch.equal(model.conv.parametrizations.weight[0]._u, u)


class HandWritten(nn.Module):
    """A leaky ReLU with torch.where, a SIREN layer's sine, a ReLU with torch.maximum."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        h = torch.where(h > 0, h, 0.1 * h)
        return torch.maximum(self.c(torch.sin(self.b(h))), torch.zeros(()))


def test_a_nonlinearity_written_by_hand_on_a_layers_output_is_named():
    # Passed over in silence: the report said nothing needed a BatchNorm.
    _, report = bngraph.insert(HandWritten(), [_x(3, 4)])
    skips = _skips(report)
    assert [skips[n].split(" computes")[0] for n in ("where", "sin", "maximum")] == [
        "where on a's output", "sin on b's output", "maximum on c's output"]


class MoreHandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(4)])
        self.pos = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        a, b, c, d = self.layers
        h = a(x)
        h = h * (h > 0)  # a ReLU as a mask
        h = b(h)
        h = torch.max(h, torch.zeros_like(h))
        h = c(h) + self.pos
        h = torch.where(h > 0, h, 0.1 * h)  # after a position added to the layer's output
        h = F.linear(h, d.weight, d.bias)
        return torch.where(h > 0, h, 0.2 * h)


def test_more_nonlinearities_written_by_hand_are_named():
    # A mask by a comparison, torch.max of two tensors, and a where after an add or on F.linear's
    # output: in none of the report's tables, and "2 nonlinearities got no BatchNorm" for 6.
    _, report = bngraph.insert(MoreHandWritten(), [_x(3, 5, 6)])
    skips = _skips(report)
    assert [skips[n].split(" computes")[0] for n in ("mul", "max_1", "where", "where_1")] == [
        "mul on layers.0's output", "max on layers.1's output", "where on layers.2's output", "where on linear's output"]


def bert_gelu(x):
    """The original BERT's GELU (pytorch-pretrained-bert), as HuggingFace's gelu_python too."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class ErfGeluAndHandSoftplus(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = bert_gelu(self.fc1(x))
        return self.fc3(torch.log1p(torch.exp(self.fc2(h))))  # a softplus written out


def test_the_erf_gelu_written_out_gets_its_batchnorm_and_a_softplus_by_hand_is_named():
    # Both passed over in silence: "no nonlinearity needs a BatchNorm".
    out, report = _assert_preserved(ErfGeluAndHandSoftplus(), [_x(16, 8)])
    assert _sites(report) == {"erf": ("BatchNorm1d", 16)}
    assert _skips(report)["exp"].startswith("exp on fc2's output computes")
    again, second = bngraph.insert(out, [_x(16, 8)])
    assert _sites(second) == {}  # the BN in front of the composite is seen on a second run


# 5. Integer inputs: token ids into an Embedding.


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.out = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(F.gelu(self.fc(self.embed(ids))))


def test_token_ids_with_preserve():
    model = TokenMLP()
    ids = torch.randint(0, 20, (4, 6), generator=GEN)
    _, report = _assert_preserved(model, [ids], probe=[torch.randint(0, 20, (5, 6), generator=GEN)])
    assert _sites(report) == {"gelu": ("BatchNorm1d", 8)}


# 6. Nonlinearities inside modules torch.fx keeps opaque.


class EncoderModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.scripted = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.Tanh()))

    def forward(self, x):
        return self.scripted(self.encoder(F.relu(self.proj(x))))


def test_nonlinearities_in_opaque_modules_are_reported():
    model = EncoderModel()
    x = _x(4, 5, 4)
    out, report = _assert_preserved(model, [x])
    assert _sites(report) == {"relu": ("BatchNorm1d", 8)}
    rows = {(r["module"], r["nonlinearity"]) for r in report.sections["not_handled"]}
    assert rows == {("encoder", "relu"), ("scripted", "tanh")}
    reasons = {r["module"]: r["reason"] for r in report.sections["not_handled"]}
    assert "does not trace into" in reasons["encoder"]
    assert "TorchScript" in reasons["scripted"]


# 7./8. Unfaithful traces and submodules torch.fx cannot follow.


class UpCat(nn.Module):
    """monai's BasicUNet UpCat: `torch.jit.isinstance` is False for a tracing proxy, so fx
    records the `else` branch."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())

    def forward(self, x, x_e):
        if x_e is not None and torch.jit.isinstance(x_e, torch.Tensor):
            x = torch.cat([x_e, x], dim=1)
        else:
            x = torch.cat([x, x], dim=1)
        return self.convs(x)


_BACKENDS = {torch.Tensor: "torch"}


class Rearrange(nn.Module):
    """An einops-style layer: it picks a backend by the input's type, which a tracing proxy is not."""

    def forward(self, x):
        assert _BACKENDS[type(x)] == "torch"
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w).transpose(1, 2)


class HFStyleAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        attn = torch.softmax(self.q(x) @ x.transpose(1, 2), dim=-1)
        if attn.size() != (x.size(0), x.size(1), x.size(1)):  # the same at every batch size: traced, and checked
            raise ValueError("bad attention shape")
        return self.o(attn @ x)


class NanCheckedAttention(HFStyleAttention):
    """An attention that checks its values: a branch on data, which no trace can hold."""

    def forward(self, x):
        attn = torch.softmax(self.q(x) @ x.transpose(1, 2), dim=-1)
        if torch.isnan(attn).any():
            raise ValueError("attention is NaN")
        return self.o(attn @ x)


class UNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True))
        self.down = nn.Conv2d(3, 4, 3, padding=1)
        self.up = UpCat()
        self.rearrange = Rearrange()
        self.attn = NanCheckedAttention()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        d = F.silu(self.down(self.pre(x)))
        u = self.up(d, d * 2)
        t = self.attn(self.rearrange(u))
        return self.head(F.gelu(t))


def test_partial_tracing_keeps_failing_and_unfaithful_submodules_opaque():
    model = UNetLike()
    x = _x(4, 3, 4, 4)
    out, report = _assert_preserved(model, [x])
    assert report.facts["tracing"] == "torch.fx"
    opaque = {o["module"]: o["reason"] for o in report.sections["opaque"]}
    assert set(opaque) == {"up", "rearrange", "attn"}
    assert "computes something else" in opaque["up"]
    assert "cannot trace" in opaque["rearrange"] and "cannot trace" in opaque["attn"]
    # The ReLU module inside the opaque `up` is wrapped by running it, as the fallback would.
    assert _sites(report) == {"pre_1": ("BatchNorm2d", 3), "silu": ("BatchNorm2d", 4), "up.convs.1": ("BatchNorm2d", 4)}
    assert "attn (NanCheckedAttention), which bngraph cannot see into" in _skips(report)["gelu"]
    assert report.sections["not_handled"] == []


class SignSTE(torch.autograd.Function):
    """sign() forward, the gradient passed straight through (binarized and quantized nets)."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class GradReverse(torch.autograd.Function):
    """DANN's gradient reversal: the identity forward, the gradient negated."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Binarize(nn.Module):
    def forward(self, x):
        return SignSTE.apply(x)


class BinaryNet(nn.Module):
    def __init__(self, reverse: bool):
        super().__init__()
        self.reverse = reverse
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.binarize = Binarize()

    def forward(self, x):
        h = self.binarize(self.fc2(torch.tanh(self.fc1(x))))
        return self.fc3(F.relu(GradReverse.apply(h) if self.reverse else h))


@pytest.mark.parametrize("reverse", [False, True], ids=["in-a-submodule", "in-the-forward"])
def test_a_custom_autograd_function_keeps_its_backward(reverse):
    # torch.fx traces a Function's forward and drops its backward: the straight-through
    # gradient became sign's zero, the reversed one the plain one. The module calling it is
    # kept whole (in a submodule) or the model is not traced (in the top-level forward).
    model = BinaryNet(reverse)
    x = _x(16, 6)
    out, report = bngraph.insert(model, [x], preserve=True)
    # The fallback sees no activation module; the ReLU after the opaque block is not proven.
    assert list(_sites(report)) == ([] if reverse else ["tanh"])
    if reverse:
        assert report.facts["tracing"] == "module-level fallback"
        assert "custom autograd Function GradReverse" in report.notes[-1]
    else:
        opaque = {o["module"]: o["reason"] for o in report.sections["opaque"]}
        assert "custom autograd Function SignSTE" in opaque["binarize"]
    model.eval(), out.eval()  # --preserve's BNs compute what the model did
    for net in (model, out):
        net.zero_grad()
        net(x).square().sum().backward()
    for name in ("fc1.weight", "fc2.weight"):
        want, got = model.get_parameter(name).grad, out.get_parameter(name).grad
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


class ClipGradient(torch.autograd.Function):
    """The identity forward, the gradient clipped: the derivative wherever gradients stay small."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-10.0, 10.0)


class ClippedStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.body(torch.relu(ClipGradient.apply(self.stem(x))))


def test_a_function_that_clips_large_gradients_is_not_taken_for_its_derivative():
    # Checked with N(0, 1) values and gradients only, the clip never acted: traced through, the
    # inserted model's gradients went unclipped (632 where the model's own stopped at 10 x 6).
    model = ClippedStem()
    x = _x(16, 6)
    out, report = bngraph.insert(model, [x], preserve=True)
    assert "custom autograd Function ClipGradient" in report.notes[-1]
    model.eval(), out.eval()
    for net in (model, out):
        net.zero_grad()
        (1000 * net(x).sum()).backward()
    torch.testing.assert_close(out.stem.weight.grad, model.stem.weight.grad, rtol=1e-4, atol=1e-3)


class RunningScale(nn.Module):
    """A user's own normalizer: divides by a running RMS it updates in place whenever gradients
    are on (its author's test for training)."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("rms", torch.ones(features))

    def forward(self, x):
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.rms.mul_(0.9).add_(0.1 * x.pow(2).mean(0).sqrt())
        return x / self.rms


class ScaledMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.scale = RunningScale(8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.scale(self.fc1(x))))


class CountsItsSteps(ScaledMLP):
    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.steps += 1  # read by the user's training loop
        return super().forward(x)


@pytest.mark.parametrize("where", ["submodule", "forward"])
def test_a_buffer_the_forward_updates_in_place_keeps_being_updated(where):
    # torch.fx hands a forward its buffers themselves: the update ran once on the tensor while
    # traced and the graph never did it again (the steps stayed 0, the running RMS fixed).
    model = ScaledMLP() if where == "submodule" else CountsItsSteps()
    out, report = bngraph.insert(model, [_x(16, 6)])
    if where == "submodule":
        opaque = {o["module"]: o["reason"] for o in report.sections["opaque"]}
        assert "updates the buffer rms in place" in opaque["scale"]
    else:
        assert report.facts["tracing"] == "module-level fallback"
        assert "updates the buffer steps in place" in report.notes[-1]
    assert torch.equal(out.scale.rms, torch.ones(8))  # as the model was: tracing updated nothing
    out.train()
    for _ in range(3):
        out(_x(16, 6))
    assert not torch.equal(out.scale.rms, torch.ones(8))
    if where == "forward":
        assert out.steps.item() == 3


class SwishImplementation(torch.autograd.Function):
    """efficientnet-pytorch's memory-saving Swish: its backward is the exact derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s * (1 + x * (1 - s)))


class MemoryEfficientSwish(nn.Module):
    def forward(self, x):
        return SwishImplementation.apply(x)


class SwishBlock(nn.Module):
    """One Swish module called after each of two convs, as efficientnet-pytorch's blocks do."""

    def __init__(self):
        super().__init__()
        self.expand, self.project = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.swish = MemoryEfficientSwish()

    def forward(self, x):
        return self.swish(self.project(self.swish(self.expand(x))))


def test_a_custom_function_whose_backward_is_its_derivative_is_traced_through():
    # Kept whole for its custom Function, the one Swish module called at two sites got no
    # BatchNorm at either: its backward is checked to be the forward's derivative instead.
    out, report = _assert_preserved(SwishBlock(), [_x(4, 3, 6, 6)])
    assert report.sections["opaque"] == [] and len(_sites(report)) == 2


class EncoderBlock(nn.Module):
    """A transformer block in HuggingFace's style: attention torch.fx cannot trace, then an MLP
    whose GELU reads a Linear's last axis on (N, T, C)."""

    def __init__(self):
        super().__init__()
        self.attn = NanCheckedAttention()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = x + self.attn(x)
        return h + self.fc2(F.gelu(self.fc1(h)))


def test_fold_traces_around_a_submodule_torch_fx_cannot_follow():
    # The inserted BN sits on fc1's last axis, behind transposes; module by module (the fold's
    # way when torch.fx stopped at the attention) it was left, since a transpose is no layer.
    from tests.util import randomize_bn

    x = _x(6, 5, 4)
    bn_model, report = bngraph.insert(EncoderBlock(), [x])
    assert _sites(report) == {"gelu": ("BatchNorm1d", 8)}
    bn_model = randomize_bn(bn_model).eval()
    folded, report = bngraph.fold(bn_model, [x])
    assert report.facts["batchnorms_before"] == 1 and report.facts["batchnorms_after"] == 0
    assert "traced partially, 1 submodule(s) kept whole: attn" in report.notes
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn_model(x), rtol=1e-5, atol=1e-5)


class CheckedStem(nn.Module):
    """HuggingFace's embeddings, with a check on values torch.fx cannot branch on, then conv and BN."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        if torch.isinf(x).any():
            raise ValueError("infinite pixel values")
        return self.bn(self.conv(x))


class StemNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.bn = CheckedStem(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(torch.relu(self.stem(x)))))


def test_fold_folds_module_by_module_inside_a_submodule_fx_keeps_whole():
    # Traced around the stem, the graph's passes fold the outer BN; the stem's BN, out of their
    # reach, folds module by module into the stem's conv, and the graph stays.
    from tests.util import randomize_bn

    x = _x(2, 3, 6, 6)
    model = randomize_bn(StemNet()).eval()
    folded, report = bngraph.fold(model, [x])
    assert "tracing" not in report.facts and isinstance(folded, torch.fx.GraphModule)
    assert (report.facts["batchnorms_before"], report.facts["batchnorms_after"]) == (2, 0)
    assert ("stem.bn", "stem.conv") in {(r["node"], r["into"]) for r in report.sections["folded"]}
    assert isinstance(folded.stem.bn, nn.Identity) and folded.stem.conv.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class UnfaithfulAtTheTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, extra=None):
        h = self.fc(x)
        if torch.jit.isinstance(x, torch.Tensor):  # False while tracing
            h = h * 2
        return torch.relu(h)


class OptionalMask(nn.Module):
    """Optional arguments left at their defaults are fixed while tracing: `mask` is None, as in
    the call the example input stands for (as a graph input, `mask is not None` would be True)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x, mask=None, return_dict=None):
        h = F.gelu(self.fc(x))
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        return {"h": h} if return_dict else h


def test_optional_arguments_take_their_defaults():
    model = OptionalMask()
    x = _x(8, 5, 4)
    out, report = _assert_preserved(model, [x])
    assert _sites(report) == {"gelu": ("BatchNorm1d", 6)}
    # Called as the model is, by keyword at the values traced (fx named them mask_1 and
    # return_dict_1); another value is refused, never computed as the traced one.
    torch.testing.assert_close(out(x, mask=None, return_dict=None), out(x))
    assert "the traced forward takes mask=None, return_dict=None only at these values" in " ".join(report.notes)
    with pytest.raises(AssertionError, match="mask"):
        out(x, mask=torch.zeros(8, 5, 6, dtype=torch.bool))


def with_config_defaults(forward):
    """A decorator as HuggingFace puts on every model's forward (`merge_with_config_defaults`):
    a keyword the caller did not give comes from the model's config."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if kwargs.get("scale") is None:
            kwargs["scale"] = self.config["scale"]
        return forward(self, *args, **kwargs)

    return wrapper


class DecoratedForward(nn.Module):
    """A forward behind a (*args, **kwargs) decorator, taking **kwargs itself (HuggingFace's
    `**kwargs: Unpack[TransformersKwargs]`), passed on to its layers."""

    def __init__(self):
        super().__init__()
        self.config = {"scale": 0.5}
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    @with_config_defaults
    def forward(self, x, mask=None, scale=None, **kwargs):
        h = self.fc1(x) * scale
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        return self.fc2(F.gelu(h, **kwargs))


def test_forward_behind_a_decorator_is_traced():
    # torch.fx alone calls the decorator's wrapper as if it had forward's parameters, and fails;
    # the module-level fallback cannot wrap the F.gelu call.
    model = DecoratedForward()
    x = _x(8, 5, 4)
    out, report = _assert_preserved(model, [x])
    assert report.facts["tracing"] == "torch.fx"
    assert _sites(report) == {"gelu": ("BatchNorm1d", 6)}
    _normalized_axes(out, "gelu_bn", [x], (2,))  # the scale from the config is applied before it
    assert torch.equal(out.fc1.weight, model.fc1.weight)


def test_an_inserted_model_with_fixed_arguments_folds_through_its_graph():
    # The inserted graph guards `mask` and `return_dict` as None; run on a graph input while
    # tracing it again, the guard raised, and fold fell back to folding module by module.
    from bngraph.fold_untraced import FALLBACK
    from tests.util import randomize_bn

    x = _x(8, 5, 4)
    bn_model, _ = bngraph.insert(OptionalMask(), [x])
    bn_model = randomize_bn(bn_model).eval()
    folded, report = bngraph.fold(bn_model, [x])
    assert report.facts.get("tracing") != FALLBACK
    assert report.facts["batchnorms_before"] == 1 and report.facts["batchnorms_after"] == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn_model(x), rtol=1e-5, atol=1e-5)


class CastsToItsDtype(nn.Module):
    """HuggingFace's ViT begins `if pixel_values.dtype != expected_dtype: pixel_values =
    pixel_values.to(expected_dtype)`, the dtype of a weight: fx cannot branch on that."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        if x.dtype != self.fc1.weight.dtype:
            x = x.to(self.fc1.weight.dtype)
        return self.fc2(F.gelu(self.fc1(x)))


def test_a_branch_on_the_inputs_dtype_is_traced_for_the_examples_and_guarded(tmp_path):
    from bngraph.cli import main

    x = _x(8, 4)
    out, report = _assert_preserved(CastsToItsDtype(), [x])
    assert report.facts["tracing"] == "torch.fx"
    assert _sites(report) == {"gelu": ("BatchNorm1d", 6)}
    # The graph holds the branch the float32 example took; another dtype is refused by name, not
    # run without the cast the model would have made.
    with pytest.raises(TypeError, match="input 'x' has dtype torch.float64, but this model's forward branches on"):
        out.eval()(x.double())
    folder = tmp_path / "casts-bn"
    assert main(["insert", f"{__file__}:CastsToItsDtype", "--input-shape", "8,4", "-o", str(folder)]) == 0
    loaded = bngraph.load(folder)
    with pytest.raises(TypeError, match="traced with torch.float32"):
        loaded.eval()(x.double())


class SplitHeads(nn.Module):
    """Attention-style reshaping that torch.fx cannot trace (`(*shape, heads, -1)` iterates a
    Proxy): insert keeps it whole."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 6)

    def forward(self, x):
        heads = self.qkv(x).view(*x.shape[:-1], 2, -1)
        return heads.flatten(-2)


class ClampsInHalfPrecision(nn.Module):
    """HuggingFace's T5 block: `if hidden_states.dtype == torch.float16:` clamp, on values the
    forward computed, one of them by a submodule fx keeps whole."""

    def __init__(self):
        super().__init__()
        self.attn, self.fc1, self.fc2 = SplitHeads(), nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):
        hidden_states = x + self.attn(x)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clamp(-1000, 1000)
        h = self.fc1(hidden_states)
        if h.dtype == torch.float16:  # on the layer's own output: the BN still folds into it
            h = h.clamp(-1000, 1000)
        return hidden_states + self.fc2(F.relu(h))


def test_a_branch_on_a_computed_values_dtype_is_traced_for_the_example_and_guarded():
    from tests.util import randomize_bn

    x = _x(8, 5, 6)
    out, report = _assert_preserved(ClampsInHalfPrecision(), [x])
    assert report.facts["tracing"] == "torch.fx"
    assert _sites(report) == {"relu": ("BatchNorm1d", 8)}
    # The float32 branches are in the graph; where a value another dtype (the model in float16,
    # or autocast's), a TypeError names it, never the clamp silently left out.
    with pytest.raises(TypeError, match="has dtype torch.float16, but this model's forward branches on that dtype"):
        copy.deepcopy(out).half().eval()(x.half())
    folded, fold_report = bngraph.fold(randomize_bn(out), [x])
    assert fold_report.facts["batchnorms_after"] == 0  # the guard on fc1's output reads its dtype, not its values
    with torch.no_grad():
        torch.testing.assert_close(folded(x), out(x), rtol=1e-5, atol=1e-5)


def test_unfaithful_top_level_forward_is_untraceable():
    with pytest.raises(TraceFailed, match="unfaithfully"):
        bngraph.insert(UnfaithfulAtTheTop(), [_x(4, 4)], fallback=False)


def test_partially_traced_model_saves_with_its_own_code_and_folds(tmp_path):
    from bngraph.cli import main

    out = tmp_path / "unet-bn"
    here = f"{__file__}:UNetLike"
    assert main(["insert", here, "--input-shape", "4,3,4,4", "--preserve", "-o", str(out)]) == 0
    loaded = bngraph.load(out)
    assert type(loaded.up).__name__ == "UpCat"  # built by the user's class, from the carried source
    x = _x(5, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), bngraph.load(out).eval()(x), rtol=0, atol=0)
    folded, _ = bngraph.fold(loaded.eval(), [x])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), loaded(x), rtol=1e-4, atol=1e-5)


def test_cli_token_ids_with_preserve(tmp_path):
    from bngraph.cli import main

    out = tmp_path / "tok"
    here = f"{__file__}:TokenMLP"
    assert main(["insert", here, "--input-shape", "4,6", "--input-dtype", "int64", "--preserve", "-o", str(out)]) == 0
    loaded = bngraph.load(out)
    assert isinstance(loaded.gelu_bn, nn.BatchNorm1d) and loaded.gelu_bn.num_features == 8


@pytest.mark.parametrize(
    "cls,shape", [(VAEDecoder, (6, 8)), (TransposeFunctions, (6, 5, 4)), (PositionalMLP, (6, 5, 5))]
)
def test_new_placements_fold_away(cls, shape):
    from tests.util import randomize_bn

    x = _x(*shape)
    out, _ = bngraph.insert(cls(), [x])
    randomize_bn(out)
    folded, report = bngraph.fold(out, [x])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), out(x), rtol=1e-4, atol=1e-5)


def test_saved_partial_traces_load_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    from bngraph.cli import main

    shapes = {"UNetLike": (4, 3, 4, 4), "EfficientNetStyle": (4, 3, 6, 6)}
    for name, shape in shapes.items():
        argv = ["insert", f"{__file__}:{name}", "--input-shape", ",".join(map(str, shape)), "-o", str(tmp_path / name)]
        assert main(argv) == 0
    check = (
        "import bngraph, torch\n"
        f"for name, shape in {shapes!r}.items():\n"
        "    model = bngraph.load(name).eval()\n"
        "    x = torch.randn(*shape)\n"
        "    assert torch.equal(model(x), model(x))\n"
    )
    # Another process, away from the tests: the artifact carries the code it needs.
    subprocess.run([sys.executable, "-c", check], cwd=tmp_path, check=True, timeout=120)


# ---- a custom block with a hook stays one call ---------------------------------------------------


class _GatedBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.fc(x)) * x


class _HookedBlockNet(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem, self.block, self.head = nn.Linear(width, width), _GatedBlock(width), nn.Linear(width, 3)

    def forward(self, x):
        return self.head(F.relu(self.block(F.relu(self.stem(x)))))


def test_a_hook_on_a_custom_block_still_fires_on_the_inserted_model():
    model = _HookedBlockNet()
    seen = []
    model.block.register_forward_hook(
        lambda module, args, output: seen.append((module, args[0].detach().clone(), output.detach().clone()))
    )
    x = _x(16, 8)
    out, report = bngraph.insert(model, [x])
    # The block is one call in insert's graph (`trace.must_stay_whole`): its tanh is reported.
    assert "block" in {n.target for n in out.graph.nodes if n.op == "call_module"}
    assert not any(n.target.startswith("block.") for n in out.graph.nodes if n.op == "call_module")
    (row,) = [r for r in report.sections["not_handled"] if r["module"] == "block"]
    assert row["nonlinearity"] == "tanh" and "kept as one call so that its forward hook still runs" in row["reason"]
    assert _sites(report) == {"relu": ("BatchNorm1d", 8)}
    assert "it comes out of block (_GatedBlock)" in _skips(report)["relu_1"]  # no axis proven through it
    seen.clear()
    with torch.no_grad():
        out.eval()(x)
        (module, block_input, block_output), = seen  # the hook ran once, on the inserted model's block
        assert module is out.get_submodule("block")
        torch.testing.assert_close(block_output, module.forward(block_input), rtol=0, atol=0)


class MaskedClassifier(nn.Module):
    """HuggingFace-style: arguments past the input default to None and are checked in forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x, mask=None, return_dict=None):
        h = F.gelu(self.fc1(x))
        if mask is not None:
            h = h * mask
        return self.fc2(h)


def test_arguments_fixed_at_none_leave_later_traces_and_exports_working(tmp_path):
    # torch.fx's own guard for `mask=None` registered a name no globals dict holds, and every
    # later trace in the process failed, torch.onnx.export's too (found on HF models).
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    bn_model, report = bngraph.insert(MaskedClassifier(), [x])
    assert [row["features"] for row in report.sections["inserted"]] == [16]
    with pytest.raises(AssertionError, match="mask"):
        bn_model.eval()(x, torch.ones(4, 16))  # the guard still refuses a mask it was not traced with
    result = bngraph.export(bn_model.eval(), [x], tmp_path / "m.onnx")
    assert result, result.verification.lines()
    bngraph.insert(MaskedClassifier(), [x])  # and tracing again works


class LayersInAPlainList(nn.Module):
    """A common slip: the layers in a Python list, so PyTorch never registers them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.layers = [nn.Linear(16, 16), nn.Linear(16, 4)]

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.layers[0](x))
        return self.layers[1](x)


class ASecondReferenceInAPlainList(nn.Module):
    """A plain list of layers that are registered too (a shortcut to some of them): fine."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])
        self.first_blocks = [self.blocks[0]]

    def forward(self, x):
        return self.blocks[1](torch.tanh(self.first_blocks[0](x)))


def test_layers_in_a_plain_list_are_refused_with_the_fix_not_saved_wrong(tmp_path, capsys):
    # Their weights are in no state dict: a saved copy would compute with other weights (this
    # used to end in "bngraph bug: the artifact computes something else"), and train would never
    # update them.
    from bngraph.cli import main

    path = tmp_path / "net.py"
    path.write_text("import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n\n"
                    + _source(LayersInAPlainList) + "\nexample_input_shape = (4, 8)\n")
    for verb in (["insert"], ["fold"], ["train", "--steps", "1"]):
        code = main([*verb, str(path), "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "LayersInAPlainList.layers[0] is a Linear in a plain list, not a registered submodule" in err
        assert "nn.ModuleList" in err and not (tmp_path / "out").exists()
    with pytest.raises(bngraph.UserError, match="layers"):  # the library's save says the same
        bngraph.save(LayersInAPlainList(), tmp_path / "saved", example_inputs=[_x(2, 8)])
    saved = bngraph.save(ASecondReferenceInAPlainList(), tmp_path / "fine", example_inputs=[_x(2, 8)])
    assert saved.is_dir()


class NestedPlainLists(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = [[nn.Linear(8, 8)]]  # a level deeper: the check looked one level in
        self.acts = [nn.Tanh()]

    def forward(self, x):
        return self.acts[0](self.scale[0][0](self.fc(x)))


def test_layers_in_nested_plain_lists_are_refused_and_a_weightless_one_for_what_it_is(tmp_path):
    # A list inside a list got past the check: an artifact without the layer's weights, its
    # model.py building that layer with whatever weights the generator gave.
    with pytest.raises(bngraph.UserError, match=r"NestedPlainLists.scale\[0\]\[0\] is a Linear in a plain list"):
        bngraph.save(NestedPlainLists(), tmp_path / "a", example_inputs=[_x(2, 8)])
    model = NestedPlainLists()
    model.scale = [[]]
    with pytest.raises(bngraph.UserError, match=r"acts\[0\] is a Tanh .* a model saved or traced from it would not "
                                                "find it"):
        bngraph.save(model, tmp_path / "a", example_inputs=[_x(2, 8)])
    assert not (tmp_path / "a").exists()


class HeldInTheClass(nn.Module):
    shared = [nn.Linear(8, 8)]  # one layer for every instance, in the class body

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.shared[0](self.fc(x))


class HeldInANamespace(nn.Module):
    def __init__(self):
        super().__init__()
        import types

        self.fc, self.heads = nn.Linear(8, 8), types.SimpleNamespace(cls=nn.Linear(8, 2))

    def forward(self, x):
        return self.heads.cls(self.fc(x))


@pytest.mark.parametrize("cls, where", [(HeldInTheClass, "shared[0]"), (HeldInANamespace, "heads['cls']")])
def test_layers_held_in_the_class_or_a_namespace_are_refused(tmp_path, cls, where):
    with pytest.raises(bngraph.UserError, match=re.escape(f"{cls.__name__}.{where} is a Linear")):
        bngraph.save(cls(), tmp_path / "a", example_inputs=[_x(2, 8)])


def _source(cls) -> str:
    import inspect

    return inspect.getsource(cls)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class NewGELUActivation(nn.Module):
    """HuggingFace's GPT-2 activation ("gelu_new"), as transformers writes it."""

    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(0.7978845608028654 * (input + 0.044715 * torch.pow(input, 3.0))))


class MishActivation(nn.Module):
    """HuggingFace's, with its own softplus."""

    def forward(self, input):
        return input * torch.tanh(nn.functional.softplus(input))


class LearnedSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class CompositeActivations(nn.Module):
    """Nonlinearities written out of elementwise pieces, as users and HuggingFace write them."""

    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 8, 3), Swish()
        self.c2, self.a2 = nn.Conv2d(8, 8, 3), NewGELUActivation()
        self.c3, self.a3 = nn.Conv2d(8, 8, 1), MishActivation()
        self.c4, self.a4 = nn.Conv2d(8, 8, 1), LearnedSwish()

    def forward(self, x):
        x = self.a1(self.c1(x))
        x = self.a2(self.c2(x))
        x = self.a3(self.c3(x))
        return self.a4(self.c4(x))


def test_an_activation_module_written_out_gets_one_batchnorm_in_front_of_all_of_it():
    # Swish()(x) = x * sigmoid(x) is one nonlinearity of x: BN(x) * sigmoid(BN(x)), not
    # x * sigmoid(BN(x)). Each such module gets one BN on its input, which every part of it reads;
    # in a forward, F.relu(y) + y stays an activation and a skip (tests/models.py: SharedOutput).
    model, x = CompositeActivations(), _x(4, 3, 10, 10)
    out, report = bngraph.insert(model, [x])
    rows = report.sections["inserted"]
    assert [(r["activation"].split(" in ")[0], r["features"], r["bias_removed"]) for r in rows] == [
        ("sigmoid", 8, True), ("tanh", 8, True), ("softplus", 8, True), ("sigmoid", 8, True)]
    assert all(" in " in r["activation"] for r in rows)  # named with the composite's result

    def bn(z):  # a new BN in train mode: batch statistics, gamma 1, beta 0
        return F.batch_norm(z, None, None, training=True)

    def conv(layer, z):  # the layer as insert left it: its bias dropped (the BN's mean takes it)
        return F.conv2d(z, layer.weight)

    with torch.no_grad():
        h = Swish()(bn(conv(model.c1, x)))
        h = NewGELUActivation()(bn(conv(model.c2, h)))
        h = MishActivation()(bn(conv(model.c3, h)))
        want = model.a4(bn(conv(model.c4, h)))
        torch.testing.assert_close(out.train()(x), want, rtol=1e-4, atol=1e-5)
    again, report_again = bngraph.insert(out, [x])
    assert report_again.sections["inserted"] == []
    _assert_preserved(model, [x])


class BlockWithASkipOverItsActivation(nn.Module):
    """A block's own forward, not an activation module: relu(h) + h is an activation and a skip."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        return F.relu(h) + h


def test_a_block_whose_forward_adds_its_activation_to_its_input_is_not_one_nonlinearity():
    model = nn.Sequential(BlockWithASkipOverItsActivation(), nn.Linear(8, 2))
    out, report = bngraph.insert(model, [_x(6, 8)])
    (row,) = report.sections["inserted"]
    assert row["activation"] == "relu" and row["bias_removed"] is False  # h keeps its bias for the skip
    with torch.no_grad():  # the skip reads h, not BN(h)
        x = _x(6, 8)
        h = model[0].fc(x)
        want = model[1](F.relu(F.batch_norm(h, None, None, training=True)) + h)
        torch.testing.assert_close(out.train()(x), want, rtol=1e-4, atol=1e-5)


def nonlinearity(x):
    # swish, as taming-transformers and latent diffusion write it: a plain function, which
    # torch.fx traces into the caller's graph
    return x * torch.sigmoid(x)


def _sigmoid(x):
    return torch.sigmoid(x)


def swish_of_a_helper(x):
    return x * _sigmoid(x)


class DiffusionStyleBlock(nn.Module):
    """Activations written as functions the forward calls, and one written inline."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.gate = lambda h: h * torch.tanh(F.softplus(h))  # mish, as a lambda on the module

    def forward(self, x):
        h = nonlinearity(self.c1(x))
        h = swish_of_a_helper(self.c2(h))  # a function calling a function: one call, the outer
        h = self.gate(self.c3(h))
        h = self.c4(h)
        return h * torch.sigmoid(h)  # inline in a forward of layers: sigmoid and arithmetic


def test_an_activation_written_as_a_function_gets_one_batchnorm_in_front_of_all_of_it():
    model, x = DiffusionStyleBlock(), _x(4, 4, 6, 6)
    out, report = bngraph.insert(model, [x])
    rows = report.sections["inserted"]
    assert [(r["activation"], r["bias_removed"]) for r in rows] == [
        ("sigmoid in mul", True), ("sigmoid in mul_1", True), ("softplus in mul_2", True), ("sigmoid", False)]
    (note,) = [n for n in report.notes if "unnormalized" in n]
    assert note.startswith("sigmoid_2: its input also reaches mul_3 unnormalized")

    def bn(z):  # a new BN in train mode: batch statistics, gamma 1, beta 0
        return F.batch_norm(z, None, None, training=True)

    with torch.no_grad():
        h = nonlinearity(bn(F.conv2d(x, model.c1.weight, padding=1)))
        h = swish_of_a_helper(bn(F.conv2d(h, model.c2.weight, padding=1)))
        h = model.gate(bn(F.conv2d(h, model.c3.weight, padding=1)))
        h = model.c4(h)
        want = h * torch.sigmoid(bn(h))
        torch.testing.assert_close(out.train()(x), want, rtol=1e-4, atol=1e-5)
    assert bngraph.insert(out, [x])[1].sections["inserted"] == []
    _assert_preserved(model, [x])


class ReluWrittenAsAClamp(nn.Module):
    """Two ReLUs a user wrote as clamps, and a clamp at eps that bounds a statistic."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        h = self.c1(x).clamp(min=0)
        h = torch.clamp(self.c2(h), 0, 6)
        scale = h.var((2, 3), keepdim=True).clamp(min=1e-5).rsqrt()
        return h * scale


def test_a_relu_written_as_a_clamp_is_named_in_the_report_and_left_as_it_is():
    model, x = ReluWrittenAsAClamp(), _x(4, 3, 10, 10)
    out, report = bngraph.insert(model, [x])
    assert report.sections["inserted"] == []
    reasons = {row["node"]: row["reason"] for row in report.sections["skipped"]}
    assert set(reasons) == {"clamp", "clamp_1"}  # the clamp at 1e-5 bounds a variance: not a ReLU
    assert all("computes a ReLU" in r and "write F.relu" in r for r in reasons.values())
    assert any("got no BatchNorm" in note for note in report.notes)
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), model.eval()(x))


@torch.jit.script
def scripted_swish(x):
    return x * torch.sigmoid(x)


class CallsATorchScriptFunction(nn.Module):
    """timm's older activations were `@torch.jit.script` functions called from the forward."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = scripted_swish(self.c1(x))
        return F.silu(self.c2(x))


def test_a_torchscript_function_is_one_opaque_call_and_the_rest_is_traced(tmp_path):
    # torch.fx cannot call a ScriptFunction with its Proxy: the whole model fell back to
    # module-level wrapping, which gave F.silu no BN, and the scripted function went unnamed.
    model, x = CallsATorchScriptFunction(), _x(4, 3, 8, 8)
    out, report = bngraph.insert(model, [x], preserve=True)
    assert report.facts["tracing"] == "torch.fx"
    assert [r["activation"] for r in report.sections["inserted"]] == ["silu"]
    (opaque,) = report.sections["opaque"]
    assert opaque["type"] == "function" and opaque["module"].endswith("scripted_swish")
    _assert_preserved(model, [x])
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


SCRIPTED_PY = '''
import torch
import torch.nn.functional as F
from torch import nn


@torch.jit.script
def swish(x):
    return x * torch.sigmoid(x)


class Net(nn.Module):
    example_input_shape = (4, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.silu(self.c2(swish(self.c1(x))))
'''


def test_an_artifact_of_a_model_calling_a_torchscript_function_loads_and_computes_it(tmp_path):
    from bngraph.cli import main

    (tmp_path / "scripted.py").write_text(SCRIPTED_PY)
    assert main(["insert", str(tmp_path / "scripted.py"), "--preserve", "-o", str(tmp_path / "bn")]) == 0
    assert main(["fold", str(tmp_path / "bn"), "-o", str(tmp_path / "folded")]) == 0
    original, folded = bngraph.load(str(tmp_path / "scripted.py")), bngraph.load(tmp_path / "folded")
    x = _x(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), original.eval()(x), rtol=1e-5, atol=1e-5)


class PositionBiasNet(nn.Module):
    """Swin V2's continuous position bias in miniature: an MLP over a fixed table of coordinates,
    added to the tokens, the same tensor in every batch. `checked` adds a check of the values,
    which torch.fx cannot trace, so insert takes the module-level fallback."""

    def __init__(self, checked: bool):
        super().__init__()
        self.checked = checked
        grid = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        self.register_buffer("relative_coords_table", torch.stack(grid, -1).view(16, 2) / 3)
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(inplace=True), nn.Linear(8, 6, bias=False))
        self.dense, self.act = nn.Linear(6, 6), nn.GELU()

    def forward(self, hidden_states):  # (N, 16, 6)
        if self.checked and torch.isnan(hidden_states).any():
            raise ValueError("NaN in the input")
        return self.act(self.dense(hidden_states + self.cpb_mlp(self.relative_coords_table)))


@pytest.mark.parametrize("checked", [False, True], ids=["traced", "fallback"])
def test_a_nonlinearity_on_a_table_no_input_reaches_gets_no_batchnorm(checked):
    from bngraph.passes.insert_bn_before_activation import NOT_FROM_THE_INPUT

    out, report = _assert_preserved(PositionBiasNet(checked), [_x(4, 16, 6)])
    assert report.facts["tracing"] == ("module-level fallback" if checked else "torch.fx")
    assert [(r["activation"], r["features"], r["axes"]) for r in report.sections["inserted"]] == [
        ("GELU", 6, "last" if checked else [2])  # the fallback's axis name, and the graph's axis number
    ]
    (skip,) = [r for r in report.sections["skipped"] if "cpb_mlp" in r["node"]]
    assert skip["reason"] == NOT_FROM_THE_INPUT


class CheckpointedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.GELU()

    def forward(self, x):
        return x + torch.utils.checkpoint.checkpoint(lambda h: self.act(self.fc(h)), x, use_reentrant=False)


class CheckpointedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Linear(6, 8), CheckpointedBlock(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.block(self.stem(x))))


def test_activation_checkpointing_is_kept_not_traced_away():
    # Traced through, the inserted model stored every activation the checkpoint recomputes
    # (992 KB saved for backward instead of 177 KB), and the report said nothing.
    model = CheckpointedNet()
    out, report = bngraph.insert(model, [_x(16, 6)])
    opaque = {o["module"]: o["reason"] for o in report.sections["opaque"]}
    assert "it calls torch.utils.checkpoint" in opaque["block"]
    assert "block.act" in [r["node"] for r in report.sections["inserted"]]  # wrapped inside, by running it
    calls = []
    out.get_submodule("block.fc").register_forward_hook(lambda *_: calls.append(1))
    out.train()(_x(16, 6)).sum().backward()
    assert len(calls) == 2  # once forward, once again in backward: still checkpointed


class ScaledBeforeRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("scale", torch.full((8,), 2.0))

    def forward(self, x):
        return self.head(torch.relu(self.fc(x) * self.scale))


def test_the_op_that_makes_an_activations_input_is_not_called_another_reader_of_it():
    # "relu: its input also reaches mul unnormalized", where mul makes relu's input and nothing
    # else reads it.
    _, report = bngraph.insert(ScaledBeforeRelu(), [_x(4, 8)])
    assert [r["activation"] for r in report.sections["inserted"]] == ["relu"]
    assert not [n for n in report.notes if "unnormalized" in n]


class Teacher(nn.Module):  # a frozen branch, as distillation and target networks write it
    def __init__(self):
        super().__init__()
        self.frozen, self.head = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        with torch.no_grad():
            target = torch.relu(self.frozen(x))
        return torch.relu(self.head(x)) + target


class WithTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher, self.out = Teacher(), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.teacher(x))


@pytest.mark.parametrize("model", [Teacher, WithTeacher], ids=["in-the-forward", "in-a-submodule"])
def test_a_forward_that_switches_gradients_off_keeps_them_off(model):
    # A graph keeps the ops, not torch.no_grad(): training the inserted model trained the frozen
    # layer (its weight's gradient 27.9 where the model's is None).
    original = model()
    inserted, _ = bngraph.insert(original, [_x(4, 6)])
    inserted(_x(5, 6)).sum().backward()
    frozen = next(m for name, m in inserted.named_modules() if name.endswith("frozen"))
    assert frozen.weight.grad is None and frozen.bias.grad is None
    assert all(p.grad is not None for name, p in inserted.named_parameters() if "frozen" not in name)


class InferenceModeTeacher(nn.Module):  # torch.inference_mode(), the newer spelling of no_grad
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.frozen, self.act = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(6, 8), nn.ReLU()

    def forward(self, x):
        with torch.inference_mode():
            target = self.frozen(x)
        return self.fc2(self.act(self.fc1(x)) + target.clone())


def test_a_forward_under_inference_mode_gets_its_batchnorm():
    # The fallback's recorder read the version counter inference tensors lack: "the model raised".
    inserted, report = bngraph.insert(InferenceModeTeacher(), [_x(4, 6)])
    assert [row["features"] for row in report.sections["inserted"]] == [8]
    inserted(_x(5, 6)).sum().backward()
    assert inserted.frozen.weight.grad is None and inserted.fc1.weight.grad is not None


class MaskedWithoutGradients(nn.Module):  # the no_grad block makes a mask: no gradient either way
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        with torch.no_grad():
            mask = (self.fc1(x).abs() > 0.5).float()
        return self.fc2(F.gelu(self.fc1(x) * mask))


class ReturnsWithoutGradients(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(6, 6)

    def forward(self, x):
        with torch.no_grad():
            return self.frozen(x)


class ReadsAFrozenBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch, self.fc = ReturnsWithoutGradients(), nn.Linear(6, 6)

    def forward(self, x):
        return torch.relu(self.fc(x)) + self.branch(x)


def test_a_no_grad_block_is_refused_only_where_its_value_would_carry_a_gradient():
    # A mask of comparisons traces (it sent the whole model to the fallback); a submodule that
    # returns a frozen layer's output is kept whole, though its caller reads the value later.
    _, report = bngraph.insert(MaskedWithoutGradients(), [_x(4, 6)])
    assert report.facts["tracing"] == "torch.fx" and list(_sites(report)) == ["gelu"]
    inserted, report = bngraph.insert(ReadsAFrozenBranch(), [_x(4, 6)])
    assert [o["module"] for o in report.sections["opaque"]] == ["branch"]
    inserted(_x(5, 6)).sum().backward()
    assert inserted.branch.frozen.weight.grad is None and inserted.fc.weight.grad is not None


class TransposedByProperty(nn.Module):  # Tensor.mT: fx records a getattr, as for x.shape
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x).mT)


def test_an_activation_after_a_tensor_property_is_skipped_naming_it():
    _, report = bngraph.insert(TransposedByProperty(), [torch.randn(6, 8, 8)])
    (reason,) = _skips(report).values()
    assert reason.endswith("it comes from .mT at getattr_1, which is not followed")  # was "...: None"


class WithAnAuxiliaryHead(nn.Module):
    """An auxiliary head and a temperature that other methods use, as users write them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
        self.aux_head = nn.Linear(4, 2)
        self.temperature = nn.Parameter(torch.ones(1))
        # A module the forward uses holding one tensor it does not (HuBERT's masked_spec_embed).
        self.encoder = nn.Module()
        self.encoder.proj, self.encoder.mask_embed = nn.Linear(4, 4), nn.Parameter(torch.zeros(4))

    def features(self, x):
        return self.encoder.proj(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    def forward(self, x):
        return self.head(self.features(x))

    def forward_aux(self, x):
        return self.aux_head(self.features(x))

    def predict_proba(self, x):
        return torch.softmax(self(x) / self.temperature, -1)


@pytest.mark.parametrize("verb", ["insert", "fold"])
def test_what_the_forward_never_uses_is_named_as_left_out(verb):
    # The aux head's and the temperature's trained weights, and the other methods, were dropped without a word.
    model = WithAnAuxiliaryHead().eval()
    result, report = getattr(bngraph, verb)(model, [torch.randn(2, 3, 8, 8)])
    assert not hasattr(result, "aux_head") and not hasattr(result, "temperature")
    [note] = [n for n in report.notes if n.startswith("the result is the graph of the model's forward")]
    # That one is named, not its module: "without encoder" beside the encoder's weights in the result.
    assert "without aux_head, encoder.mask_embed, temperature (never used by its forward" in note
    assert "WithAnAuxiliaryHead's other methods (features, forward_aux, predict_proba)" in note
