"""Models that fail the way users' models fail, for tests/test_errors.py. Written as users write
them: the error is on a line of this file, which bngraph must name."""

import torch
from torch import nn


class ForwardRaises(nn.Module):
    """Traceable, but its forward multiplies by a matrix of the wrong shape."""

    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.fc(x.flatten(1)))
        return y @ torch.ones(3, 3)  # LINE: ForwardRaises


class UntraceableForwardRaises(nn.Module):
    """Data-dependent control flow (so torch.fx cannot trace it) and a forward that raises."""

    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        y = self.act(self.fc(x.flatten(1)))
        raise ValueError(f"features {y.shape[1]} are not what this model expects")  # LINE: UntraceableForwardRaises


class NoBatchNorm(nn.Module):
    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 32)
        self.act = nn.Sigmoid()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


class DataDependentSteps(nn.Module):
    """Loops as many times as a tensor's value says: torch.fx and torch.export both refuse it."""

    example_input_shape = (2, 4)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(int(x.abs().sum().item()) % 3 + 1):
            x = torch.relu(self.fc(x))
        return x
