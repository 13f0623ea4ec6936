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
