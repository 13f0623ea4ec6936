import torch
from torch import nn

from bngraph.passes.drop_bias_before_bn import drop_bias_before_bn
from bngraph.trace import trace
from tests.util import randomize_bn


class ConvBn(nn.Module):
    def __init__(self, share_output=False):
        super().__init__()
        self.conv, self.bn, self.share_output = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), share_output

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + (y if self.share_output else 0)


def test_drops_bias_and_keeps_the_function_in_both_modes():
    model = randomize_bn(ConvBn())
    x = torch.randn(4, 3, 8, 8)
    gm = trace(model, [x])
    result = drop_bias_before_bn(gm)
    assert result.changed == ["bn"] and gm.conv.bias is None
    for train in (False, True):
        model.train(train), gm.train(train)
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_skips_a_conv_whose_output_has_another_user():
    gm = trace(ConvBn(share_output=True), [torch.randn(2, 3, 8, 8)])
    result = drop_bias_before_bn(gm)
    assert result.changed == [] and gm.conv.bias is not None
    assert "also feeds" in result.skipped[0].reason


def test_skips_a_bn_over_another_axis_than_the_linear_features():
    class SeqBn(nn.Module):  # BatchNorm1d(T) on a Linear's (N, T, C) output: axis 1 is time
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.fc(x))

    gm = trace(SeqBn(), [torch.randn(2, 5, 5)])
    result = drop_bias_before_bn(gm)
    assert result.changed == [] and gm.fc.bias is not None
    assert "another axis" in result.skipped[0].reason


def test_does_nothing_where_there_is_no_bias():
    model = ConvBn()
    model.conv.bias = None
    result = drop_bias_before_bn(trace(model, [torch.randn(2, 3, 8, 8)]))
    assert result.changed == [] and result.skipped == []
