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


def overridden(argv, extra) -> list:
    """`argv` and then `extra`, each option of `extra` first taken out of `argv` with its value:
    the CLI refuses an option given twice, where the last one used to win."""
    given = {a for a in extra if isinstance(a, str) and a.startswith("--")}
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in given:
            value = argv[i + 1] if i + 1 < len(argv) else None
            skip = value is not None and not (isinstance(value, str) and value.startswith("--"))
            continue
        kept.append(arg)
    return [*kept, *extra]
