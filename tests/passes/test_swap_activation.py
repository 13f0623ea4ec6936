import torch
import torch.nn.functional as F
from torch import nn

from bngraph.passes.swap_activation import SwapActivation, swap_activation
from bngraph.trace import trace


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.ReLU(inplace=True)

    def forward(self, x):
        return torch.tanh(F.relu(self.act(self.fc(x))).relu())


def test_relu_in_every_form_becomes_sigmoid():
    model = Mixed()
    gm = trace(model, [torch.randn(2, 4)])
    result = swap_activation(gm, to="sigmoid")
    assert sorted(result.changed) == ["act", "relu", "relu_1"]
    assert isinstance(gm.act, nn.Sigmoid)
    x = torch.randn(3, 4)
    want = torch.tanh(torch.sigmoid(torch.sigmoid(torch.sigmoid(model.fc(x)))))
    torch.testing.assert_close(gm(x), want)


def test_leaves_other_activations_alone():
    gm = trace(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), [torch.randn(2, 3)])
    assert SwapActivation("sigmoid")(gm).changed == []
