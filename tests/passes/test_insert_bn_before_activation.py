"""The insert pipeline (insert_bn_before_activation + drop_bias_before_bn) on many architectures."""

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
