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
