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
    x = torch.randn(3, 4)
    want = torch.tanh(torch.sigmoid(torch.sigmoid(torch.sigmoid(model.fc(x)))))
    torch.testing.assert_close(gm(x), want)


def test_leaves_other_activations_alone():
    gm = trace(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), [torch.randn(2, 3)])
    assert SwapActivation("sigmoid")(gm).changed == []


class Statements(nn.Module):
    """In-place activations whose result is read through the tensor they overwrote."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc1(x)
        h.relu_()
        g = self.fc2(h)
        self.act(g)
        k = self.fc3(g)
        F.relu(k, inplace=True)
        return k


def test_an_activation_written_in_place_is_swapped_in_place():
    # Made an out-of-place sigmoid whose result nobody read: the net lost its nonlinearities.
    model = Statements()
    gm = trace(model, [torch.randn(2, 4)])
    assert len(swap_activation(gm, to="sigmoid").changed) == 3
    x = torch.randn(3, 4)
    want = torch.sigmoid(model.fc3(torch.sigmoid(model.fc2(torch.sigmoid(model.fc1(x))))))
    torch.testing.assert_close(gm(x), want)
