"""--track-inputs for nonlinearities called as functions or methods (F.relu, torch.tanh, x.sigmoid())."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bngraph.cli import main
from bngraph.errors import UserError
from bngraph.training.track import InputTracker, functional_nonlinearity_names
from tests.mnist_like import write_learnable

NET_PY = '''
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return F.relu(self.fc(x)) + torch.tanh(x)


class Net(nn.Module):
    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.fc1, self.block, self.fc2 = nn.Linear(784, 32), Block(), nn.Linear(32, 10)

    def forward(self, x):
        h = self.fc1(x.flatten(1)).sigmoid()
        h = self.block(h)
        return self.fc2(h.sigmoid())
'''


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(6, 8), nn.Linear(8, 8), nn.ReLU()

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = self.act(self.fc2(h))  # a module: hooked as before, not named as a call
        h.sigmoid_()  # in place: its input is recorded before it changes
        return torch.tanh(h) + h.sigmoid()


def test_calls_are_named_as_torch_fx_names_nodes():
    assert functional_nonlinearity_names(Net(), [torch.randn(2, 6)]) == ["relu", "sigmoid", "tanh", "sigmoid_1"]


def test_tracked_percentiles_of_a_functional_and_an_in_place_call():
    model = Net().eval()
    x = torch.randn(64, 6)
    tracker = InputTracker(model, ["relu", "sigmoid", "act"], unit=3, example_inputs=[x[:2]])
    with tracker.recording(), torch.no_grad():
        model(x)
    with torch.no_grad():
        pre_relu = model.fc1(x)
        pre_sigmoid = model.fc2(F.relu(pre_relu)).relu()
    q = torch.tensor([0.15, 0.5, 0.85])
    got = tracker.quantiles()
    assert got["relu"] == pytest.approx(torch.quantile(pre_relu[:, 3], q).tolist())
    assert got["sigmoid"] == pytest.approx(torch.quantile(pre_sigmoid[:, 3], q).tolist())
    assert got["act"] == pytest.approx(torch.quantile(model.fc2(F.relu(pre_relu))[:, 3], q).tolist())
    with torch.no_grad():  # nothing is recorded outside `recording()`, and the model still runs
        model(x)
    assert tracker.quantiles()["relu"] == got["relu"]


class SequenceModel(nn.Module):  # a transformer MLP's shape: features in the last axis of (N, T, C)
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(8, 6), nn.Dropout(0.1))
        self.act, self.conv = nn.GELU(), nn.Conv1d(6, 6, 1)  # then (N, C, T): features in axis 1

    def forward(self, x):
        h = self.act(self.fc(x))
        return F.relu(self.conv(h.transpose(1, 2))).mean(2)


def test_the_tracked_unit_is_a_feature_of_a_sequence_not_a_position():
    # x[:, unit] of a Linear's (N, T, C) output is position `unit`, every feature of it.
    model = SequenceModel().eval()
    with torch.no_grad():
        model.fc[0].bias[2] = 10.0  # feature 2 of the GELU's input sits near 10, the others near 0
    x = torch.randn(64, 5, 8)
    tracker = InputTracker(model, ["act", "relu"], unit=2, example_inputs=[x[:2]])
    with tracker.recording(), torch.no_grad():
        model(x)
    with torch.no_grad():
        features = model.fc(x)
        channels = model.conv(F.gelu(features).transpose(1, 2))
    q = torch.tensor([0.15, 0.5, 0.85])
    got = tracker.quantiles()
    assert got["act"] == pytest.approx(torch.quantile(features[..., 2].flatten(), q).tolist())
    assert got["act"][1] > 9
    assert got["relu"] == pytest.approx(torch.quantile(channels[:, 2].flatten(), q).tolist())


def test_unknown_name_lists_calls_too():
    with pytest.raises(UserError, match=r"no nonlinearity module 'relu_7' .*the model has act, relu, sigmoid"):
        InputTracker(Net(), ["relu_7"], example_inputs=[torch.randn(2, 6)])


def test_cli_tracks_a_method_and_a_call_inside_a_submodule(tmp_path, capsys):
    data = write_learnable(tmp_path / "mnist", n_train=200, n_test=100)
    (tmp_path / "net.py").write_text(NET_PY)
    out = tmp_path / "run"
    code = main(["train", f"{tmp_path / 'net.py'}:Net", "--data", str(data), "--steps", "20", "--eval-every", "10",
                 "--track-inputs", "sigmoid_1", "block.relu", "--quiet", "-o", str(out), "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["inputs"]) for r in rows] == [["block.relu", "sigmoid_1"]] * 2
    assert all(len(q) == 3 and q[0] <= q[1] <= q[2] for r in rows for q in r["inputs"].values())
    assert (out / "inputs.png").stat().st_size > 0
