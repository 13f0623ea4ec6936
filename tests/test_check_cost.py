"""The checks made cheaper (bngraph.equivalence's second batch, fold's reuse of the traced run,
insert's second trace skipped where the mode cannot reach it) still catch what they caught."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bngraph.equivalence import Reference
from bngraph.errors import CheckFailed
from bngraph.fold import fold
from bngraph.partial_trace import trace_for_insert
from tests.passes.fold_util import randomize_bn


def _sizes(reference: Reference) -> list[int]:
    return [batch[0].shape[0] for batch in reference.batches]


class SqueezesTheBatch(nn.Module):
    """Takes no batch of 1: `squeeze()` removes the batch axis too, as users' code sometimes does."""

    def forward(self, x):
        return x.squeeze().sum(dim=1)


def test_second_batch_is_the_smallest_other_size():
    model = nn.Sequential(nn.Linear(3, 2))
    assert _sizes(Reference(model, [torch.randn(4, 3)])) == [4, 1]
    assert _sizes(Reference(model, [torch.randn(1, 3)])) == [1, 2]
    # Where the model itself refuses a batch of 1, the next size up.
    assert _sizes(Reference(SqueezesTheBatch(), [torch.randn(2, 3, 1)])) == [2, 3]


class WrongAtOne(nn.Module):
    """Computes the model's function except on a batch of 1: only the second batch shows it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        y = self.model(x)
        return y + 0.5 if x.shape[0] == 1 else y


def test_a_difference_only_on_the_second_batch_is_caught():
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    with pytest.raises(CheckFailed, match="batch of 1"):
        Reference(model, [torch.randn(2, 3)]).check(WrongAtOne(model), what="the transformed model")


def test_fold_checks_the_trace_and_the_result_with_one_forward_of_the_trace():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    gm, report = fold(model, [x])
    assert report.facts["batchnorms_after"] == 0
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model.eval()(x), rtol=1e-5, atol=1e-5)


class ModeInAnAttribute(nn.Module):
    """A block that keeps its mode in an attribute of its own, set by an overridden train():
    the graph is then fixed at trace time, and only tracing in the other mode shows it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.augment = False

    def train(self, mode: bool = True):
        super().train(mode)
        self.augment = mode
        return self

    def forward(self, x):
        x = self.fc(x)
        if self.augment:
            x = x + 1.0
        return torch.relu(x)


def test_mode_kept_outside_the_flag_still_makes_the_block_opaque():
    model = nn.Sequential(nn.Linear(4, 4), ModeInAnAttribute()).eval()
    x = torch.randn(3, 4)
    gm, opaque = trace_for_insert(model, [x])
    assert [(o.module, o.type) for o in opaque] == [("1", "ModeInAnAttribute")]
    assert "different graphs" in opaque[0].reason
    with torch.no_grad():
        torch.testing.assert_close(gm.train()(x), model.train()(x))


def test_mode_as_a_flag_needs_no_second_trace():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.dropout(torch.relu(self.fc(x)), 0.5, training=self.training)

    model = nn.Sequential(Block(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    gm, opaque = trace_for_insert(model, [x])
    assert opaque == []
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model.eval()(x))
        torch.manual_seed(0)
        a = gm.train()(x)
        torch.manual_seed(0)
        torch.testing.assert_close(a, model.train()(x))
