"""remove_dead_code: dead nodes go, then the modules and tensors that only they used."""

import torch
import torch.nn.functional as F
from torch import nn

from bngraph.passes.remove_dead_code import remove_dead_code
from bngraph.trace import trace


class Leftovers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(3, 3), nn.BatchNorm1d(3)
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("var", torch.ones(3))
        self.register_buffer("scale", torch.full((3,), 2.0))

    def forward(self, x):
        self.bn(x)  # computed, never used: what a fold leaves behind
        F.batch_norm(x, self.mean, self.var)
        return self.fc(x) * self.scale


def test_removes_dead_nodes_modules_and_tensors():
    model = Leftovers().eval()
    x = torch.randn(2, 3)
    gm = trace(model, [x])
    result = remove_dead_code(gm)
    assert result.changed == ["bn", "mean", "var", "batch_norm", "self.bn", "self.mean", "self.var"]
    assert set(dict(gm.named_modules())) == {"", "fc"}
    assert set(gm.state_dict()) == {"fc.weight", "fc.bias", "scale"}
    torch.testing.assert_close(gm(x), model(x))


def test_does_nothing_on_a_clean_graph():
    gm = trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), [torch.randn(2, 3)])
    assert remove_dead_code(gm).changed == []


class GateScaledByGamma(nn.Module):
    """Reads its BatchNorm's weight in forward: a gate scaled by the BN's gamma."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.view(1, -1, 1, 1)


def test_a_module_whose_tensor_the_graph_reads_keeps_all_its_tensors():
    from bngraph.fold import fold
    from tests.util import randomize_bn

    model = randomize_bn(GateScaledByGamma())
    x = torch.randn(2, 3, 8, 8)
    folded, _ = fold(model, [x])
    # The BN was folded into the conv; its weight is still read, and the BatchNorm2d holding it stays whole.
    assert set(folded.bn.state_dict()) == set(model.bn.state_dict())
    assert "BatchNorm2d(8" in repr(folded)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
