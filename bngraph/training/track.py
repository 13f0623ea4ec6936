"""The inputs of chosen nonlinearities over training: the paper's Figure 1(b, c) for any model.

At each evaluation, `InputTracker` records the 15th, 50th and 85th percentiles of one feature of
each chosen nonlinearity's input over the test set. Sec. 4.1 shows them for a sigmoid of the
MNIST net's last hidden layer: without BN they drift, with BN they stay put.

A nonlinearity is a module (`act3`, hooked) or a call of a function or method (`F.relu(x)`,
`x.sigmoid()`), seen by a TorchFunctionMode during the tracked forward. A call is named as
torch.fx names nodes: the op, `_1`, `_2`... for its later calls, after the path of the module
whose forward makes it: `sigmoid` in the model's own forward, `block.relu_1` in `block`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from bngraph.errors import UserError
from bngraph.passes._dataflow import NONLINEARITIES, op_name
from bngraph.passes._op_kinds import ACTIVATION_MODULES
from bngraph.runners import fresh_inputs

QUANTILES = (0.15, 0.50, 0.85)  # Figure 1(b, c)
_MAX_VALUES_PER_BATCH = 65536  # per module and evaluation batch; a conv map is subsampled


def nonlinearity_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ACTIVATION_MODULES)]


class _FunctionalCalls(TorchFunctionMode):
    """Names each nonlinearity called as a function outside activation modules, and hands the
    input of the wanted ones to `record(name, tensor)`."""

    def __init__(self, model: nn.Module, record):
        super().__init__()
        self.paths = {id(m): p for p, m in reversed(list(model.named_modules(remove_duplicate=False)))}
        self.activation_modules = ACTIVATION_MODULES
        self.record = record
        self.frames: list[tuple[str, nn.Module, dict[str, int]]] = []  # (path, module, calls per op)
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if name in NONLINEARITIES and self.frames and not isinstance(self.frames[-1][1], self.activation_modules):
            path, _, counts = self.frames[-1]
            k = counts.get(name, 0)
            counts[name] = k + 1
            full = (f"{path}." if path else "") + name + (f"_{k}" if k else "")
            if full not in self.seen:
                self.seen.append(full)
            x = args[0] if args else (kwargs or {}).get("input")
            if isinstance(x, torch.Tensor):
                self.record(full, x)  # before the call: an in-place form would change it
        return func(*args, **(kwargs or {}))

    def pre_hook(self, module, args):
        path = self.paths.get(id(module))
        if path is not None:
            self.frames.append((path, module, {}))

    def hook(self, module, args, output):
        if self.paths.get(id(module)) is not None and self.frames:
            self.frames.pop()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handles = [register_module_forward_pre_hook(self.pre_hook), register_module_forward_hook(self.hook)]
        try:
            with self:
                yield
        finally:
            for h in handles:
                h.remove()


def functional_nonlinearity_names(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """The names of the nonlinearities `model` calls as functions, in the order it calls them
    (one eval-mode forward on `example_inputs`, without gradients)."""
    calls = _FunctionalCalls(model, lambda name, x: None)
    was_training = model.training
    try:
        with torch.no_grad(), calls.active():
            model.eval()(*fresh_inputs(example_inputs))
    finally:
        model.train(was_training)
    return calls.seen


# Layers whose output holds its features in the last axis ((N, T, C) after a Linear), and those
# that hand on their input's layout; any other layer's are in axis 1, as a conv's and a BN's.
_LAST_AXIS_LAYERS = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding)
_SAME_LAYOUT = (nn.Dropout, nn.Identity, *ACTIVATION_MODULES)


class _MadeBy:
    """Which module made each tensor of one forward, to tell the axis of its features."""

    def __init__(self):
        self.made: dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = {}

    def hook(self, module, args, output):
        if isinstance(output, torch.Tensor):  # the tensors kept alive: an id is not reused
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self.made.setdefault(id(output), (module, output, source))  # the innermost: a Sequential's is its last layer's

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handle = register_module_forward_hook(self.hook)
        try:
            yield
        finally:
            handle.remove()

    def feature_axis(self, x: torch.Tensor) -> int:
        """-1 for the output of a Linear (or a BN insert put over the last axis), through
        dropouts and activations; 1 otherwise."""
        while id(x) in self.made:
            module, _, source = self.made[id(x)]
            if isinstance(module, _LAST_AXIS_LAYERS) or type(module).__name__.endswith("LastAxisBatchNorm"):
                return -1 if x.dim() > 2 else 1
            if not isinstance(module, _SAME_LAYOUT) or source is None:
                return 1
            x = source
        return 1


class InputTracker:
    """The QUANTILES of feature `unit` of each chosen nonlinearity's input, over an evaluation.

    A conv activation's feature is a channel: its values at every position of every image are
    pooled, as BN pools them (Sec. 3.2). A feature is axis 1 of the input, but the last axis of
    an (N, T, C) input a Linear made (`_MadeBy`, on `example_inputs`). Nonlinearities called as functions are found by
    running the model once on `example_inputs`; without them, only modules can be chosen.
    """

    def __init__(
        self, model: nn.Module, names: Sequence[str], unit: int = 0, example_inputs: Sequence[torch.Tensor] | None = None
    ):
        modules = nonlinearity_names(model)
        functional = functional_nonlinearity_names(model, example_inputs) if example_inputs is not None else []
        available = modules + functional
        if not available:
            raise UserError("--track-inputs: the model has no nonlinearity modules to hook"
                            + (", nor nonlinearities called as functions" if example_inputs is not None else ""))
        self.names = list(names) or [modules[-1] if modules else available[-1]]
        unknown = [n for n in self.names if n not in available]
        if unknown:
            shown = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
            raise UserError(
                f"--track-inputs: no nonlinearity module {unknown[0]!r} (nor a nonlinearity call of that name); "
                f"the model has {shown}"
            )
        self.model, self.unit = model, unit
        self.hooked = [n for n in self.names if n in modules]
        self.functional = [n for n in self.names if n not in modules]
        self._values: dict[str, list[torch.Tensor]] = {}
        self._handles = []
        self._made_by: _MadeBy | None = None
        self.axes: dict[str, int] = {}  # the features' axis of each input: 1, or -1 after a Linear
        if example_inputs is not None:  # a unit the input does not have fails now, not after training
            self._record_example(example_inputs)

    def _record_example(self, example_inputs: Sequence[torch.Tensor]) -> None:
        """Run the model once: which axis of each input holds the features (`_feature_axis`), and
        a unit the input does not have fails now, not after training."""
        was_training = self.model.training
        self.model.eval()  # the BNs' running statistics untouched
        made = _MadeBy()
        try:
            with torch.no_grad(), made.active(), self.recording(made):
                self.model(*example_inputs)
        finally:
            self.model.train(was_training)
            self._values = {}

    @contextlib.contextmanager
    def recording(self, made: _MadeBy | None = None) -> Iterator[None]:
        self._values = {name: [] for name in self.names}
        self._made_by = made
        for name in self.hooked:
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._hook(name)))
        calls = _FunctionalCalls(self.model, self._record) if self.functional else None
        try:
            with calls.active() if calls else contextlib.nullcontext():
                yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def _hook(self, name: str):
        def record(module, args):
            self._record(name, args[0])

        return record

    def _record(self, name: str, x: torch.Tensor) -> None:
        if name not in self._values:
            return
        if self._made_by is not None:
            self.axes[name] = self._made_by.feature_axis(x)
        axis = self.axes.get(name, 1)
        if x.dim() < 2 or not 0 <= self.unit < x.shape[axis]:
            raise UserError(f"--track-unit {self.unit}: {name}'s input has shape {tuple(x.shape)}")
        values = x.select(axis, self.unit).detach().float().flatten()
        stride = -(-values.numel() // _MAX_VALUES_PER_BATCH)
        # A copy: on the CPU these are views, and an in-place nonlinearity (x.sigmoid_()) would change them.
        self._values[name].append(values[::stride].cpu().clone())

    def quantiles(self) -> dict[str, list[float]]:
        q = torch.tensor(QUANTILES)
        return {name: torch.quantile(torch.cat(v), q).tolist() for name, v in self._values.items() if v}
