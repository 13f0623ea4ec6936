"""What a model does when it runs: which op and which module produced each tensor it computed.

For models torch.fx cannot trace, this is the graph: run the model once on the example input
under a TorchFunctionMode (every torch function, method and operator call) with global module
hooks (which module call each value came out of), and keep, per tensor object, the op that
made it. A tensor mutated in place (`out += x`) gets a new producer, the in-place op; a mutation
the mode could not see (inside a scripted module) shows as a version-counter mismatch and makes
the producer unknown, never stale.

    record = record_run(model, example_inputs)
    record.module_calls   # every module call: path, module, input value, inner ops
    record.functional     # every nonlinearity called as a function outside an activation module
    record.read_outside   # a module's parameters and buffers that ops read outside its calls

It lives with the passes that decide by it (`wrap_activation_modules`,
`fold_bn_into_producer_module`); the trace fallback (`bngraph.partial_trace`) and `--track-inputs`
(`bngraph.training.track`) read it too. One module past 300 lines: the op tables, the recorder that names
ops by them and the questions asked of its record (`normalizer_of`, `feature_axis`) share one
vocabulary of op names, and split they would each import the others' tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from bngraph.passes._op_kinds import ACTIVATION_MODULES, NORM_MODULES
from bngraph.runners import fresh_inputs

# The elementwise nonlinearities as torch names them, in all three forms (F.relu, torch.relu,
# x.relu(), x.relu_()): the same set as _op_kinds' tables, by name, since the mode sees the name.
NONLINEARITIES = frozenset({
    "relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish",
    "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid", "softplus", "softsign", "logsigmoid",
    "tanhshrink", "softshrink", "hardshrink", "threshold",
})
# Pieces of nonlinearities written by hand (HuggingFace's gelu_python, NewGELU, QuickGELU).
_NONLINEAR_PARTS = NONLINEARITIES | {"erf", "exp", "log1p"}

_NAME_HINTS = ("relu", "gelu", "silu", "swish", "sigmoid", "tanh", "mish", "elu")

# Ops that keep every feature where it was: unary math, dtype casts, dropout, in-place forms.
_UNARY = frozenset({
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "clone", "contiguous", "to", "float", "double", "half", "bfloat16", "type_as", "detach",
    "neg", "__neg__", "abs", "exp", "log", "log1p", "sqrt", "rsqrt", "square", "reciprocal", "erf",
    "clamp", "clip", "pow", "__pow__", "__rpow__", "identity",
}) | NONLINEARITIES
_BINARY = frozenset({
    "add", "sub", "mul", "div", "true_divide", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
    "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__",
    "maximum", "minimum", "where",
})
ELEMENTWISE = _UNARY | _BINARY
# Ops whose output channels are their input's, in axis 1 (pooling, resizing).
_CHANNEL_KEEPING = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate", "upsample", "max_pool2d_with_indices",
})
# Ops that move values without changing them: a normalized tensor stays normalized through them.
_RELAYOUT = frozenset({
    "view", "reshape", "reshape_as", "view_as", "flatten", "unflatten", "permute", "transpose", "t",
    "squeeze", "unsqueeze", "contiguous",
})
_SHAPE_OF_SECOND = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})
_SHAPE_ONLY_READS = frozenset({"zeros_like", "ones_like", "empty_like", "full_like"})
# Layers: where their output features sit.
CHANNEL_LAYERS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
LAST_AXIS_LAYERS = frozenset({"linear", "bilinear", "addmm", "matmul", "__matmul__", "mm", "bmm", "embedding"})
# Of those, the ones that are a layer only where what they multiply by is a weight matrix (a
# tensor made from the model's parameters alone, 2-D), and the argument that holds it; a product
# of two computed tensors (attention scores) or with a vector is recorded as PRODUCT.
_WEIGHT_ARGUMENT = {"linear": 1, "matmul": 1, "__matmul__": 1, "mm": 1, "bmm": 1, "addmm": 2}
PRODUCT = "product"
CHANNEL_NORMS = frozenset({"batch_norm", "instance_norm", "group_norm"})
LAST_AXIS_NORMS = frozenset({"layer_norm", "rms_norm"})


def op_name(func) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name  # relu_ -> relu


@dataclass(eq=False)
class Value:
    """One tensor value the model computed: the op that made it and the values it read."""

    op: str  # torch's name for the op ("conv2d", "__iadd__"), or "input" / "unknown"
    inputs: tuple[Value, ...] = ()  # values of the tensor arguments shaped like the output
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    modules: list[str] = field(default_factory=list)  # module calls that returned it, innermost first
    module_types: list[type] = field(default_factory=list)
    uses: int = 0  # calls that read it after it was made
    relaid: Value | None = None  # for a re-layout op (view, permute...): the value it re-laid
    parameters: frozenset[int] = frozenset()  # ids of the nn.Parameters the op read (a layer's weight)
    data: bool = False  # computed from the model's inputs (else from parameters, buffers, constants)

    def where(self) -> str:
        if self.modules:
            return f"{self.modules[0]} ({self.module_types[0].__name__})"
        return f"{self.op}"


@dataclass(eq=False)
class ModuleCall:
    path: str
    module: nn.Module
    input: Value | None  # the first tensor argument's value, as it was when the call began
    ops: list[str] = field(default_factory=list)  # every op run inside it, nested modules included
    output: Value | None = None
    training: bool = False  # the module's mode when it was called (a forward may set it)
    within: tuple[str, ...] = ()  # the paths of the module calls running when it was called, outermost first


@dataclass(eq=False)
class FunctionalNonlinearity:
    op: str
    module: str  # the innermost module call it ran in ("" for the model's own forward)
    input: Value | None
    index: int  # position among all the nonlinearity calls of the run, for stable names


@dataclass
class RunRecord:
    module_calls: list[ModuleCall] = field(default_factory=list)
    functional: list[FunctionalNonlinearity] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    # Module path -> names of its own parameters and buffers an op read outside every call of it
    # (`self.bn.running_mean` or `self.conv.weight` used in the model's own forward).
    read_outside: dict[str, set[str]] = field(default_factory=dict)

    def calls_of(self, path: str) -> list[ModuleCall]:
        return [c for c in self.module_calls if c.path == path]



def _version(t: torch.Tensor) -> int | None:
    """How often `t` was written in place; None for a tensor made under torch.inference_mode(),
    which keeps no count (and cannot be written outside it)."""
    return None if t.is_inference() else t._version

class _Recorder(TorchFunctionMode):
    def __init__(self, paths: dict[int, str], constants: set[int], owners: dict[int, list[tuple[str, str]]]):
        super().__init__()
        self.paths = paths
        self.constants = constants  # ids of the model's parameters and buffers: never data
        self.owners = owners  # id of a parameter or buffer -> (module path, attribute) of each module holding it
        self.values: dict[int, tuple[torch.Tensor, int, Value]] = {}  # id -> (tensor kept alive, version, value)
        self.stack: list[ModuleCall] = []
        self.record = RunRecord()
        self.nonlinear_calls = 0

    def value_of(self, t: torch.Tensor) -> Value:
        entry = self.values.get(id(t))
        if entry is None:  # a parameter or buffer, else made where the mode could not see (taken as data)
            return Value("input", shape=tuple(t.shape), dtype=t.dtype, device=t.device, data=id(t) not in self.constants)
        kept, version, value = entry
        if kept is not t or version != _version(t):  # changed where the mode could not see it
            return Value("unknown", shape=tuple(t.shape), dtype=t.dtype, device=t.device, data=True)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        before = [self.value_of(t) for t in read]
        for t in read:
            self._note_outside_read(t)
        out = func(*args, **kwargs)
        made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not made:
            return out  # x.shape, x.dim(), x.size(0): reads no value
        name = op_name(func)
        for frame in self.stack:
            frame.ops.append(name)
        # Reads of values, not of shapes: x.reshape_as(y) and torch.zeros_like(y) do not read y's values.
        for value in before[:1] if name in _SHAPE_OF_SECOND else [] if name in _SHAPE_ONLY_READS else before:
            value.uses += 1
        if name in NONLINEARITIES and not self._inside_activation_module():
            where = self.stack[-1].path if self.stack else ""
            self.record.functional.append(
                FunctionalNonlinearity(name, where, before[0] if before else None, self.nonlinear_calls)
            )
        if name in NONLINEARITIES:
            self.nonlinear_calls += 1
        made_by = name
        if name in _WEIGHT_ARGUMENT and not self._multiplies_a_weight_matrix(args, kwargs, _WEIGHT_ARGUMENT[name]):
            made_by = PRODUCT
        for t in made:
            same_shape = tuple(v for v in before if v.shape == tuple(t.shape))
            value = Value(made_by, same_shape, tuple(t.shape), t.dtype, t.device, data=any(v.data for v in before))
            if (name in _RELAYOUT or name == "__getitem__" and _keeps_every_axis(args[1])) and before:
                value.relaid = before[0]
            if name in CHANNEL_LAYERS or name in LAST_AXIS_LAYERS:
                value.parameters = frozenset(id(t) for t in read if isinstance(t, nn.Parameter))
            self.values[id(t)] = (t, _version(t), value)
        return out

    def _multiplies_a_weight_matrix(self, args, kwargs, index: int) -> bool:
        weight = args[index] if len(args) > index else kwargs.get("weight", kwargs.get("mat2", kwargs.get("other")))
        return isinstance(weight, torch.Tensor) and weight.dim() == 2 and (
            isinstance(weight, nn.Parameter) or not self.value_of(weight).data)  # a layer held in a plain list too

    def _note_outside_read(self, t: torch.Tensor) -> None:
        owners = self.owners.get(id(t))
        if not owners:
            return
        running = {call.path for call in self.stack}
        if any(path in running for path, _ in owners):
            return  # a module computing with its own tensor, as its call does
        for path, attr in owners:
            self.record.read_outside.setdefault(path, set()).add(attr)

    def _inside_activation_module(self) -> bool:
        return bool(self.stack) and isinstance(self.stack[-1].module, ACTIVATION_MODULES)

    def pre_hook(self, module, args):
        path = self.paths.get(id(module))
        if path is None:
            return
        first = next((t for t in tree_leaves(args) if isinstance(t, torch.Tensor)), None)
        value = self.value_of(first) if first is not None else None
        call = ModuleCall(path, module, value, training=module.training, within=tuple(c.path for c in self.stack))
        self.stack.append(call)
        self.record.module_calls.append(call)

    def hook(self, module, args, output):
        if self.paths.get(id(module)) is None or not self.stack:
            return
        call = self.stack.pop()
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor):
                value = self.value_of(t)
                if value.op not in ("input", "unknown"):
                    value.modules.append(call.path)
                    value.module_types.append(type(module))
                call.output = call.output or value


def record_run(model: nn.Module, example_inputs: Sequence, *, training: bool = False) -> RunRecord:
    """Run `model` once (in eval mode unless `training`, without gradients) and record its dataflow."""
    paths = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), path)
    constants = {id(t) for t in [*model.parameters(), *model.buffers()]}
    owners: dict[int, list[tuple[str, str]]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for attr, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None and path:  # the model's own tensors: its forward is their call
                owners.setdefault(id(t), []).append((path, attr))
    recorder = _Recorder(paths, constants, owners)
    was_training = model.training
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.callback(model.train, was_training)
        model.train(training)
        stack.enter_context(_global_hooks(recorder))
        with recorder:
            out = model(*fresh_inputs(example_inputs))
        recorder.record.outputs = [recorder.value_of(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return recorder.record


@contextlib.contextmanager
def _global_hooks(recorder: _Recorder) -> Iterator[None]:
    handles = [register_module_forward_pre_hook(recorder.pre_hook), register_module_forward_hook(recorder.hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# What feeds a nonlinearity, as the fallback needs to know it.


def normalizer_of(value: Value | None) -> str | None:
    """The norm `value` comes out of (through unary layout-keeping ops), described, or None."""
    seen = 0
    while value is not None and seen < 64:
        for path, cls in zip(value.modules, value.module_types):
            if issubclass(cls, NORM_MODULES) or cls.__name__.endswith(("Norm", "Norm1d", "Norm2d", "Norm3d")):
                return f"{path} ({cls.__name__})"
        if value.op in CHANNEL_NORMS | LAST_AXIS_NORMS:
            return value.where()
        if value.op in _RELAYOUT and value.relaid is not None:
            value, seen = value.relaid, seen + 1
            continue
        if value.op not in _UNARY - NONLINEARITIES or len(value.inputs) != 1:
            return None
        value, seen = value.inputs[0], seen + 1
    return None


@dataclass(frozen=True)
class FeatureAxis:
    axis: str | None  # "1", "last", or None when it cannot be proven
    layer: str  # the layer (or op) that decided it, or why none did


def feature_axis(value: Value | None, _memo: dict | None = None, _depth: int = 0) -> FeatureAxis:
    """Where `value`'s features sit, from the layer that made it, followed through elementwise
    ops (every operand shaped like the result must agree), slices and channel-keeping pooling."""
    memo = {} if _memo is None else _memo
    if value is None:
        return FeatureAxis(None, "its input is not a tensor the model computed")
    if id(value) in memo:
        return memo[id(value)]
    memo[id(value)] = FeatureAxis(None, "a cycle")  # a value cannot feed itself; guards the recursion
    op, where = value.op, value.where()
    if op in CHANNEL_LAYERS or op in CHANNEL_NORMS:
        found = FeatureAxis("1", where)
    elif op in LAST_AXIS_LAYERS or op in LAST_AXIS_NORMS:
        found = FeatureAxis("last", where)
    elif op == PRODUCT:
        found = FeatureAxis(None, f"{where}, a product of two computed tensors (attention-style) or with a weight that "
                                  "is not a matrix, whose last axis is not a layer's features")
    elif op == "input":
        found = FeatureAxis(None, "the model's input")
    elif op == "unknown":
        found = FeatureAxis(None, "a tensor changed in place where bngraph could not see it")
    elif _depth > 400:
        found = FeatureAxis(None, "a chain of elementwise ops too long to follow")
    elif op == "__getitem__" and value.relaid is not None:  # x[:, :, :-1]: a slice keeps every axis in place
        found = feature_axis(value.relaid, memo, _depth + 1)
    elif regroups_leading_axes(value):
        # HuggingFace's Conv1D: addmm on (N*T, C) viewed back as (N, T, C'). Each row of the
        # last axis stays whole, so features that were last stay last.
        inner = feature_axis(value.relaid, memo, _depth + 1)
        found = inner if inner.axis == "last" else FeatureAxis(None, f"{where}, which regroups the axes before the features")
    elif op in ELEMENTWISE or op in _CHANNEL_KEEPING:
        axes = [feature_axis(v, memo, _depth + 1) for v in value.inputs]
        known = {a.axis: a.layer for a in axes if a.axis is not None}
        if op in _CHANNEL_KEEPING:
            known = {k: v for k, v in known.items() if k == "1"}
        if len(known) == 1:
            found = FeatureAxis(*next(iter(known.items())))
        elif len(known) > 1:
            found = FeatureAxis(None, f"{where} adds features from different axes ({', '.join(known.values())})")
        else:
            found = FeatureAxis(None, f"{where}, whose inputs come from no layer with a known feature axis")
    else:
        found = FeatureAxis(None, f"{where}, through which the feature axis cannot be followed")
    memo[id(value)] = found
    return found


def _keeps_every_axis(index) -> bool:
    """Whether `x[index]` only narrows axes (slices, `...`): each axis stays where it was."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, slice) or p is Ellipsis for p in parts)


def regroups_leading_axes(value: Value) -> bool:
    """Whether `value` is a view or reshape of another that changes only the axes before the last."""
    source = value.relaid
    return (
        value.op in ("view", "reshape", "flatten", "unflatten") and source is not None
        and len(value.shape) >= 2 and len(source.shape) >= 2 and value.shape[-1] == source.shape[-1]
    )


def is_elementwise_nonlinearity(call: ModuleCall) -> bool:
    """Whether a module call was an elementwise nonlinearity written by hand: HuggingFace's
    GELUActivation (F.gelu held as an attribute), SiLUActivation (x * sigmoid(x)), NewGELU (tanh
    formula). Every op inside it is elementwise, at least one is nonlinear, and the result has
    its input's shape."""
    if isinstance(call.module, ACTIVATION_MODULES) or call.input is None or call.output is None:
        return False
    if any(True for _ in call.module.parameters()) or any(True for _ in call.module.children()):
        return False
    if call.output.shape != call.input.shape or not call.ops:
        return False
    if all(op in ELEMENTWISE or op in _NONLINEAR_PARTS for op in call.ops):
        return any(op in _NONLINEAR_PARTS for op in call.ops)
    # A custom autograd Function (efficientnet-pytorch's MemoryEfficientSwish) hides its ops:
    # only there does the class name count, as a hint confirmed by the shapes.
    name = type(call.module).__name__.lower()
    return all(op in ELEMENTWISE or op == "apply" for op in call.ops) and any(h in name for h in _NAME_HINTS)


__all__ = ["FeatureAxis", "ModuleCall", "RunRecord", "Value", "feature_axis", "is_elementwise_nonlinearity",
           "normalizer_of", "record_run", "regroups_leading_axes"]
