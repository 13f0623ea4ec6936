"""Architectures that are not in the zoo, each with the insertion sites it must get.

`EXPECTED` maps node name -> (norm, features, bias_removed). Kept importable by file path only
(tests load it as `tests/models.py:Name`, the way users name their models).
"""

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    example_input_shape = (2, 8, 6, 6)
    EXPECTED = {"relu": ("BatchNorm2d", 8, True), "relu_1": ("BatchNorm2d", 8, False)}

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        return F.relu(self.conv2(y) + x)  # conv2 feeds an add: its bias stays


class SharedActivation(nn.Module):
    example_input_shape = (2, 10)
    EXPECTED = {"act": ("BatchNorm1d", 16, True), "act_1": ("BatchNorm1d", 4, True)}

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(10, 16), nn.Linear(16, 4), nn.ReLU()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))  # one module, two sites


class GroupedConvs(nn.Module):
    example_input_shape = (2, 8, 7, 7)
    EXPECTED = {
        "dw_act": ("BatchNorm2d", 8, True),
        "grouped_act": ("BatchNorm2d", 12, True),
        "pw_act": ("BatchNorm2d", 6, True),
    }

    def __init__(self):
        super().__init__()
        self.dw, self.dw_act = nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU6()
        self.grouped, self.grouped_act = nn.Conv2d(8, 12, 3, groups=4), nn.Hardswish()
        self.pw, self.pw_act = nn.Conv2d(12, 6, 1), nn.ELU()

    def forward(self, x):
        return self.pw_act(self.pw(self.grouped_act(self.grouped(self.dw_act(self.dw(x))))))


class Convs1d3d(nn.Module):
    example_input_shape = (2, 3, 4, 6, 6)
    EXPECTED = {"act3d": ("BatchNorm3d", 5, True), "act1d": ("BatchNorm1d", 7, True)}

    def __init__(self):
        super().__init__()
        self.c3, self.act3d = nn.Conv3d(3, 5, 3, padding=1), nn.SiLU()
        self.c1, self.act1d = nn.Conv1d(5, 7, 3), nn.Tanh()

    def forward(self, x):
        y = self.act3d(self.c3(x))  # (N, 5, 4, 6, 6)
        return self.act1d(self.c1(y.flatten(2)))  # (N, 5, 144) -> (N, 7, 142)


class TransposedConv(nn.Module):
    example_input_shape = (2, 4, 5, 5)
    EXPECTED = {"act": ("BatchNorm2d", 6, True), "act_1": ("BatchNorm2d", 2, True)}

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        self.up2 = nn.ConvTranspose2d(6, 2, 2)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.up2(self.act(self.up(x))))


class Sequence3d(nn.Module):
    """Linear on (N, T, C): features in the last axis, T != C and T == C."""

    example_input_shape = (2, 5, 12)
    EXPECTED = {"act": ("BatchNorm1d", 9, True), "act2": ("BatchNorm1d", 5, True)}

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(12, 9), nn.Mish()
        self.fc2, self.act2 = nn.Linear(9, 5), nn.Softplus()  # output (N, 5, 5): C equals T

    def forward(self, x):
        return self.act2(self.fc2(self.act(self.fc(x))))


class Branches(nn.Module):
    example_input_shape = (2, 3, 8, 8)
    EXPECTED = {"relu": ("BatchNorm2d", 4, True), "relu_1": ("BatchNorm2d", 6, True), "relu_2": ("BatchNorm2d", 10, False)}

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return torch.relu(y)  # input from a concat: a BatchNorm, but no bias to drop


class AlreadyNormalized(nn.Module):
    example_input_shape = (2, 3, 8, 8)
    EXPECTED = {}
    SKIPPED = {"relu", "gelu", "silu", "relu_1", "sigmoid"}

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.gn, self.ln = nn.GroupNorm(2, 4), nn.LayerNorm(36)
        self.drop = nn.Dropout(0.1)
        self.inorm = nn.InstanceNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.silu(self.gn(y))
        z = F.gelu(self.ln(y.flatten(2)))  # (N, 4, 36), LayerNorm over the last axis
        w = F.relu(self.drop(self.bn(self.conv(x))))  # behind a Dropout
        v = torch.sigmoid(self.inorm(y).flatten(1))  # behind a reshape
        return z.sum() + w.sum() + v.sum()


class MethodsAndFunctions(nn.Module):
    example_input_shape = (2, 6)
    EXPECTED = {
        "relu": ("BatchNorm1d", 8, True),
        "sigmoid": ("BatchNorm1d", 8, True),
        "tanh": ("BatchNorm1d", 8, True),
        "leaky_relu": ("BatchNorm1d", 8, True),
        "gelu": ("BatchNorm1d", 8, True),
    }

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(6 if i == 0 else 8, 8) for i in range(5))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.fcs[0](x).relu()
        x = torch.sigmoid(self.fcs[1](x))
        x = self.fcs[2](x).tanh()
        x = F.leaky_relu(self.fcs[3](x), 0.2)
        x = F.gelu(self.fcs[4](x))
        return F.softmax(self.out(x), dim=-1)  # softmax mixes features: not a nonlinearity here


class SharedOutput(nn.Module):
    """A conv output used twice: BN for the activation, the bias stays for the other use."""

    example_input_shape = (2, 3, 6, 6)
    EXPECTED = {"relu": ("BatchNorm2d", 5, False)}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) + y


class LinearToMaps(nn.Module):
    """A decoder's stem: a Linear's C*H*W outputs viewed as (N, C, H, W) maps. Its BN sits on the
    flattened features (one per output of the Linear), written flatten, BN, unflatten."""

    example_input_shape = (4, 6)
    EXPECTED = {"elu": ("BatchNorm1d", 12, False)}  # the bias stays: not proven redundant through the view

    def __init__(self):
        super().__init__()
        self.fc, self.conv = nn.Linear(6, 3 * 2 * 2), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(F.elu(self.fc(x).view(-1, 3, 2, 2)))


class GateAfterReLU(nn.Module):
    """A sigmoid gate on a ReLU's output, scaled: the ReLU's input is normalized, the sigmoid's
    is not (the scale after it makes no composite of the two)."""

    example_input_shape = (2, 3, 6, 6)
    EXPECTED = {"sigmoid": ("BatchNorm2d", 4, False)}

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.out(torch.sigmoid(h) * 2.0)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    example_input_shape = (4, 6)

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(6, 8), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(8, 8), nn.Tanh()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.act1(self.fc1(x))
        if y.sum() > 0:
            y = y * 2
        return self.head(self.act2(self.fc2(y)))


TRACEABLE = [
    Residual, SharedActivation, GroupedConvs, Convs1d3d, TransposedConv, Sequence3d, Branches,
    AlreadyNormalized, MethodsAndFunctions, SharedOutput, LinearToMaps, GateAfterReLU,
]
