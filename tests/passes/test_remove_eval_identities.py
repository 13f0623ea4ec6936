"""remove_eval_identities: Identity and eval-mode Dropout go; a dropout that drops stays."""

import torch
import torch.nn.functional as F
from torch import nn

from bngraph.passes.remove_eval_identities import remove_eval_identities
from bngraph.trace import trace


class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop, self.keep = nn.Linear(4, 4), nn.Dropout(0.5), nn.Identity()

    def forward(self, x):
        y = self.keep(self.drop(self.fc(x)))
        return F.dropout(y, 0.2, training=False) + F.alpha_dropout(y, 0.1)


def test_removes_identities_and_eval_dropout():
    model = Noops().eval()
    x = torch.randn(3, 4)
    gm = trace(model, [x])
    result = remove_eval_identities(gm)
    assert result.changed == ["drop", "keep", "dropout", "alpha_dropout"] and result.skipped == []
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_keeps_dropout_that_drops():
    class Drops(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5)  # training defaults to True: it drops in eval mode too

    gm = trace(Drops().eval(), [torch.randn(2, 3)])
    result = remove_eval_identities(gm)
    assert result.changed == [] and "training=True" in result.skipped[0].reason
    model = Noops()  # in training mode
    gm = trace(model, [torch.randn(3, 4)])
    gm.train()
    result = remove_eval_identities(gm)
    assert result.changed == ["keep", "dropout", "alpha_dropout"] and "training mode" in result.skipped[0].reason


def test_does_nothing_without_identities():
    gm = trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval(), [torch.randn(2, 3)])
    result = remove_eval_identities(gm)
    assert result.changed == [] and result.skipped == []
