"""Helpers shared by the tests. One home for each idea (randomize_bn lives here only)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics and affine parameters: a fresh BN is almost the identity, so a broken
    fold would pass against it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            if bn.running_mean is not None:
                bn.running_mean.normal_(generator=gen)
                bn.running_var.uniform_(0.5, 2.0, generator=gen)  # positive and away from zero
            if bn.affine:
                bn.weight.normal_(generator=gen)
                bn.bias.normal_(generator=gen)
    return model.eval()


# What bngraph promises of a resumed run: bit-identical on the CPU as it is; on CUDA with
# deterministic algorithms (--deterministic), since cuDNN's weight gradients may accumulate with
# atomics. Tests that compare two runs bit for bit ask for what this machine needs.
DETERMINISTIC_FOR_EXACTNESS = torch.cuda.is_available()
