"""The zoo: every model builds, runs, and gets the BatchNorms the paper's tables imply."""

import json

import pytest
import torch
from torch import nn

import bngraph
from bngraph.cli import main
from bngraph.zoo import create_model, get_entry, list_models
from bngraph.zoo.inception import PAPER_TABLE

# ReLUs in the paper's Inception variant, counted by hand from the layer table (PAPER.md):
#   stem: separable 7x7 conv, 1x1 reduce, 3x3 conv                          = 3
#   per module: #1x1 (if any) + 3x3 reduce, 3x3 + double reduce, 3x3, 3x3 + pool proj (if any)
#   3a 3b 4a 4b 4c 4d 5a 5b: 1 + 2 + 3 + 1 = 7 each                        = 56
#   3c 4e (no 1x1, pool passes through): 2 + 3 = 5 each                      = 10
INCEPTION_RELUS = 3 + 8 * 7 + 2 * 5
EXPECTED_BN = {"mnist-mlp": 3, "inception": INCEPTION_RELUS, "inception-small": INCEPTION_RELUS}


def test_hand_count_matches_the_table_and_the_model():
    from_table = 3 + sum(bool(s.c1x1) + 2 + 3 + bool(s.proj) for s in PAPER_TABLE.values())
    assert from_table == INCEPTION_RELUS == 69
    assert sum(isinstance(m, nn.ReLU) for m in create_model("inception").modules()) == 69


@pytest.mark.parametrize("name", list_models())
def test_insert_puts_a_batchnorm_before_every_nonlinearity(name):
    model = create_model(name)
    x = torch.randn(*get_entry(name).input_shape)
    out, report = bngraph.insert(model, [x])
    assert len(report.sections["inserted"]) == EXPECTED_BN[name]
    assert report.sections["skipped"] == []
    assert all(row["bias_removed"] for row in report.sections["inserted"])
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules()) == EXPECTED_BN[name]
    out.train()
    y = out(x)
    assert y.shape == model(x).shape
    y.sum().backward()


@pytest.mark.parametrize("name", list_models())
def test_traced_zoo_models_pickle(name):
    import io

    from bngraph.trace import trace

    torch.save(trace(create_model(name)), io.BytesIO())


def test_inception_output_channels_follow_the_layer_table():
    model = create_model("inception")
    assert [block.out_channels for block in model.blocks] == [256, 320, 576, 576, 576, 608, 608, 1056, 1024, 1024]


def test_zoo_command_lists_models_with_parameter_counts(capsys):
    assert main(["zoo", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["models"]}
    assert set(rows) == set(list_models())
    assert rows["mnist-mlp"]["parameters"] == 784 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10
    assert rows["inception"]["input_shape"] == [2, 3, 224, 224]  # numbers, not text
