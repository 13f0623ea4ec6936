"""The paper's Inception variant (appendix, Figure 5), without BatchNorm.

GoogLeNet with each 5x5 convolution replaced by two stacked 3x3 convolutions, ReLU, a separable
7x7 stem, GoogLeNet's local response normalization and 40% dropout before the classifier. BN,
the sigmoid variant and the Sec. 4.2.1 changes come from passes, not from copies of this file.
`inception-small` is the same module structure at a quarter of the width for 28x28x1 inputs.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from bngraph.zoo.registry import register_model


@dataclass(frozen=True)
class MixedSpec:
    """One row of the layer table: #1x1 | #3x3 reduce, #3x3 | double reduce, double #3x3 | pool."""

    c1x1: int
    c3x3_reduce: int
    c3x3: int
    dbl_reduce: int
    dbl_3x3: int
    pool: str  # "avg" or "max"
    proj: int  # 0: the pool output passes through unchanged
    stride: int = 1


PAPER_TABLE: dict[str, MixedSpec] = {
    "3a": MixedSpec(64, 64, 64, 64, 96, "avg", 32),
    "3b": MixedSpec(64, 64, 96, 64, 96, "avg", 64),
    "3c": MixedSpec(0, 128, 160, 64, 96, "max", 0, stride=2),
    "4a": MixedSpec(224, 64, 96, 96, 128, "avg", 128),
    "4b": MixedSpec(192, 96, 128, 96, 128, "avg", 128),
    "4c": MixedSpec(160, 128, 160, 128, 160, "avg", 128),
    "4d": MixedSpec(96, 128, 192, 160, 192, "avg", 128),
    "4e": MixedSpec(0, 128, 192, 192, 256, "max", 0, stride=2),
    "5a": MixedSpec(352, 192, 320, 160, 224, "avg", 128),
    "5b": MixedSpec(352, 192, 320, 192, 224, "max", 128),
}


def conv_act(cin: int, cout: int, kernel: int, stride: int = 1, act_layer=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2),
            act=act_layer(),
        )
    )


class Mixed(nn.Module):
    """An Inception module: four branches concatenated on the channel axis."""

    def __init__(self, cin: int, spec: MixedSpec, act_layer=nn.ReLU):
        super().__init__()
        s = spec.stride
        self.branch1x1 = conv_act(cin, spec.c1x1, 1, act_layer=act_layer) if spec.c1x1 else None
        self.branch3x3 = nn.Sequential(
            conv_act(cin, spec.c3x3_reduce, 1, act_layer=act_layer),
            conv_act(spec.c3x3_reduce, spec.c3x3, 3, stride=s, act_layer=act_layer),
        )
        # The 5x5 of GoogLeNet as two 3x3s; the second carries the module's stride.
        self.branch_dbl = nn.Sequential(
            conv_act(cin, spec.dbl_reduce, 1, act_layer=act_layer),
            conv_act(spec.dbl_reduce, spec.dbl_3x3, 3, act_layer=act_layer),
            conv_act(spec.dbl_3x3, spec.dbl_3x3, 3, stride=s, act_layer=act_layer),
        )
        pool = nn.AvgPool2d if spec.pool == "avg" else nn.MaxPool2d
        layers = [pool(3, stride=s, padding=1)]
        if spec.proj:
            layers.append(conv_act(cin, spec.proj, 1, act_layer=act_layer))
        self.branch_pool = nn.Sequential(*layers)
        self.out_channels = spec.c1x1 + spec.c3x3 + spec.dbl_3x3 + (spec.proj or cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch3x3(x), self.branch_dbl(x), self.branch_pool(x)]
        if self.branch1x1 is not None:
            branches.insert(0, self.branch1x1(x))
        return torch.cat(branches, dim=1)


def _scaled(spec: MixedSpec, width: float) -> MixedSpec:
    return MixedSpec(
        *(round(getattr(spec, f) * width) for f in ("c1x1", "c3x3_reduce", "c3x3", "dbl_reduce", "dbl_3x3")),
        pool=spec.pool,
        proj=round(spec.proj * width),
        stride=spec.stride,
    )


class Inception(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        stem_stride: int = 2,
        act_layer=nn.ReLU,
        dropout: float = 0.4,
    ):
        super().__init__()
        w = lambda c: round(c * width)  # noqa: E731
        depthwise = in_channels * 8  # "separable, depth multiplier 8"
        self.stem = nn.Sequential(
            OrderedDict(
                conv1_depthwise=nn.Conv2d(
                    in_channels, depthwise, 7, stride=stem_stride, padding=3, groups=in_channels
                ),
                conv1=conv_act(depthwise, w(64), 1, act_layer=act_layer),
                pool1=nn.MaxPool2d(3, stride=2, padding=1),
                lrn1=nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75),
                conv2_reduce=conv_act(w(64), w(64), 1, act_layer=act_layer),
                conv2=conv_act(w(64), w(192), 3, act_layer=act_layer),
                lrn2=nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75),
                pool2=nn.MaxPool2d(3, stride=2, padding=1),
            )
        )
        blocks, cin = [], w(192)
        for name, spec in PAPER_TABLE.items():
            block = Mixed(cin, _scaled(spec, width), act_layer=act_layer)
            blocks.append((f"mixed_{name}", block))
            cin = block.out_channels
        self.blocks = nn.Sequential(OrderedDict(blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


@register_model("inception", input_shape=(2, 3, 224, 224))
def inception(**kwargs) -> nn.Module:
    """The paper's Inception variant for 224x224 ImageNet, without BN (appendix, Figure 5)."""
    return Inception(**kwargs)


@register_model("inception-small", input_shape=(2, 1, 28, 28))
def inception_small(**kwargs) -> nn.Module:
    """The same Inception modules at 1/4 width for 28x28x1 images (MNIST), CPU-sized."""
    kwargs = {"num_classes": 10, "in_channels": 1, "width": 0.25, "stem_stride": 1, **kwargs}
    return Inception(**kwargs)
