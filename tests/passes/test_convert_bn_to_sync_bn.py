import torch
from torch import nn

import bngraph
from bngraph.passes.convert_bn_to_sync_bn import convert_bn_to_sync_bn
from bngraph.zoo import create_model, get_entry


def test_every_batchnorm_of_an_inserted_model_becomes_sync_with_the_same_state():
    x = torch.randn(*get_entry("inception-small").input_shape)
    model, _ = bngraph.insert(create_model("inception-small"), [x])
    keys = model.state_dict().keys()
    result = convert_bn_to_sync_bn(model)
    assert len(result.changed) == 69 and result.skipped == []
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in result.graph.modules())
    assert result.graph.state_dict().keys() == keys


def test_does_nothing_without_batchnorm():
    result = convert_bn_to_sync_bn(nn.Sequential(nn.Linear(3, 3)))
    assert result.changed == [] and result.skipped == []


class ClampBN(nn.BatchNorm2d):  # a library's BN that computes more than BatchNorm does
    def forward(self, x):
        return super().forward(x).clamp(-1, 1)


class WiderEps(nn.BatchNorm2d):  # a subclass that only configures: SyncBatchNorm computes the same
    def __init__(self, features):
        super().__init__(features, eps=1e-3)


def test_a_batchnorm_that_computes_more_is_kept_and_reported():
    # SyncBatchNorm took its place: the run trained without the clamp (or a hook), and the model
    # saved afterwards had it, so the run's numbers were another model's.
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda m, i, o: o.clamp(-1, 1))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ClampBN(4), nn.Conv2d(4, 4, 1), hooked, nn.Conv2d(4, 4, 1), WiderEps(4))
    result = convert_bn_to_sync_bn(model)
    assert result.changed == ["5"] and isinstance(result.graph[5], nn.SyncBatchNorm) and result.graph[5].eps == 1e-3
    assert type(result.graph[1]) is ClampBN and type(result.graph[3]) is nn.BatchNorm2d
    assert [s.site for s in result.skipped] == ["1", "3"]
    assert "ClampBN (a BatchNorm2d with a forward of its own) computes what a SyncBatchNorm" in result.skipped[0].reason
    assert result.skipped[1].reason.startswith("it has a forward hook, which a SyncBatchNorm in its place would not run")


def test_a_batchnorm_reached_under_two_names_is_converted_at_both():
    # torch's conversion walks each module once: `self.norm = self.bn`, which the forward calls,
    # stayed a plain BatchNorm, and trained on the rank's statistics without a word.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.norm = model[1]
    result = convert_bn_to_sync_bn(model)
    assert result.changed == ["1", "norm"] and result.graph.norm is result.graph[1]
    assert isinstance(result.graph.norm, nn.SyncBatchNorm)
    from bngraph.training.sync_bn import SyncBatchNormCPU, use_cpu_sync_bn

    on_cpu = use_cpu_sync_bn(result.graph)
    assert type(on_cpu.norm) is SyncBatchNormCPU and on_cpu.norm is on_cpu[1]


def test_a_lone_batchnorm_is_replaced():
    bn = nn.BatchNorm1d(3)
    result = convert_bn_to_sync_bn(bn)
    assert result.changed == [""] and isinstance(result.graph, nn.SyncBatchNorm) and result.graph.weight is bn.weight
