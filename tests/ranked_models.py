"""Models for tests/test_distributed.py, loaded by file path the way users name theirs.

Small enough that a few torchrun launches fit in a test run, with the state a resume restores.
"""

import os

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
