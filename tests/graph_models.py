"""A residual net whose BatchNorms go three ways when folded, for tests/test_graph_cli.py.

Loaded by file path, as users name their models: `tests/graph_models.py:ResidualNet`.
"""

import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)  # folds into conv1
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)  # folds into conv2
        self.bn_skip = nn.BatchNorm2d(channels)  # between a pool and an add: becomes a multiply-add
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.bn_skip(x)
        return self.act(out)


class ResidualNet(nn.Module):
    example_input_shape = (2, 3, 12, 12)

    def __init__(self):
        super().__init__()
        self.bn_input = nn.BatchNorm2d(3)  # on the input, before a padded conv: a multiply-add
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.b1 = Block(8)
        self.b2 = Block(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.stem(self.bn_input(x))))
        x = self.b2(self.b1(x))
        return self.head(x.mean((2, 3)))
