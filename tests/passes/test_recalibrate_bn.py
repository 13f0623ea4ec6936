"""recalibrate_bn: Algorithm 2's population statistics, checked against a direct computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bngraph.errors import UserError
from bngraph.passes.recalibrate_bn import recalibrate_bn
from bngraph.trace import trace
from tests.util import randomize_bn


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn2d = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)  # must be off while the statistics are gathered
        self.fc = nn.Linear(4 * 4 * 4, 6, bias=False)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.drop(F.relu(self.bn2d(self.conv(x))))
        return F.relu(self.bn1d(self.fc(x.flatten(1))))


def population(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 2, step 2, written out: E = mean of mu_B, Var = m/(m-1) * mean of var_B."""
    mus, vars_ = [], []
    for x in inputs:
        x = x.double().transpose(0, 1).reshape(x.shape[1], -1)  # features x (batch * positions)
        m = x.shape[1]
        mus.append(x.mean(1))
        vars_.append(((x - x.mean(1, keepdim=True)) ** 2).mean(1) * m / (m - 1))
    return torch.stack(mus).mean(0), torch.stack(vars_).mean(0)


def test_population_statistics_equal_a_direct_computation():
    torch.manual_seed(0)
    model = randomize_bn(ConvNet()).train()
    batches = [(torch.randn(5, 3, 6, 6) * 2 + 1,) for _ in range(4)]
    # The inputs each BN sees in the training network: batch statistics upstream, no dropout.
    with torch.no_grad():
        conv_out = [model.conv(x) for (x,) in batches]
        bn2d = model.bn2d
        fc_in = [F.relu(F.batch_norm(c, None, None, bn2d.weight, bn2d.bias, training=True)) for c in conv_out]
        fc_out = [model.fc(h.flatten(1)) for h in fc_in]
    bns = {n: b for n, b in model.named_modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)}
    counts = {n: b.num_batches_tracked.clone() for n, b in bns.items()}

    result = recalibrate_bn(model, batches)

    assert result.changed == ["bn2d", "bn1d"] and result.skipped == []
    for bn, inputs, features in ((model.bn2d, conv_out, 4), (model.bn1d, fc_out, 6)):
        mean, var = population(inputs)
        torch.testing.assert_close(bn.running_mean, mean.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var.float(), rtol=1e-5, atol=1e-6)
    assert [d["features"] for d in result.details] == [4, 6]
    assert all(d["batches"] == 4 for d in result.details)
    assert model.training and model.drop.training  # flags restored
    assert all(torch.equal(b.num_batches_tracked, counts[n]) for n, b in bns.items())


def test_works_on_a_traced_model_in_eval_mode():
    torch.manual_seed(1)
    gm = trace(randomize_bn(ConvNet()), [torch.randn(2, 3, 6, 6)]).eval()
    batches = [(torch.randn(8, 3, 6, 6),) for _ in range(3)]
    result = recalibrate_bn(gm, batches)
    assert sorted(result.changed) == ["bn1d", "bn2d"] and not gm.training
    mean, _ = population([gm.conv(x) for (x,) in batches])
    torch.testing.assert_close(gm.bn2d.running_mean, mean.float(), rtol=1e-5, atol=1e-6)


def test_skips_bn_without_running_statistics_and_bn_never_run():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.stateless = nn.BatchNorm1d(3, track_running_stats=False)
            self.unused = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.stateless(x)

    model = Unused()
    before = model.unused.running_mean.clone()
    result = recalibrate_bn(model, [(torch.randn(4, 3),)])
    assert result.changed == []
    reasons = {s.site: s.reason for s in result.skipped}
    assert "keeps no running statistics" in reasons["stateless"]
    assert "never ran" in reasons["unused"]
    assert torch.equal(model.unused.running_mean, before)


def test_a_model_without_bn_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = recalibrate_bn(model, [(torch.randn(4, 3),)])
    assert result.changed == [] and result.skipped == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class TokenBatchNorm(nn.BatchNorm1d):
    """A BatchNorm over the last axis of (N, L, C), as transformer code writes it."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class TokenMLP(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.fc = nn.Linear(5, features)
        self.bn = TokenBatchNorm(features)

    def forward(self, tokens):
        return torch.relu(self.bn(self.fc(tokens)))


def test_a_subclass_gets_the_statistics_of_what_it_normalizes_not_of_its_input():
    # Read from the module's input, a (N, L, C) batch gave L positions' statistics, stored as
    # the C channels' where L == C, and a traceback where not.
    for length, features in ((4, 4), (7, 4)):
        torch.manual_seed(2)
        model = TokenMLP(features)
        batches = [(torch.randn(6, length, 5) * 3 + 1,) for _ in range(3)]
        assert recalibrate_bn(model, batches).changed == ["bn"]
        with torch.no_grad():
            mean, var = population([model.fc(x).transpose(1, 2) for (x,) in batches])
        torch.testing.assert_close(model.bn.running_mean, mean.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.bn.running_var, var.float(), rtol=1e-5, atol=1e-6)


class CallsForwardDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return torch.relu(self.bn.forward(self.fc(x)))  # runs no hooks


def test_a_bn_whose_forward_is_called_directly_is_recalibrated():
    # A forward pre-hook saw nothing: "never ran on the calibration batches", statistics unchanged.
    torch.manual_seed(3)
    model = CallsForwardDirectly()
    batches = [(torch.randn(8, 5) * 2 - 1,) for _ in range(3)]
    assert recalibrate_bn(model, batches).changed == ["bn"]
    with torch.no_grad():
        mean, var = population([model.fc(x) for (x,) in batches])
    torch.testing.assert_close(model.bn.running_mean, mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var, var.float(), rtol=1e-5, atol=1e-6)


class HandWrittenBN(nn.Module):  # its own buffers, F.batch_norm: no nn.BatchNorm
    def __init__(self, features):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(features)), nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.full((features,), 5.0))
        self.register_buffer("running_var", torch.full((features,), 9.0))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)


def test_a_hand_written_bn_is_refused_and_nothing_is_changed():
    # Its statistics stayed as they were (the report did not name it), and the BN after it was
    # measured on what they gave: a running_var of 0 after an all-zero ReLU.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), HandWrittenBN(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    randomize_bn(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"F.batch_norm on running statistics no nn.BatchNorm holds \(1.running_mean\)"):
        recalibrate_bn(model, [(torch.randn(8, 3, 8, 8),)])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class TorchBatchNormBN(HandWrittenBN):  # the same, through torch.batch_norm's argument order
    def forward(self, x):
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.training, 0.1,
                                1e-5, False)


class FrozenBN(nn.Module):  # detectron2's FrozenBatchNorm2d: every tensor a fixed buffer
    def __init__(self, features):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.5), ("running_var", 2.0)):
            self.register_buffer(name, torch.full((features,), value))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)


def test_a_hand_written_bn_through_torch_batch_norm_is_refused_too():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), TorchBatchNormBN(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UserError, match=r"no nn.BatchNorm holds \(1.running_mean\)"):
        recalibrate_bn(model.eval(), [(torch.randn(8, 3, 8, 8),)])


def test_a_frozen_bn_is_kept_and_the_bn_after_it_recalibrated():
    # Refused as a hand-written BN: its statistics are fixed, and what it gives is what training saw.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBN(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    frozen = {k: v.clone() for k, v in model[1].state_dict().items()}
    result = recalibrate_bn(model, [(torch.randn(8, 3, 8, 8),)])
    assert result.changed == ["4"] and [(s.site, s.reason) for s in result.skipped] == [
        ("1", "a frozen BatchNorm (F.batch_norm with training=False): kept as it is")]
    assert all(torch.equal(frozen[k], v) for k, v in model[1].state_dict().items())


class HandWrittenNoAffine(nn.Module):  # buffers only, like a frozen BN, but trained: training=self.training
    def __init__(self, features):
        super().__init__()
        self.register_buffer("running_mean", torch.full((features,), 5.0))
        self.register_buffer("running_var", torch.full((features,), 9.0))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training, 0.1, 1e-5)


def test_a_hand_written_bn_without_parameters_is_refused_not_taken_for_frozen():
    # Owning no parameter, it was kept as "frozen" and its stale statistics fed the BN after it.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), HandWrittenNoAffine(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UserError, match=r"no nn.BatchNorm holds \(1.running_mean\)"):
        recalibrate_bn(model.eval(), [(torch.randn(8, 3, 8, 8),)])
