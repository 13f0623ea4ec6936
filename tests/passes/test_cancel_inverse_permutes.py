"""cancel_inverse_permutes: permutes that undo each other go; others, and needed ones, stay."""

import operator

import torch
from torch import nn

from bngraph.passes.cancel_inverse_permutes import cancel_inverse_permutes
from bngraph.trace import trace


class Moves(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "inverse":
            return torch.transpose(x.transpose(1, -1), -1, 1) + x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        if self.kind == "not_inverse":
            return x.transpose(1, 2).transpose(2, 3)
        if self.kind == "ends_contiguous":
            return x.transpose(1, 2).transpose(1, 2).contiguous()
        y = x.transpose(1, 2)
        return y.transpose(1, 2) * 2, y  # y is needed as it is


def _run(kind):
    x = torch.randn(2, 3, 4, 5)
    gm = trace(Moves(kind), [x])
    result = cancel_inverse_permutes(gm)
    torch.testing.assert_close(gm(x), Moves(kind)(x), rtol=0, atol=0)
    return result, [n.target for n in gm.graph.nodes if n.op in ("call_method", "call_function")]


def test_cancels_inverse_pairs_through_contiguous():
    result, left = _run("inverse")
    assert len(result.changed) == 2 and left == [operator.add]


def test_keeps_what_does_not_cancel():
    assert _run("not_inverse")[0].changed == []
    assert _run("shared")[0].changed == []
    result, left = _run("ends_contiguous")
    assert len(result.changed) == 1 and left == ["contiguous"]  # a trailing contiguous stays
