"""fold_bn_into_following_layer: a BN folds into the linear or unpadded conv after it, exactly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bngraph.passes.fold_bn_into_following_layer import fold_bn_into_following_layer
from tests.passes.fold_util import assert_matches, batch_norms_left, traced

Seq = nn.Sequential

PATTERNS = {
    "linear": (lambda: Seq(nn.BatchNorm1d(5), nn.Linear(5, 3)), (4, 5)),
    "linear_without_bias": (lambda: Seq(nn.BatchNorm1d(5), nn.Linear(5, 3, bias=False)), (4, 5)),
    "conv_padding_0": (lambda: Seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), (2, 3, 6, 6)),
    "conv_strided_dilated": (lambda: Seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, stride=2, dilation=2)), (2, 3, 9, 9)),
    "conv1d_without_bias": (lambda: Seq(nn.BatchNorm1d(3), nn.Conv1d(3, 4, 3, bias=False)), (2, 3, 8)),
    "conv3d": (lambda: Seq(nn.BatchNorm3d(2), nn.Conv3d(2, 3, 2)), (2, 2, 4, 4, 4)),
    "grouped": (lambda: Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)), (2, 4, 6, 6)),
    "depthwise": (lambda: Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, groups=4)), (2, 4, 6, 6)),
    "reflect": (lambda: Seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), (2, 3, 6, 6)),
    "replicate": (lambda: Seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=2, padding_mode="replicate")), (2, 3, 6, 6)),
    "circular": (lambda: Seq(nn.BatchNorm1d(3), nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular")), (2, 3, 7)),
    "bn_bn_linear": (lambda: Seq(nn.BatchNorm1d(5), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3)), (4, 5)),
    "eps_0.1": (lambda: Seq(nn.BatchNorm1d(5, eps=0.1), nn.Linear(5, 3)), (4, 5)),
}


@pytest.mark.parametrize("name", PATTERNS)
def test_folds_pattern_exactly(name):
    build, shape = PATTERNS[name]
    model, gm, x = traced(build(), shape)
    result = fold_bn_into_following_layer(gm)
    assert result.skipped == [] and batch_norms_left(gm) == [] and result.changed
    assert_matches(gm, model, x)


def test_zero_padding_is_refused():
    model, gm, x = traced(Seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), (2, 3, 6, 6))
    result = fold_bn_into_following_layer(gm)
    assert result.changed == [] and batch_norms_left(gm) == ["_0"]
    assert result.skipped[0].reason == "1 pads with zeros, where the BN would have put its shift: the border would differ"


def test_same_padding_with_a_1x1_kernel_pads_nothing_and_folds():
    model, gm, x = traced(Seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1, padding="same")), (2, 3, 5, 5))
    assert fold_bn_into_following_layer(gm).changed == ["_0"]
    assert_matches(gm, model, x)


def test_transposed_conv_is_refused():
    model, gm, x = traced(Seq(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3)), (2, 3, 5, 5))
    result = fold_bn_into_following_layer(gm)
    assert result.changed == [] and "transposed conv" in result.skipped[0].reason


class Channels(nn.Module):
    """BatchNorm1d over (N, C, L), then a Linear over C behind a transpose (or directly, over L)."""

    def __init__(self, through_transpose: bool, channels: int = 5, length: int = 5):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(channels), nn.Linear(channels if through_transpose else length, 3)
        self.through_transpose = through_transpose

    def forward(self, x):
        y = self.bn(x)
        return self.fc(y.transpose(1, 2) if self.through_transpose else y)


def test_follows_the_channel_axis_through_a_transpose():
    model, gm, x = traced(Channels(through_transpose=True), (2, 5, 7))
    assert fold_bn_into_following_layer(gm).changed == ["bn"]
    assert_matches(gm, model, x)


def test_equal_sizes_never_fold_onto_the_wrong_axis():
    # BN over C of (N, C=5, L=5) and a Linear over L: sizes match, axes do not.
    model, gm, x = traced(Channels(through_transpose=False), (2, 5, 5))
    result = fold_bn_into_following_layer(gm)
    assert result.changed == [] and "normalizes axis 1 of the (2, 5, 5) input of fc" in result.skipped[0].reason


def test_output_with_two_users_is_refused():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.bn(x)
            return self.fc(y) + y

    model, gm, x = traced(Fork(), (3, 4))
    result = fold_bn_into_following_layer(gm)
    assert result.changed == [] and result.skipped[0].reason == "its output feeds 2 ops (fc, add), not one layer"


def test_model_output_is_refused():
    model, gm, x = traced(Seq(nn.Linear(3, 4), nn.BatchNorm1d(4)), (3, 3))
    result = fold_bn_into_following_layer(gm)
    assert result.changed == [] and result.skipped[0].reason == "its output goes to the model's output, not a conv or linear"


def test_bn_feeding_a_weight_is_refused():
    class AsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return F.linear(x, self.bn(x))

    model, gm, x = traced(AsWeight(), (4, 4))
    result = fold_bn_into_following_layer(gm)
    assert result.changed == [] and "the weight of linear is computed by bn" in result.skipped[0].reason


def test_functional_consumers_fold():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm1d(4)
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.fc_w, self.fc_b = nn.Parameter(torch.randn(2, 4)), nn.Parameter(torch.randn(2))

        def forward(self, x):
            y = F.conv2d(self.bn1(x), self.w).mean((2, 3))
            return F.linear(self.bn2(y), self.fc_w, self.fc_b)

    model, gm, x = traced(Functional(), (2, 3, 5, 5))
    assert sorted(fold_bn_into_following_layer(gm).changed) == ["bn1", "bn2"]
    assert batch_norms_left(gm) == []
    assert_matches(gm, model, x)


def test_shared_consumer_folds_into_a_copy():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.bn(x)) + self.fc(x)

    model, gm, x = traced(Shared(), (3, 4))
    result = fold_bn_into_following_layer(gm)
    assert result.changed == ["bn"] and result.details[0]["note"] == "folded into a copy of fc, whose weights fc_1 also uses"
    assert_matches(gm, model, x)


def test_does_nothing_without_batchnorm():
    model, gm, x = traced(Seq(nn.Linear(3, 4), nn.ReLU()), (3, 3))
    result = fold_bn_into_following_layer(gm)
    assert result.changed == [] and result.skipped == []
