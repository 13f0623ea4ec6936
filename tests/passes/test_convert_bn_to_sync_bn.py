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
