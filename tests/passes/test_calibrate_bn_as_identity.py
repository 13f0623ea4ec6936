import torch
from torch import nn

from bngraph.passes.calibrate_bn_as_identity import CalibrateBnAsIdentity
from bngraph.trace import trace


def test_statistics_are_those_of_the_calibration_inputs_and_eval_is_identity():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU())
    gm = trace(model, [torch.randn(2, 6)])
    batches = [(torch.randn(32, 6) * 2 + 1,) for _ in range(3)]
    result = CalibrateBnAsIdentity(["1"], batches)(gm)
    assert result.changed == ["1"]
    features = torch.cat([model[0](b[0]) for b in batches]).double()
    bn = gm.get_submodule("1")
    torch.testing.assert_close(bn.running_mean, features.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, features.var(0, unbiased=True).float(), rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), torch.relu(model[0](x)), rtol=1e-5, atol=1e-6)


def test_skips_a_bn_without_affine_parameters():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, affine=False))
    gm = trace(model, [torch.randn(2, 6)])
    result = CalibrateBnAsIdentity(["1"], [(torch.randn(8, 6),)])(gm)
    assert result.changed == [] and "affine" in result.skipped[0].reason
