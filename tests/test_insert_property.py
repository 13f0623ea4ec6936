"""Property: on random small networks, insert works in train mode, is idempotent, and
--preserve keeps the eval-mode function."""

import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bngraph
from bngraph.errors import CheckFailed
from bngraph.passes._op_kinds import activation_kind, normalizer_behind

MODULE_ACTS = [nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardswish, nn.Softplus, nn.Mish]
FUNCTIONAL_ACTS = [F.relu, torch.sigmoid, torch.tanh, F.gelu, F.silu, F.elu]


class Functional(nn.Module):
    """An activation in functional form, as users write it inside forward()."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x):
        return FUNCTIONAL_ACTS[self.index](x)


@st.composite
def activations(draw):
    if draw(st.booleans()):
        return draw(st.sampled_from(MODULE_ACTS))()
    return Functional(draw(st.integers(0, len(FUNCTIONAL_ACTS) - 1)))


@st.composite
def networks(draw):
    # The layers' initial weights come from torch's global generator: seeded by the example, so
    # that Hypothesis replays the same network (the test body reseeds it after).
    torch.manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["image", "vector", "sequence"]))
    layers, width = [], draw(st.integers(2, 6))
    shape = {"image": (width, 6, 6), "vector": (width,), "sequence": (3, width)}[kind]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["layer", "layer", "act", "norm", "dropout"]))
        out = draw(st.integers(2, 6))
        if op == "layer" and kind == "image":
            groups = width if draw(st.booleans()) and out % width == 0 else 1
            layers.append(nn.Conv2d(width, out, draw(st.sampled_from([1, 3])), padding="same", groups=groups, bias=draw(st.booleans())))
            width = out
        elif op == "layer":
            layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
            width = out
        elif op == "norm":
            layers.append(nn.BatchNorm2d(width) if kind == "image" else nn.LayerNorm(width))
        elif op == "dropout":
            layers.append(nn.Dropout(0.2))
        if op in ("act", "layer") and draw(st.booleans()):
            layers.append(draw(activations()))
    layers.append(draw(activations()))
    return nn.Sequential(*layers), shape


def _every_activation_is_normalized(gm, report):
    # An activation reached from the model's input through no layer has no proven feature axis:
    # insert skips it and says so (it never guesses axis 1).
    unproven = {r["node"] for r in report.sections["skipped"] if "the model's input" in r["reason"]}
    return all(
        normalizer_behind(gm, node.args[0]) is not None or node.name in unproven
        for node in gm.graph.nodes
        if activation_kind(gm, node) is not None
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.integers(0, 2**16))
def test_insert_then_train_is_idempotent_and_preserve_is_exact(net, seed):
    model, shape = net
    torch.manual_seed(seed)
    x = torch.randn(4, *shape)

    out, report = bngraph.insert(model, [x])
    assert _every_activation_is_normalized(out, report)
    y = out.train()(x)
    assert y.shape == model(x).shape and torch.isfinite(y).all()

    again, report_again = bngraph.insert(out, [x])
    assert report_again.sections["inserted"] == [] and str(again.graph) == str(out.graph)

    # --preserve's BNs compute the identity up to rounding (~1 ulp of their inputs' means), which
    # the model then amplifies as it amplifies its own float32 rounding: a LayerNorm over a few
    # near-equal features by up to 1/sqrt(eps). So the measure of "exact" is that rounding, read
    # off the model in float64.
    model.eval()
    try:
        kept, _ = bngraph.insert(model, [x], preserve=True)
    except CheckFailed as err:
        # A correct --preserve is refused only where the check cannot tell rounding from error:
        # an output that is 0 everywhere on the example (a ReLU after weights that make every
        # input negative: no scale, and on the check's other batches a few tiny values next to
        # the 1-ulp error of a BatchNorm whose mean is far from 0), or a model whose own float32
        # rounding is within 10x of the check's tolerance (1e-5 of the output's RMS).
        reference = model(x).detach()
        rms = reference.square().mean().sqrt()
        assert not reference.any() or _own_rounding(model, x) > 1e-6 * rms, err
        return
    probe = torch.randn(7, *shape) * 2
    with torch.no_grad():
        error = (kept.eval()(probe) - model(probe)).abs().max()
    assert error <= 1e-5 + 1e-4 * model(probe).abs().max() + 50 * _own_rounding(model, probe), error


@torch.no_grad()
def _own_rounding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """How far the model's float32 output is from its float64 output: its own rounding."""
    exact = copy.deepcopy(model).double()(x.double())
    return (model(x).double() - exact).abs().max()
