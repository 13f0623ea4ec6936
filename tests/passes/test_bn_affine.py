"""_bn_affine: the fold algebra on tensors, and the torch.nn.utils.fusion trap it works around."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bngraph.passes._bn_affine import BatchNormStats, fold_into_producer, regroup, scale_shift
from tests.util import randomize_bn


def _stats(bn: nn.modules.batchnorm._BatchNorm) -> BatchNormStats:
    return BatchNormStats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def test_scale_shift_is_the_eval_batch_norm():
    bn = randomize_bn(nn.BatchNorm2d(5, eps=0.01))
    x = torch.randn(2, 5, 3, 3)
    scale, shift = scale_shift(_stats(bn))
    assert scale.dtype == shift.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(x * scale.float()[:, None, None] + shift.float()[:, None, None], bn(x))


def test_regroup_swaps_the_channel_axes_per_group_and_is_its_own_inverse():
    weight = torch.arange(6 * 2 * 3).reshape(6, 2, 3)  # (A=6, B/groups=2, k) with 3 groups: B = 6
    swapped = regroup(weight, 3)
    assert swapped.shape == (6, 2, 3)
    # Group g's entry (a, b) is at row g*2 + b, column a - g*2 afterwards.
    assert torch.equal(swapped[2 * 1 + 1, 0], weight[2 * 1 + 0, 1])
    assert torch.equal(regroup(swapped, 3), weight)


def test_torch_transpose_flag_is_wrong_for_groups_and_ours_is_right():
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2).eval()
    bn = randomize_bn(nn.BatchNorm2d(6))
    with pytest.raises(RuntimeError):  # torch scales weight axis 1, of out/groups = 3 channels
        fuse_conv_bn_eval(conv, bn, transpose=True)
    weight, bias = fold_into_producer("conv_transpose", conv.weight, conv.bias, 2, _stats(bn))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(F.conv_transpose2d(x, weight, bias, groups=2), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_folds_in_float64_and_keeps_each_dtype():
    linear = nn.Linear(8, 4, bias=False).half()
    bn = randomize_bn(nn.BatchNorm1d(4))
    weight, bias = fold_into_producer("linear", linear.weight, None, 1, _stats(bn))
    assert weight.dtype == bias.dtype == torch.float16
    scale, shift = scale_shift(_stats(bn))
    exact = linear.weight.double() * scale[:, None]
    # One rounding to half, nothing more: the product was formed in float64.
    assert torch.equal(weight, exact.half()) and torch.equal(bias, shift.half())
