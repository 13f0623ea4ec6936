"""The insert pipeline (insert_bn_before_activation + drop_bias_before_bn) on many architectures."""

import operator

import pytest
import torch
from torch import nn

import bngraph
from tests import models


def _run(cls, **kwargs):
    model = cls()
    x = torch.randn(*cls.example_input_shape, generator=torch.Generator().manual_seed(0))
    out, report = bngraph.insert(model, [x], **kwargs)
    return model, out, report, x


@pytest.mark.parametrize("cls", models.TRACEABLE, ids=lambda c: c.__name__)
def test_inserts_exactly_the_expected_sites(cls):
    _, _, report, _ = _run(cls)
    got = {r["node"]: (r["norm"], r["features"], r["bias_removed"]) for r in report.sections["inserted"]}
    assert got == cls.EXPECTED


@pytest.mark.parametrize("cls", models.TRACEABLE, ids=lambda c: c.__name__)
def test_result_trains_and_keeps_output_shapes(cls):
    model, out, report, x = _run(cls)
    batch = torch.randn(4, *x.shape[1:])
    out.train()
    y = out(batch)
    assert y.shape == model(batch).shape
    y.float().sum().backward()
    new_bns = [out.get_submodule(r["bn"]) for r in report.sections["inserted"]]
    assert len(new_bns) == len(cls.EXPECTED)
    assert all(bn.weight.grad is not None for bn in new_bns)


@pytest.mark.parametrize("cls", models.TRACEABLE, ids=lambda c: c.__name__)
def test_insert_is_idempotent(cls):
    _, out, _, x = _run(cls)
    again, report = bngraph.insert(out, [x])
    assert report.sections["inserted"] == []
    assert report.facts["changed"] is False
    assert len([r for r in report.sections["skipped"] if "already normalized" in r["reason"]]) >= len(cls.EXPECTED)
    assert str(again.graph) == str(out.graph)


@pytest.mark.parametrize("cls", models.TRACEABLE, ids=lambda c: c.__name__)
def test_preserve_keeps_the_eval_function(cls):
    model, out, _, x = _run(cls, preserve=True)
    batch = torch.randn(5, *x.shape[1:]) * 3 + 1  # not the calibration distribution
    with torch.no_grad():
        want, got = model.eval()(batch), out.eval()(batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_does_not_touch_the_model_it_was_handed():
    model = models.Residual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bngraph.insert(model, [torch.randn(2, 8, 6, 6)], preserve=True)
    assert model.conv2.bias is not None and model.conv1.bias is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_features_last_normalizes_each_feature_over_batch_and_time():
    _, out, _, _ = _run(models.Sequence3d)
    seen = {}
    out.act2.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
    out.train()(torch.randn(16, 5, 12) * 4 + 2)
    x = seen["x"]  # (N, T, C) with C == T == 5: only the right axis is standardized
    torch.testing.assert_close(x.mean(dim=(0, 1)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.var(dim=(0, 1), unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_conv_gets_one_feature_per_channel_not_per_activation():
    _, out, _, _ = _run(models.GroupedConvs)
    bn = out.get_submodule("dw_act_bn")
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 8


def test_bias_drop_keeps_the_eval_function_with_random_statistics():
    from tests.util import randomize_bn

    model = models.SharedActivation()
    out, _ = bngraph.insert(model, [torch.randn(2, 10)])
    assert out.fc1.bias is None
    reference = models.SharedActivation()
    reference.load_state_dict(model.state_dict())
    # Rebuild the same function with the bias kept: BN(Wx + b) with mean m == BN(Wx) with mean m - b.
    randomize_bn(out, seed=3)
    x = torch.randn(7, 10)
    with torch.no_grad():
        bn1, bn2 = out.act_bn, out.act_bn_1
        h = reference.fc1(x)
        h = (h - (bn1.running_mean + model.fc1.bias)) / torch.sqrt(bn1.running_var + bn1.eps) * bn1.weight + bn1.bias
        h = reference.fc2(torch.relu(h))
        h = (h - (bn2.running_mean + model.fc2.bias)) / torch.sqrt(bn2.running_var + bn2.eps) * bn2.weight + bn2.bias
        torch.testing.assert_close(out(x), torch.relu(h), rtol=1e-5, atol=1e-5)


def test_softmax_is_not_a_nonlinearity_here():
    _, out, report, _ = _run(models.MethodsAndFunctions)
    assert "softmax" not in {r["node"] for r in report.sections["inserted"]}
    assert sum(isinstance(m, nn.BatchNorm1d) for m in out.modules()) == 5


class _InplaceOnAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, x):
        h = self.fc(x)
        h[:, :4].relu_()  # writes into half of h, which is returned
        return h


class _ConvFlattened(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.sigmoid(self.conv(x).flatten(1))  # channels merged with positions


@pytest.mark.parametrize(
    "cls,shape,site,reason",
    [
        (_InplaceOnAView, (4, 6), "relu_", "in-place activation: it writes into getitem, a view of fc"),
        (_ConvFlattened, (4, 3, 5, 5), "sigmoid", "flatten (.flatten()) merges conv's features with other axes"),
    ],
)
def test_skips_what_it_cannot_prove(cls, shape, site, reason):
    model = cls()
    x = torch.randn(*shape)
    out, report = bngraph.insert(model, [x])
    assert report.sections["inserted"] == []
    assert {r["node"]: r["reason"] for r in report.sections["skipped"]}[site].endswith(reason)
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), model.eval()(x), rtol=0, atol=0)


IN_A_ROW_PY = '''
import torch
import torch.nn.functional as F
from torch import nn


def layer_then_two(layer, x):  # a helper of the user's: its calls are recorded as one call
    return torch.tanh(F.relu(layer(x)))


class TanhOfRelu(nn.Module):
    def __init__(s):  # `s` for self, as some code writes it: its forward read as a plain function
        super().__init__()
        s.l = nn.Linear(4, 5)

    def forward(s, x):
        return torch.tanh(F.relu(s.l(x)))


class ReluOfRelu(TanhOfRelu):
    def forward(s, x):
        return torch.relu(torch.relu(s.l(x)))


class ThroughAHelper(TanhOfRelu):
    def forward(self, x):
        return layer_then_two(self.l, x)


def sequential():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Tanh())


def forward(x):  # a helper that happens to be called forward: a swish, one nonlinearity
    return x * torch.sigmoid(x)


class SwishHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return forward(self.c(x))


class OwnBatchNormBeside(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv(torch.relu(self.conv0(x)))
        return torch.relu(h) + self.bn(h)
'''


class SigmoidTimesTanh(nn.Module):  # a gated unit: two activations of one conv's output
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        h = self.c(x)
        return torch.sigmoid(h) * torch.tanh(h)


@pytest.mark.parametrize("model, shape", [
    ("TanhOfRelu", (6, 4)), ("sequential", (6, 4)), ("ReluOfRelu", (6, 4)), ("ReluOfRelu", (4, 3, 4)),
    ("ThroughAHelper", (6, 4)),
])
def test_two_activations_in_a_row_get_a_batchnorm_each_and_a_second_insert_adds_none(model, shape, tmp_path):
    # The second was skipped as "computed from parameters and buffers alone": its input read as
    # one activation function of the first one's new BN. Inserting again then added its BN.
    (tmp_path / "in_a_row.py").write_text(IN_A_ROW_PY)
    x = torch.randn(*shape)
    inserted, report = bngraph.insert(bngraph.load(f"{tmp_path / 'in_a_row.py'}:{model}").eval(), [x])
    assert len(report.sections["inserted"]) == 2 and report.sections["skipped"] == []
    again, report = bngraph.insert(inserted, [x])
    assert report.sections["inserted"] == [] and report.facts["changed"] is False


def test_a_layer_read_by_two_activations_through_their_own_batchnorms_loses_its_bias_exactly():
    # Each BN cancels the bias, yet it was kept ("c's output also feeds tanh_bn, which needs the
    # bias"), and a note said h reached tanh unnormalized, which read it through tanh_bn.
    torch.manual_seed(0)
    model, x = SigmoidTimesTanh(), torch.randn(5, 3, 8, 8)
    bias = model.c.bias.detach().clone()
    inserted, report = bngraph.insert(model, [x])
    assert [row["bias_removed"] for row in report.sections["inserted"]] == [True, True]
    assert report.notes == [] and inserted.c.bias is None
    inserted.train()
    with torch.no_grad():
        without = inserted(x)
        inserted.c.bias = nn.Parameter(bias * 10)  # any bias: each BN subtracts its batch's mean
        torch.testing.assert_close(inserted(x), without, rtol=1e-4, atol=1e-5)


def test_a_helper_function_named_forward_is_one_nonlinearity(tmp_path):
    # Taken for a module's forward, its sigmoid got a BN of its own: conv * sigmoid(BN(conv)).
    (tmp_path / "in_a_row.py").write_text(IN_A_ROW_PY)
    x = torch.randn(2, 3, 8, 8)
    inserted, report = bngraph.insert(bngraph.load(f"{tmp_path / 'in_a_row.py'}:SwishHelper").eval(), [x])
    [row] = report.sections["inserted"]
    mul = next(n for n in inserted.graph.nodes if n.op == "call_function" and n.target is operator.mul)
    assert {a.name for a in mul.all_input_nodes} == {row["bn"], "sigmoid"}  # x * sigmoid(x), x normalized


def test_a_layer_read_by_a_new_batchnorm_and_the_models_own_keeps_its_bias_saying_why(tmp_path):
    # Its bias was dropped and the model's BN shifted, which insert then put back: the check
    # failed, and insert kept every bias in the model with a note that it differed.
    (tmp_path / "in_a_row.py").write_text(IN_A_ROW_PY)
    model = bngraph.load(f"{tmp_path / 'in_a_row.py'}:OwnBatchNormBeside").eval()
    inserted, report = bngraph.insert(model, [torch.randn(2, 3, 12, 12)])
    assert [row["bias_removed"] for row in report.sections["inserted"]] == [True, False] and report.notes == []
    assert inserted.conv0.bias is None and inserted.conv.bias is not None
    assert report.sections["skipped"][0]["reason"] == ("drop_bias_before_bn: conv's output also feeds bn, the model's "
                                                       "own BatchNorm, whose running statistics stay as they are (the "
                                                       "bias is in them)")


class SkipThenLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.c(torch.relu(self.b(torch.relu(h) + h)))


def test_a_bias_kept_for_another_reader_and_a_bias_dropped_after_it():
    # The kept one's reason once reused the name of the pass's index of bias readers: the next
    # BatchNorm's check then raised inside the pass.
    inserted, report = bngraph.insert(SkipThenLayer(), [torch.randn(5, 6)])
    assert [row["bias_removed"] for row in report.sections["inserted"]] == [False, True]
    assert report.sections["skipped"] == [{"node": "relu_bn", "reason": "drop_bias_before_bn: a's output also feeds "
                                                                        "add, which needs the bias"}]
    assert inserted.a.bias is not None and inserted.b.bias is None
