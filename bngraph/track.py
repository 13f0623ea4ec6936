"""The inputs of chosen nonlinearities over training: the paper's Figure 1(b, c) for any model.

At each evaluation, `InputTracker` records the 15th, 50th and 85th percentiles of one feature of
each chosen nonlinearity's input over the test set. Sec. 4.1 shows them for a sigmoid of the
MNIST net's last hidden layer: without BN they drift, with BN they stay put.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from bngraph.errors import UserError

QUANTILES = (0.15, 0.50, 0.85)  # Figure 1(b, c)
_MAX_VALUES_PER_BATCH = 65536  # per module and evaluation batch; a conv map is subsampled


def nonlinearity_names(model: nn.Module) -> list[str]:
    from bngraph.passes.op_kinds import ACTIVATION_MODULES

    return [name for name, m in model.named_modules() if isinstance(m, ACTIVATION_MODULES)]


class InputTracker:
    """The QUANTILES of feature `unit` of each chosen nonlinearity's input, over an evaluation.

    A conv activation's feature is a channel: its values at every position of every image are
    pooled, as BN pools them (Sec. 3.2). Only module nonlinearities can be hooked; `insert`
    keeps the model's own modules, so zoo models and most user models have them.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], unit: int = 0):
        available = nonlinearity_names(model)
        if not available:
            raise UserError("--track-inputs: the model has no nonlinearity modules to hook")
        self.names = list(names) or [available[-1]]
        unknown = [n for n in self.names if n not in available]
        if unknown:
            shown = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
            raise UserError(f"--track-inputs: no nonlinearity module {unknown[0]!r}; the model has {shown}")
        self.model, self.unit = model, unit
        self._values: dict[str, list[torch.Tensor]] = {}
        self._handles = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self._values = {name: [] for name in self.names}
        for name in self.names:
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._hook(name)))
        try:
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def _hook(self, name: str):
        def record(module, args):
            x = args[0]
            if x.dim() < 2 or not 0 <= self.unit < x.shape[1]:
                raise UserError(f"--track-unit {self.unit}: {name}'s input has shape {tuple(x.shape)}")
            values = x[:, self.unit].detach().float().flatten()
            stride = -(-values.numel() // _MAX_VALUES_PER_BATCH)
            self._values[name].append(values[::stride].cpu())

        return record

    def quantiles(self) -> dict[str, list[float]]:
        q = torch.tensor(QUANTILES)
        return {name: torch.quantile(torch.cat(v), q).tolist() for name, v in self._values.items() if v}
