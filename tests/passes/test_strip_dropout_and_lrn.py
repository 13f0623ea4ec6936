import torch
import torch.nn.functional as F
from torch import nn

from bngraph.passes.strip_dropout_and_lrn import strip_dropout_and_lrn
from bngraph.trace import trace


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.lrn, self.drop = nn.Conv2d(3, 6, 3), nn.LocalResponseNorm(5), nn.Dropout(0.5)

    def forward(self, x):
        return F.dropout(self.drop(self.lrn(self.conv(x))).flatten(1), 0.3, self.training)


def test_removes_dropout_and_lrn_in_module_and_functional_form():
    model = WithDropout()
    gm = trace(model, [torch.randn(2, 3, 8, 8)])
    result = strip_dropout_and_lrn(gm)
    assert sorted(result.changed) == ["drop", "dropout", "lrn"]
    assert not any(isinstance(m, (nn.Dropout, nn.LocalResponseNorm)) for m in gm.modules())
    x = torch.randn(2, 3, 8, 8)
    gm.train()  # without dropout, train mode is deterministic and equals the bare conv
    torch.testing.assert_close(gm(x), model.conv(x).flatten(1))


def test_does_nothing_without_dropout():
    gm = trace(nn.Sequential(nn.Linear(3, 3)), [torch.randn(2, 3)])
    assert strip_dropout_and_lrn(gm).changed == []


class TorchsOwnForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.lrn = nn.Conv2d(3, 6, 3), nn.CrossMapLRN2d(5)

    def forward(self, x):
        h = torch.dropout(self.lrn(self.conv(x)), 0.5, self.training)
        return torch.feature_alpha_dropout(h, 0.2, self.training)


def test_removes_torchs_own_dropout_functions_and_the_cross_map_lrn():
    # Kept by the recipes that promise "dropout removed", without a word.
    model = TorchsOwnForms()
    gm = trace(model, [torch.randn(2, 3, 8, 8)])
    assert len(strip_dropout_and_lrn(gm).changed) == 3
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm.train()(x), model.conv(x))
