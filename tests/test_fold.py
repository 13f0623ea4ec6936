"""bngraph.fold.fold: the whole pipeline, its report, and what it leaves untouched."""

import copy

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import bngraph
from bngraph.fold import fold
from bngraph.zoo import create_model, get_entry
from tests.passes.fold_util import assert_matches, batch_norms_left, nearly_dead_channel
from tests.util import randomize_bn


class Mixed(nn.Module):
    """One BN of each fate: into the conv before, into the linear after, a multiply-add, left."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn_conv = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool, self.bn_pool = nn.MaxPool2d(2), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_batch = nn.BatchNorm2d(8, track_running_stats=False)
        self.bn_head, self.drop, self.fc = nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn_conv(self.conv(x))))
        y = self.bn_batch(self.conv2(self.bn_pool(y)))
        return self.fc(self.drop(self.bn_head(y.mean((2, 3)))))


def test_each_bn_gets_its_fate_and_the_report_says_so():
    model = randomize_bn(Mixed()).train()  # handed over in training mode: fold uses eval
    x = torch.randn(4, 3, 8, 8)
    state = copy.deepcopy(model.state_dict())
    gm, report = fold(model, [x])
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    folded = {row["node"]: (row["into"], row["how"]) for row in report.sections["folded"]}
    assert folded == {
        "bn_conv": ("conv", "into the layer before it"),
        "bn_head": ("fc", "into the layer after it"),
        "bn_pool": ("addcmul", "multiply-add"),
    }
    assert "before: its input comes from pool (MaxPool2d)" in report.sections["folded"][2]["note"]
    assert report.sections["remaining"] == [
        {"node": "bn_batch", "reason": "it has no running statistics (track_running_stats=False), so it normalizes "
                                       "with each batch's own statistics even in eval mode"}
    ]
    ops = {row["op"]: (row["before"], row["after"]) for row in report.sections["ops"]}
    assert ops["BatchNorm2d"] == (3, 1) and ops["BatchNorm1d"] == (1, 0) and ops["Dropout"] == (1, 0)
    assert report.facts == {"nodes_before": 11, "nodes_after": 8, "batchnorms_before": 4, "batchnorms_after": 1,
                            "batchnorms_kept": 0}
    assert batch_norms_left(gm) == ["bn_batch"] and not gm.training
    assert set(report.passes) == {row["pass"] for row in report.sections["passes"]}
    assert_matches(gm, model.eval(), x)


def test_report_json_has_the_documented_keys():
    _, report = fold(randomize_bn(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))), [torch.randn(2, 3)])
    data = report.to_json()
    assert {"folded", "remaining", "nodes_before", "nodes_after"} <= set(data)
    assert data["folded"][0]["node"] == "_1" and data["remaining"] == []


def test_equal_size_trap_end_to_end():
    model = randomize_bn(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)))
    x = torch.randn(2, 6, 6)
    gm, report = fold(model, [x])
    assert report.sections["folded"][0]["how"] == "multiply-add"  # over T, where it belongs
    assert_matches(gm, model, x)
    with torch.no_grad():
        assert not torch.allclose(fuse(model)(x), model(x), atol=1e-3)  # fx folds it onto C


def test_tiny_variance_is_flagged_with_the_error_measured():
    model = nearly_dead_channel()
    x = torch.randn(2, 3, 6, 6)
    gm, report = fold(model, [x])
    row = report.sections["folded"][0]
    with torch.no_grad():
        actual = float((gm(x) - model(x)).abs().max())
    assert row["rounding_gain"] > 1e5 and row["max_abs_error"] == pytest.approx(actual, rel=1e-6)
    assert 1e-5 < row["max_rel_error"] < 0.1
    assert "variance is so small" in report.notes[0]


def test_nan_statistics_are_a_user_error():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model[1].running_var[2] = float("nan")
    with pytest.raises(bngraph.UserError, match="fold_bn_into_preceding_layer: BatchNorm '1' has NaN in its running_var"):
        fold(model, [torch.randn(2, 3, 6, 6)])


@pytest.mark.parametrize("name", ["mnist-mlp", "inception-small"])
def test_zoo_models_after_insert_fold_completely(name):
    x = torch.randn(get_entry(name).input_shape)
    with_bn, _ = bngraph.insert(create_model(name), [x])
    gm, report = fold(randomize_bn(with_bn), [x])
    assert report.sections["remaining"] == [] and batch_norms_left(gm) == []
    assert all(row["how"] == "into the layer before it" for row in report.sections["folded"])
    assert not any(n.op == "call_method" and n.target == "transpose" for n in gm.graph.nodes)
    assert_matches(gm, with_bn, x, rtol=1e-4, atol=1e-5)


class FlattenHead(nn.Module):
    """A classifier head as older CNNs write it: BN on the last feature maps, flatten, Linear."""

    def __init__(self, flatten: str, relu_between: bool = False):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 5)
        self.flatten, self.relu_between = flatten, relu_between
        self.flat = nn.Flatten()

    def forward(self, x):
        y = torch.relu(self.conv(x))  # a ReLU: the BN cannot go back into the conv
        y = self.bn(y)
        if self.flatten == "module":
            y = self.flat(y)
        elif self.flatten == "method":
            y = y.flatten(1)
        else:  # the view of older code
            y = y.view(y.size(0), -1)
        return self.fc(torch.relu(y) if self.relu_between else y)


@pytest.mark.parametrize("flatten", ["module", "method", "view"])
def test_a_bn_before_flatten_and_linear_folds_into_the_linear(flatten):
    # Channel c's scale and shift apply to the columns of W its positions flatten into.
    model = randomize_bn(FlattenHead(flatten)).eval()
    x = torch.randn(5, 3, 8, 8)
    gm, report = fold(model, [x])
    assert [(r["node"], r["into"]) for r in report.sections["folded"]] == [("bn", "fc")]
    assert batch_norms_left(gm) == []
    with torch.no_grad():
        torch.testing.assert_close(gm(x * 3), model(x * 3), rtol=1e-4, atol=1e-5)


def test_a_relu_after_the_flatten_keeps_the_bn_out_of_the_linear():
    model = randomize_bn(FlattenHead("method", relu_between=True)).eval()
    gm, report = fold(model, [torch.randn(5, 3, 8, 8)])
    assert all(r["into"] != "fc" for r in report.sections["folded"])


class AdaptsAtTestTime(nn.Module):
    """Test-time adaptation: `adapt` normalizes with each batch's statistics even in eval mode
    (the model's train() keeps it training); `stem`'s BN is an ordinary one."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.adapt = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def train(self, mode=True):
        super().train(mode)
        self.adapt.train(True)
        return self

    def forward(self, x):
        return self.adapt(self.conv(torch.relu(self.stem_bn(self.stem(x)))))


class SetsTrainingInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        self.bn.training = True  # always batch statistics
        return self.bn(self.conv(x))


@pytest.mark.parametrize("cls, left", [(AdaptsAtTestTime, "adapt"), (SetsTrainingInForward, "bn")])
def test_a_bn_the_model_keeps_training_in_eval_mode_is_left_and_the_rest_folded(cls, left):
    torch.manual_seed(0)
    model = randomize_bn(cls())
    x = torch.randn(4, 3, 8, 8)
    folded, report = fold(model, [x])
    [row] = report.sections["remaining"]
    assert row["node"] == left and row["reason"].startswith("it is in training mode when the model is in eval mode")
    assert [r["node"] for r in report.sections["folded"]] == (["stem_bn"] if cls is AdaptsAtTestTime else [])
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), copy.deepcopy(model).eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_a_channels_last_model_keeps_channels_last_weights(dims):
    # The folded weights came back contiguous: every call of the folded conv converted them.
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    model = randomize_bn(nn.Sequential(conv(3, 8, 3), norm(8), nn.ReLU(), conv(8, 8, 3, bias=False), norm(8)), seed=3)
    model = model.eval().to(memory_format=layout)
    x = torch.randn(2, 3, *[9] * dims).contiguous(memory_format=layout)
    folded, _ = fold(model, [x])
    weights = [p for p in folded.parameters() if p.dim() == dims + 2]
    assert len(weights) == 2 and all(w.is_contiguous(memory_format=layout) for w in weights)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class _FrozenParts(nn.Module):
    def __init__(self, bias: bool, traceable: bool):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4), nn.Linear(4, 2)
        self.traceable = traceable

    def forward(self, x):
        if not self.traceable and torch.isnan(x).any():  # a branch on data: folded module by module
            raise ValueError("a NaN in the input")
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("traceable", [True, False], ids=["traced", "module-by-module"])
@pytest.mark.parametrize(("bias", "frozen", "trains"), [
    (True, ["conv.weight"], {"conv.weight": False, "conv.bias": True}),  # the bias took the weight's: frozen
    (True, ["bn.weight", "bn.bias"], {"conv.weight": True, "conv.bias": True}),
    (False, ["bn.weight", "bn.bias"], {"conv.weight": True, "conv.bias": False}),  # a new bias: beta's
    (False, ["conv.weight"], {"conv.weight": False, "conv.bias": True}),
])
def test_folded_weights_keep_the_trainability_of_what_they_replace(traceable, bias, frozen, trains):
    model = randomize_bn(_FrozenParts(bias, traceable), seed=2).eval()
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    folded, report = fold(model, [torch.randn(2, 3, 8, 8)])
    assert report.facts["batchnorms_after"] == 0
    assert {n: p.requires_grad for n, p in folded.named_parameters() if n.startswith("conv")} == trains
