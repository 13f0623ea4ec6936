"""Models with BatchNorm for the export, verify and ONNX fold tests; the CLI loads them as
tests/onnx_models.py:NAME. Each builder seeds its weights, so two loads are the same model, and
randomizes the BN statistics: a fresh BN is almost the identity, so a broken fold would pass.
"""

import torch
from torch import nn

from tests.util import randomize_bn


class ConvBnNet(nn.Module):
    """A BN after a bias-free conv, after a grouped conv, after a pool (no layer to fold into)
    and after a linear: a classifier with 10 outputs."""

    example_input_shape = (2, 3, 12, 12)

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.pool, self.bn3 = nn.MaxPool2d(2), nn.BatchNorm2d(8)
        self.fc1, self.bn4 = nn.Linear(8 * 5 * 5, 16), nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.pool(x)).flatten(1)
        return self.fc2(torch.relu(self.bn4(self.fc1(x))))


class MlpBn(nn.Module):
    """The paper's MNIST net in small: 28x28 images, one BN'd sigmoid layer, 10 classes."""

    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(784, 32), nn.BatchNorm1d(32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.bn(self.fc1(x.flatten(1)))))


class ConvOutputShared(nn.Module):
    """A conv output that feeds the BN and an Add: folding into the conv would change the Add's input."""

    def __init__(self, cin: int = 3, cout: int = 4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def seeded(build, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build(), seed)


def conv_bn_net() -> nn.Module:
    return seeded(ConvBnNet)


def conv_bn_net_batch1() -> nn.Module:
    """The same net declaring a batch-1 example, which torch.export would specialize."""
    model = seeded(ConvBnNet)
    model.example_input_shape = (1, 3, 12, 12)
    return model


def conv_bn_net_perturbed() -> nn.Module:
    """The same net with one running mean moved: what a wrong fold looks like."""
    model = seeded(ConvBnNet)
    with torch.no_grad():
        model.bn4.running_mean[3] += 0.5
    return model


def mlp_bn_net() -> nn.Module:
    return seeded(MlpBn)
