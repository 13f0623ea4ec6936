import torch
from torch import nn

from bngraph.trace import copy_module, trace
from tests.models import Residual


def test_copy_shares_nothing_but_keeps_ties_within_the_copy():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    copied = copy_module(model)
    assert copied[0].weight is copied[2].weight and copied[0].weight is not model[0].weight
    with torch.no_grad():
        copied[0].weight.add_(1)
        copied[1].running_mean.add_(1)
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    copied[1].register_forward_hook(lambda *a: None)
    assert not model[1]._forward_hooks
    copied.eval()
    assert model.training and model[1].training
    x = torch.randn(3, 4)
    torch.testing.assert_close(copy_module(model)(x), model(x))


def test_trace_in_eval_mode_leaves_the_model_in_train_mode():
    model = Residual().train()
    gm = trace(model, [torch.randn(2, 8, 6, 6)], training=False)
    assert model.training and not gm.training
    assert "tensor_meta" in next(iter(gm.graph.nodes)).meta
