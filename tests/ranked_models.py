"""Models for tests/test_distributed.py, loaded by file path the way users name theirs.

Small enough that a few torchrun launches fit in a test run, with the state a resume restores.
"""

import os

import torch
from torch import nn


class SmallConvNet(nn.Module):
    """Both kinds of BatchNorm, both before the dropout (so one step's running statistics do not
    depend on dropout's draws), and dropout for the RNG state a resume must restore."""

    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 4, 5, stride=3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
            nn.Linear(4 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10),
        )

    def forward(self, x):
        return self.layers(x)


class FailsOnRank1(SmallConvNet):
    """Raises in its third training step on rank 1 only: one rank of a job failing mid-run."""

    def __init__(self):
        super().__init__()
        self.training_calls = 0

    def forward(self, x):
        if self.training and os.environ.get("RANK") == "1":
            self.training_calls += 1
            if self.training_calls == 3:
                raise RuntimeError("rank 1 fails in its third step")
        return super().forward(x)


class EvalOnlyHead(SmallConvNet):
    """A second head run in eval mode only (a deployment calibration head): its parameters get no
    gradient in training, which DDP takes for a rank that fell behind."""

    def __init__(self):
        super().__init__()
        self.calibrated = nn.Linear(10, 10)

    def forward(self, x):
        logits = self.layers(x)
        return logits if self.training else self.calibrated(logits)


class FirstStepDiffersOnRank1(SmallConvNet):
    """Skips its extra layer in rank 1's first training forward only (the probe DDP's wrapping
    runs), as a LayerDrop model may: the ranks' probes disagree."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(10, 10)
        self.forwards = 0

    def forward(self, x):
        logits = self.layers(x)
        if self.training:
            self.forwards += 1
            if os.environ.get("RANK") == "1" and self.forwards == 1:
                return logits
        return logits + self.extra(logits)


class HalvesNormalizedApart(SmallConvNet):
    """Normalizes each half of a training batch on its own (SimCLR's two views): a batch of two
    gives halves of one, which BatchNorm1d refuses in train mode."""

    def forward(self, x):
        if not self.training:
            return self.layers(x)
        half = len(x) // 2
        return torch.cat([self.layers(x[:half]), self.layers(x[half:])])
