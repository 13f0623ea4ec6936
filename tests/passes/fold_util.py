"""Shared by the fold tests: trace a model with random BN statistics, run passes, compare."""

from __future__ import annotations

import torch
from torch import fx, nn

from bngraph.passes._fx_batchnorm import is_batch_norm
from bngraph.trace import trace
from tests.util import randomize_bn


def traced(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> tuple[nn.Module, fx.GraphModule, torch.Tensor]:
    """(the model in eval mode with random BN statistics, its traced copy with shapes, the input)."""
    model = randomize_bn(model, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, trace(model, [x]), x


def batch_norms_left(gm: fx.GraphModule) -> list[str]:
    modules = dict(gm.named_modules())
    return [n.name for n in gm.graph.nodes if is_batch_norm(n, modules)]


def assert_matches(gm: fx.GraphModule, model: nn.Module, x: torch.Tensor, rtol=1e-5, atol=1e-5) -> float:
    """gm computes what the eval-mode model computes, on `x` and on a fresh input of another
    batch size; returns the largest abs error seen."""
    fresh = torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(99), dtype=x.dtype)
    worst = 0.0
    with torch.no_grad():
        for inputs in (x, fresh):
            got, want = gm(inputs), model.eval()(inputs)
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
            worst = max(worst, float((got - want).abs().max()))
    return worst


class ConvBn(nn.Module):
    def __init__(self, **bn):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, **bn)

    def forward(self, x):
        return self.bn(self.conv(x))


def nearly_dead_channel(eps: float = 1e-10) -> nn.Module:
    """A ConvBn whose channel 0 is almost constant (3 +- 1e-5), with statistics that say so: the
    BN magnifies it 1e5-fold, and float32 rounding of the folded bias (about 3e5) shows."""
    model = randomize_bn(ConvBn(eps=eps))
    with torch.no_grad():
        model.conv.weight[0] *= 1e-5
        model.conv.bias[0] = 3.0
        model.bn.running_mean[0] = 3.0
        model.bn.running_var[0] = float(model.conv.weight[0].pow(2).sum())  # the output's variance for N(0, 1) input
    return model
