"""nn.Module -> torch.fx.GraphModule, with every node's output shape from an example input.

Tracing works on a deep copy: a GraphModule shares submodules with the module it was traced
from, and no bngraph command mutates the model it was handed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import inspect
import keyword
import re
import sys
import types
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace as fx_trace_module
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from bngraph.errors import CheckFailed, UserError, add_note, model_raised, one_line, user_frame, users_file
from bngraph.passes._fx_effects import hook_on_the_model, hooks_of
from bngraph.runners import batch_axes_of, buffers_kept, fresh_inputs, seeded


class TraceFailed(UserError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


def _user_frame(err: BaseException) -> str:
    """`file:line (code)` of the innermost frame in the user's code: where tracing stopped."""
    f = user_frame(err)
    if f is None:
        return "?"
    return f"{f.filename}:{f.lineno} ({f.line.strip() if f.line else f.name})"


def copy_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A copy of `module` that shares no module, parameter or buffer with it (tied weights stay
    tied within the copy). copy.deepcopy does the same through pickle's generic machinery, which
    is most of the cost of tracing a large model; this copies only what a module owns.

    Modules and tensors held in plain attributes, lists, tuples and dicts (not registered, as some
    models keep them) are copied through the same memo, so that the copy's list holds the copy's
    modules. Parametrized modules (weight_norm, spectral_norm) and TorchScript modules have
    classes made at run time that only deepcopy knows how to copy."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    if parametrize.is_parametrized(module) or isinstance(module, torch.jit.ScriptModule):
        memo[id(module)] = copy.deepcopy(module, memo)
        return memo[id(module)]
    new = copy.copy(module)  # a new __dict__ whose containers are still the original's
    memo[id(module)] = new
    new._parameters = {k: _copy_value(p, memo) for k, p in module._parameters.items()}
    new._buffers = {k: _copy_value(b, memo) for k, b in module._buffers.items()}
    new._modules = {k: None if m is None else copy_module(m, memo) for k, m in module._modules.items()}
    for name, value in vars(module).items():  # hook dicts, plain containers and tensors: no sharing either
        if name not in ("_parameters", "_buffers", "_modules"):
            new.__dict__[name] = _copy_value(value, memo)
    return new


_DICTS = (dict, collections.OrderedDict, collections.defaultdict)


_PLAIN = frozenset({int, float, bool, str, type(None)})  # nothing in them to copy


def _copied_memory(tensor: torch.Tensor, memo: dict) -> torch.Tensor:
    """A copy of `tensor`; tensors that shared memory share the copy's (a buffer made as
    `conv.weight.detach()` is the weight in the model, and must stay it in the copy: copied apart,
    a fold of the weight passed its check on the copy and not on the model rebuilt from it)."""
    if type(tensor) is not torch.Tensor or tensor.layout is not torch.strided or tensor.device.type == "meta":
        return tensor.clone()
    memory = tensor.untyped_storage()
    if memory.data_ptr() == 0:  # no elements
        return tensor.clone()
    key = ("memory", tensor.device, memory.data_ptr())
    if key not in memo:
        memo[key] = memory.clone()
    copied = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        memo[key], tensor.storage_offset(), tensor.size(), tensor.stride())
    return copied.requires_grad_(tensor.requires_grad)


def _copy_value(value, memo: dict):
    """`value` with every module and tensor in it copied once (through `memo`); the rest shared."""
    kind = type(value)  # the fast paths first: a layer's __dict__ is mostly ints and tuples of ints
    if kind in _PLAIN or kind is tuple and all(type(item) in _PLAIN for item in value):
        return value
    if isinstance(value, nn.Module):
        return copy_module(value, memo)
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            if is_lazy(value):  # a lazy layer not yet run: the copy takes its shapes on its own first call
                memo[id(value)] = type(value)(requires_grad=value.requires_grad, device=value.device, dtype=value.dtype)
            elif not value.is_leaf:  # a value computed with autograd (classic weight_norm's `weight`)
                memo[id(value)] = value.detach().clone()
            elif isinstance(value, nn.Parameter):
                memo[id(value)] = nn.Parameter(_copied_memory(value.detach(), memo), requires_grad=value.requires_grad)
            else:
                memo[id(value)] = _copied_memory(value, memo)
        return memo[id(value)]
    if type(value) in (list, tuple, set, frozenset) or isinstance(value, dict):
        if id(value) in memo:
            return memo[id(value)]
        if isinstance(value, dict):
            # keeps OrderedDict, defaultdict's factory...; .copy() where it does: copy.copy goes
            # through __reduce_ex__, a third of the time a module's copy took (hook dicts)
            new = value.copy() if type(value) in _DICTS else copy.copy(value)
            memo[id(value)] = new
            for key, item in value.items():
                new[key] = _copy_value(item, memo)
            return new
        items = [_copy_value(item, memo) for item in value]
        new = type(value)(items)
        if type(value) is list:
            memo[id(value)] = new
        return new
    return value


def check_modules_registered(model: nn.Module) -> None:
    """Raise UserError where `model` holds a module in a plain list, tuple or dict attribute (at
    any depth: `[[nn.Linear(...)]]`): not registered, so its weights are not in parameters()
    (never trained), state_dict() (never saved) or .to(); a saved or traced copy would compute
    something else. A plain list of modules that are registered elsewhere too (a second
    reference) is fine."""
    registered = {id(m) for m in model.modules()}

    def unregistered(value, where: str, depth: int = 0):
        if isinstance(value, types.SimpleNamespace):  # `self.heads = SimpleNamespace(cls=nn.Linear(...))`
            value = vars(value)
        if depth > 4 or not isinstance(value, (list, tuple, dict)):
            return None
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(item, nn.Module) and id(item) not in registered:
                return f"{where}[{key!r}]", item, value
            if (found := unregistered(item, f"{where}[{key!r}]", depth + 1)) is not None:
                return found
        return None

    for path, owner in model.named_modules():
        # The instance's attributes, and its class's (`shared = [nn.Linear(8, 8)]` in the class body).
        held = {**{k: v for k, v in vars(type(owner)).items() if not k.startswith("__")}, **vars(owner)}
        for name, value in held.items():
            found = unregistered(value, f"{path}.{name}" if path else name)
            if found is None:
                continue
            where, item, container = found
            wanted = "nn.ModuleDict" if isinstance(container, dict) else "nn.ModuleList"
            weights = any(True for _ in item.parameters()) or any(True for _ in item.buffers())
            why = ("its weights are not parameters (not trained, saved or moved to a device)" if weights else
                   "a model saved or traced from it would not find it")
            raise UserError(f"{type(model).__name__}.{where} is a {type(item).__name__} in a plain "
                            f"{type(container).__name__}, not a registered submodule: {why}; hold the layers in {wanted}")


_NO_INPUTS = object()  # check_model without example inputs (train, load): not the same as None given


def check_model(model, verb: str, example_inputs: Sequence | None = _NO_INPUTS, *, allow_none: bool = False) -> None:
    """A model bngraph can work on, with inputs it can run it on: an nn.Module (not TorchScript,
    whose graph bngraph cannot rewrite), with its weights materialized (not on the meta device),
    holding no torch.compile'd module (whose forward runs dynamo's compiled frame, which tracing
    and running its code here break); and tensors for inputs, one per forward argument (or, with
    `allow_none`, None for an optional argument left out: insert's trace takes it as a constant,
    where fold and export compare runs on tensors)."""
    if isinstance(model, torch.jit.ScriptModule):  # its submodules are modules too: reported as not reached
        raise UserError(f"{verb} takes an nn.Module, not a TorchScript module (torch.jit.script or torch.jit.trace), "
                        "whose graph bngraph cannot rewrite: give it the module that was scripted")
    if not isinstance(model, nn.Module):
        raise UserError(f"{verb} takes an nn.Module, not {type(model).__name__}")
    for path, m in model.named_modules():
        if type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod"):
            raise UserError(f"{path or 'the model'} is a torch.compile'd module: give bngraph the module before "
                            f"torch.compile ({path or 'model'}._orig_mod), and compile what it writes")
    on_meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if on_meta is not None:
        raise UserError(f"the model's {on_meta} is on the meta device (no values): load its weights first "
                        "(model.to_empty(device='cpu'), then load_state_dict)")
    if example_inputs is _NO_INPUTS:
        return
    if isinstance(example_inputs, torch.Tensor):  # `bool(x)` raised inside: "Boolean value of Tensor ... ambiguous"
        raise UserError(f"{verb}'s example inputs are one tensor: give a list of the forward's inputs, [x]")
    if not isinstance(example_inputs, (list, tuple)):
        # A numpy array raised numpy's "truth value ... is ambiguous", None a TypeError deep inside,
        # a dict's keys were taken for inputs, and a generator was used up by this very check.
        raise UserError(f"{verb}'s example inputs are {'None' if example_inputs is None else 'a ' + type(example_inputs).__name__}: "
                        "give a list of the forward's inputs as tensors, [x]")
    for i, x in enumerate(example_inputs):
        if x is None or isinstance(x, (bool, int, float)):  # an optional argument left out, a scale
            if x is None and allow_none:
                continue
            raise UserError(f"example input {i} is {x!r}: {verb} runs the model on tensors; leave an optional "
                            "argument out of the example inputs, or give it as a tensor")
        if not isinstance(x, torch.Tensor):
            raise UserError(f"example input {i} is a {type(x).__name__}: {verb} runs the model on tensors, one per "
                            "forward argument; wrap a model that takes a dict or a list in one whose forward takes tensors")
        if x.is_meta:
            raise UserError(f"example input {i} is on the meta device (no values)")
        if x.dtype == torch.bfloat16:  # the checks run the models on numpy arrays, which have no bfloat16
            raise UserError(f"example input {i} is bfloat16, which {verb}'s checks cannot hold: give it as float32 "
                            "and let the model cast it (x.to(torch.bfloat16) in its forward)")


def materialize_lazy(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> None:
    """Give lazy layers (LazyConv2d, LazyLinear, LazyBatchNorm...) their shapes by running the
    model once on the example input, in eval mode and without gradients.

    On the model itself, not a copy: a lazy layer draws its initial weights on its first forward,
    so materializing a copy would give the copy weights that the model never has. This is what
    the model's own first call would do; no statistic is updated, and each submodule's mode is
    put back. A model without lazy layers is not run."""
    if not any(is_lazy(t) for t in (*module.parameters(), *module.buffers())):
        return
    modes = {m: m.training for m in module.modules()}
    try:
        with torch.no_grad():
            module.eval()(*fresh_inputs(example_inputs))
    except Exception as err:
        raise UserError(f"the model's lazy layers could not take their shapes from the example input: {one_line(err)}") from err
    finally:
        for m, training in modes.items():
            m.training = training


def must_stay_whole(module: nn.Module) -> bool:
    """Whether a traced graph must call `module` as one module, though fx would trace through it:
    its call does more than its forward when it has hooks (which run only when the module itself
    is called), and fx would call a TorchScript module through its C++ object."""
    return isinstance(module, torch.jit.ScriptModule) or bool(hooks_of(module, global_hooks=False))


def assert_argument_is_none(value, message: str) -> None:
    """The guard torch.fx writes for an argument fixed at None (`mask=None`), under our name.

    torch.fx's own guard makes the generated code run `wrap("torch.fx._symbolic_trace.
    _assert_is_none")`, a dotted name that no globals dict holds: every later torch.fx trace in
    the process, torch.onnx.export's included, then fails with a KeyError (torch 2.13)."""
    if value is not None:
        raise AssertionError(message)


def check_input_dtype(value, dtype: torch.dtype, name: str) -> None:
    """The guard of a graph whose forward branched on an input's dtype (`_Tracer`)."""
    if isinstance(value, torch.Tensor) and value.dtype != dtype:
        raise TypeError(
            f"input {name!r} has dtype {value.dtype}, but this model's forward branches on that dtype and was traced "
            f"with {dtype} (its example input's); run it with {dtype}, or transform the model with an example of {value.dtype}"
        )


def check_traced_shapes(value, expected, where: str) -> None:
    """The guard of a graph whose forward branched on shapes, or looped over one (`_Tracer`):
    `value`, the condition (or the length) as computed now, must be what it was in the trace."""
    if value != expected:
        raise ValueError(
            f"this model's forward branches on shapes at {where}, traced where that gave {expected!r}; here it gives "
            f"{value!r}: run it with inputs shaped as its example (any batch size), or transform it with an example "
            "shaped as these"
        )


def check_traced_length(value, expected: int, where: str) -> None:
    """The guard of a graph whose forward looped over a shape (`_Tracer.iter`): as many elements
    as in the trace. One call, not `len` in the graph: torch.fx cannot trace `len` again."""
    check_traced_shapes(len(value), expected, where)


def check_no_random_draws(rng_before: torch.Tensor) -> None:
    """Raise fx's TraceError where the global random state moved since `rng_before`: the code
    traced drew a random number that no input fed (`if torch.rand([]) < self.layerdrop:`), so
    the graph would keep the one value drawn, a random choice made once for good."""
    if not torch.equal(rng_before, torch.random.get_rng_state()):
        raise fx.proxy.TraceError(
            "its forward draws random numbers that its input does not feed (as `torch.rand([]) < p`), which a graph "
            "would fix at the values drawn while tracing"
        )


def _is_shape_value(value) -> bool:
    """A Python number or a tuple of them (a shape), as shapes alone compute: not a tensor."""
    if isinstance(value, (tuple, list)):
        return all(_is_shape_value(v) for v in value)
    return isinstance(value, (bool, int, float))


def check_traced_dtype(value, dtype: torch.dtype, name: str) -> None:
    """The guard of a graph whose forward branched on the dtype of a value it computed (`_Tracer`)."""
    if isinstance(value, torch.Tensor) and value.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {value.dtype}, but this model's forward branches on that dtype and was traced where "
            f"it was {dtype}; run it with the dtypes it was transformed with (autocast changes them: train with "
            "--precision fp32), or transform it again"
        )


def input_examples(module: nn.Module, example_inputs: Sequence) -> list[dict[str, torch.Tensor]]:
    """The example inputs as meta tensors (shape and dtype, no data) by the names of the forward
    parameters they are given as: as given, then at batch size 1 and one more than the
    example's (for inputs with a batch axis), which tell `_Tracer` a fact of the example's
    shapes from one of its batch size."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return []
    all_tensors = all(isinstance(x, torch.Tensor) for x in example_inputs)
    axes = batch_axes_of(example_inputs) if all_tensors else [None] * len(example_inputs)
    given = [(p.name, x, axis == 0) for p, x, axis in zip(params, example_inputs, axes) if isinstance(x, torch.Tensor)]
    if not given:
        return []
    variants = [{name: x.to("meta") for name, x, _ in given}]
    sizes = {x.shape[0] for _, x, batched in given if batched}
    if len(sizes) == 1:  # one batch size, as in every batch the example stands for
        (example,) = sizes
        for size in (s for s in (1, example + 1) if s != example):
            variants.append({name: torch.empty((size, *x.shape[1:]) if batched else x.shape, dtype=x.dtype, device="meta")
                             for name, x, batched in given})
    return variants


_EXAMPLE = "bngraph_example"  # node.meta key: the node's value on the example, computed on meta tensors


@contextlib.contextmanager
def _untraced(module: nn.Module):
    """`module` callable as outside tracing: fx's patched module call and attribute read (which
    record nodes) put back for the while, and each training flag insert's tracer made a graph
    value a bool (eval mode)."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    flags = {m: m.__dict__["training"] for m in module.modules()
             if "training" in m.__dict__ and not isinstance(m.__dict__["training"], bool)}
    nn.Module.__call__, nn.Module.__getattr__ = fx_trace_module._orig_module_call, fx_trace_module._orig_module_getattr
    for m in flags:
        m.__dict__["training"] = False
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched
        for m, flag in flags.items():
            m.__dict__["training"] = flag


def _attribute(root: nn.Module, path: str):
    """What `path` names on `root`, read from the modules' own dicts: while fx traces, reading a
    module's attribute the usual way records a node."""
    value = root
    for part in path.split("."):
        if isinstance(value, nn.Module):
            owner = next((d for d in (value._parameters, value._buffers, value._modules, value.__dict__) if part in d), {})
            value = owner.get(part)
        else:
            value = getattr(value, part, None)
    return value


class _DtypeProxy(fx.Proxy):
    """A Proxy whose `.dtype`, and a shape's `len()`, are values where the tracer knows them (`_Tracer`)."""

    def __getattr__(self, name: str):
        if name == "dtype" and isinstance(self.tracer, _Tracer):
            example = self.tracer.example_of(self.node)
            if isinstance(example, torch.Tensor):
                if self.node.op != "get_attr":
                    self.tracer.dtypes_read.setdefault(self.node, example.dtype)
                return example.dtype
        return super().__getattr__(name)

    def __len__(self) -> int:
        # HF attention's `(*input_shape, -1, self.head_dim)` asks a shape's length before it
        # iterates it: known where the length is the same at every batch size, and checked.
        length = self.tracer.length_of(self) if isinstance(self.tracer, _Tracer) else None
        return super().__len__() if length is None else length


def _rebuildable_dict_type(value) -> type | None:
    """The type of a dict subclass `type(value)(**value)` rebuilds, key order included: an
    OrderedDict, or a dataclass that is a dict (HuggingFace's ModelOutput), whose keys are fields
    it takes by name. None for a plain dict (fx keeps it) and for any other dict."""
    cls = type(value)
    if cls.__module__ == "__main__":  # a script's or notebook's class: no other process could import it
        return None
    if cls is collections.OrderedDict:
        keys_ok = True
    elif isinstance(value, dict) and dataclasses.is_dataclass(cls) and _models_outputs_init(cls):
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        # Its dict holds all it holds, the same values (HF keeps the key of a field set to None),
        # in the fields' order (cls(**value) orders them so: a field set after construction,
        # `out.loss = ...`, came first and out[0] was the loss), and no attribute beside its fields.
        keys_ok = all(isinstance(k, str) and k in fields for k in value) \
            and list(value) == [f for f in fields if f in value] \
            and all(getattr(value, f, None) is (value[f] if f in value else None) for f in fields) \
            and set(vars(value)) <= set(fields)
    else:
        return None
    return cls if keys_ok and all(isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k)
                                  for k in value) else None


def _models_outputs_init(cls: type) -> bool:
    """Whether `cls` is built as HuggingFace's ModelOutput builds itself: its __init__ and
    __post_init__ are ModelOutput's, which only store the fields, so that building it again from
    its items gives it back. A user's own __post_init__ may change a value (logits / T), which a
    second run would apply twice."""
    post_init = getattr(cls, "__post_init__", None)
    return post_init is not None and post_init.__qualname__ == "ModelOutput.__post_init__" \
        and post_init.__module__.startswith("transformers.")


class _Tracer(fx.Tracer):
    """fx's tracer, keeping each module that `must_stay_whole` as one call, tracing a forward
    behind a decorator (`_callable_as_traced`), and keeping the guards of a graph traced with
    fixed arguments (insert's) as calls: run on a graph input, they would raise.

    Given the example inputs by parameter name (`input_examples`, meta tensors), nodes are also
    run on meta tensors (`example_of`), so that `.dtype` is a value, not a Proxy, for an input,
    a parameter or buffer, and every value computed from them: HuggingFace's ViT begins with
    `if pixel_values.dtype != weight.dtype:`, T5's blocks clamp `if hidden_states.dtype ==
    torch.float16:`, and fx cannot branch on a Proxy. The graph then holds the branch its example
    took, and a guard for each value whose dtype it read (`check_input_dtype` for an input,
    `check_traced_dtype` after a computed value): another dtype there is a TypeError naming it,
    never the other branch silently left out.

    Shapes stay Proxies (a graph holds no batch size), but where the forward branches on them
    (Whisper's `if input_features.shape[-1] != expected_seq_length:`, masks built only when
    `q_length > 1`), loops over them or unpacks one into a tuple, the value is taken from the example when it is the same
    at other batch sizes too (`input_examples`' variants): a fact of the example's other axes,
    which the graph then checks each time it runs (`check_traced_shapes`), raising where it
    differs. A condition on the batch size or on data stays fx's TraceError.

    What a forward does while traced that no graph can hold is a TraceError naming the module
    that did it (insert's tracer then keeps that module whole), and is undone: drawing a random
    number no input feeds (the graph would keep the one drawn), or setting an attribute (Swin's
    layers set their window size: the graph would keep this trace's value)."""

    # A graph that will be trained (insert's) cannot hold a forward that switches gradients off;
    # one that is only run (fold's, export's) computes the same values without the switch.
    trains = False

    def __init__(self, autowrap_functions=(), input_examples: Sequence[dict[str, torch.Tensor]] = ()):
        super().__init__(autowrap_functions=(assert_argument_is_none, check_input_dtype, check_traced_dtype,
                                             check_traced_shapes, check_traced_length, *autowrap_functions))
        self.input_examples = input_examples[0] if input_examples else {}
        self.other_batches = list(input_examples[1:])
        self.dtypes_read: dict[fx.Node, torch.dtype] = {}
        self.lengths_checked: set[fx.Node] = set()
        self._is_users: Callable[[str], bool] | None = None
        self._grad_at_start = True
        self._grad_frames: list[tuple[str, bool]] = []  # (module path, gradients on at its call), innermost last
        self._switched_grad_off: dict[str, list[fx.Node]] = {}  # module path ("": the model's) -> nodes made so
        self._in_functions = 0  # inside a custom autograd Function traced through, whose forward runs without

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _DtypeProxy(node, self)

    def _keys(self) -> list[str]:
        """The node.meta keys of the values on the example and on each of its other batch sizes."""
        return [_EXAMPLE, *(f"{_EXAMPLE}@{i}" for i in range(len(self.other_batches)))]

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.trains and kind in ("call_function", "call_method", "call_module") and self._grad_at_start \
                and not torch.is_grad_enabled() and not self._in_functions:
            # `with torch.no_grad():` in a forward: a graph keeps the ops, not the mode, and
            # trains what the user froze. The module whose forward switched it off is refused
            # once its call is done (`_check_grad_kept`), after the checks of what it wrote.
            where = next((path for path, on in reversed(self._grad_frames) if on), "")
            self._switched_grad_off.setdefault(where, []).append(node)
        if kind == "placeholder" and target in self.input_examples:
            for key, examples in zip(self._keys(), [self.input_examples, *self.other_batches]):
                node.meta[key] = examples[target]
        elif kind == "get_attr" and self.input_examples:  # a parameter, buffer or tensor constant
            value = _attribute(self.root, str(target))
            if isinstance(value, torch.Tensor):
                for key in self._keys():
                    node.meta[key] = value.detach().to("meta")
        return node

    def create_arg(self, a):
        # fx writes every dict as a plain one: a model returning HuggingFace's ModelOutput (or an
        # OrderedDict) would come back from its graph, and every model.py written from it, as a
        # dict, and the user's `out.logits` fail. Such a dict is rebuilt as its type in the graph.
        rebuilt = _rebuildable_dict_type(a)
        if rebuilt is not None:
            return self.create_node("call_function", rebuilt, (), {k: self.create_arg(v) for k, v in a.items()})
        return super().create_arg(a)

    def example_of(self, node: fx.Node, key: str = _EXAMPLE):
        """`node`'s value on the example (or with `key`, at another batch size), on meta
        tensors; None where it cannot be known (an argument has none, or an op cannot run
        there), as fx alone knows none. Computed when a `.dtype` is read or a shape decides a
        branch, for every node up to this one not yet run: a graph whose forward does neither
        costs nothing."""
        if key not in node.meta and self.input_examples:
            for earlier in node.graph.nodes:
                if key not in earlier.meta and earlier.op in ("call_function", "call_method", "call_module"):
                    earlier.meta[key] = self._run_on_examples(earlier, key)
                if earlier is node:
                    break
        return node.meta.get(key)

    def _run_on_examples(self, node: fx.Node, key: str):
        missing = []

        def example(a):
            if isinstance(a, fx.Node):
                value = a.meta.get(key)
                if value is None:
                    missing.append(a)
                return value
            return a

        args, kwargs = map_aggregate(node.args, example), map_aggregate(node.kwargs, example)
        if missing:
            return None
        before = len(node.graph.nodes)
        try:
            with torch.no_grad():
                value = self._run(node.op, node.target, args, kwargs)
        except Exception:  # noqa: BLE001 (an op without a meta kernel, a value-dependent one)
            value = None
        if len(node.graph.nodes) != before:  # something reached a Proxy after all: no part of the model
            for added in reversed(list(node.graph.nodes)[before:]):
                self.dtypes_read.pop(added, None)
                node.graph.erase_node(added)
            return None
        return None if any(isinstance(v, (fx.Proxy, fx.Node)) for v in tree_leaves(value)) else value

    def to_bool(self, obj: fx.Proxy) -> bool:
        if state := _autograd_state_read(obj.node):
            # The example runs without gradients: `if h.requires_grad:` would be kept False behind a
            # guard that then fails every training step.
            raise fx.proxy.TraceError(f"it branches on a tensor's {state}, which differs between training and "
                                      "the trace (run without gradients)")
        values = self._shape_values(obj.node)
        if values is None or any(bool(v) != bool(values[0]) for v in values):
            return super().to_bool(obj)  # on data, or on the batch size: fx's TraceError
        return self._checked(obj, bool(values[0]))

    def iter(self, obj: fx.Proxy):
        # A loop over a shape (`zip(x.shape[2:], factors)`): its elements stay graph values, so
        # that only what the loop's body branches on is fixed; the length is checked.
        length = self.length_of(obj)
        return super().iter(obj) if length is None else iter([obj[i] for i in range(length)])

    def length_of(self, obj: fx.Proxy) -> int | None:
        """The length of a shape (or a tuple computed from shapes) where it is the same at every
        batch size, with the guard that checks it when the graph runs; None where unknown."""
        values = self._shape_values(obj.node)
        if values is None or not all(isinstance(v, (tuple, list)) and len(v) == len(values[0]) for v in values):
            return None
        if obj.node not in self.lengths_checked:
            self.lengths_checked.add(obj.node)
            self.create_proxy("call_function", check_traced_length, (obj, len(values[0]), self._users_line()), {})
        return len(values[0])

    def _shape_values(self, node: fx.Node) -> list | None:
        """`node`'s values on the example and at its other batch sizes, where they are Python
        numbers or tuples of them (what shapes alone compute); else None."""
        values = [self.example_of(node, key) for key in self._keys()]
        return values if len(values) > 1 and all(_is_shape_value(v) for v in values) else None

    def _checked(self, proxy: fx.Proxy, expected):
        """`expected`, with the guard that `proxy` computes it when the graph runs."""
        self.create_proxy("call_function", check_traced_shapes, (proxy, expected, self._users_line()), {})
        return expected

    def _users_line(self) -> str:
        """file:line of the innermost frame of the model's own code: where the forward branched."""
        self._is_users = self._is_users or users_file()
        frame = sys._getframe(2)
        while frame is not None and not self._is_users(frame.f_code.co_filename):
            frame = frame.f_back
        return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "its forward"

    def _run(self, kind, target, args, kwargs):
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        module = self.root.get_submodule(target)
        if any(hooks_of(m) for m in module.modules()):  # a hook may keep what it sees
            return None
        state = {k: v.detach().to("meta") for k, v in [*module.named_parameters(), *module.named_buffers()]}
        with _untraced(module):
            return torch.func.functional_call(module, state, tuple(args), dict(kwargs))

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self.dtypes_read.clear()
        self.lengths_checked.clear()
        rng = torch.random.get_rng_state()
        # TorchScript modules keep their state in C++ (and cache `forward` in their dict when read)
        modules = {path: m for path, m in root.named_modules() if not isinstance(m, torch.jit.ScriptModule)} \
            if isinstance(root, nn.Module) else {}
        states = {path: _module_state(m) for path, m in modules.items()}
        buffers = dict(root.named_buffers()) if isinstance(root, nn.Module) else {}
        versions = _versions(buffers)
        self._grad_at_start, self._grad_frames, self._switched_grad_off = torch.is_grad_enabled(), [], {}
        try:
            # Its buffers' values put back as they were, after a forward that wrote them (checked below).
            with _custom_functions_checked(self), _checkpoints_kept(), _autocast_refused(), \
                    buffers_kept(root) if buffers else contextlib.nullcontext():
                graph = super().trace(root, concrete_args)
            _name_fixed_arguments_as_declared(graph, concrete_args)
            check_no_random_draws(rng)
            for path, m in modules.items():  # a forward that set another module's attribute
                check_state_kept(m, states[path], path or "the model")
            check_buffers_kept(buffers, versions, "the model")
            self._check_grad_kept("", "the model")
        finally:
            torch.random.set_rng_state(rng)  # the model's draws while traced are no one's
            for path, m in modules.items():
                _restore_state(m, states[path])
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        read = self.dtypes_read
        inputs = [(n, d) for n, d in read.items() if n.op == "placeholder"]
        if inputs and placeholders:
            with graph.inserting_after(placeholders[-1]):
                for node, dtype in reversed(inputs):
                    graph.call_function(check_input_dtype, (node, dtype, node.target))
        for node, dtype in read.items():
            if node.op != "placeholder":
                with graph.inserting_after(node):
                    graph.call_function(check_traced_dtype, (node, dtype, f"the value {node.name}"))
        return graph

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return must_stay_whole(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        # What a module's own forward did while traced that no graph can hold: the innermost
        # module that did it is named (insert's tracer then keeps it whole).
        state, rng = _module_state(m), torch.random.get_rng_state()
        buffers = dict(m.named_buffers(recurse=False))  # its own: each submodule's call checks its own
        versions = _versions(buffers)
        self._grad_frames.append((self.path_of_module(m), torch.is_grad_enabled()))
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._grad_frames.pop()
        check_no_random_draws(rng)  # `trace` puts back what any of these changed
        check_state_kept(m, state, "it")  # Swin's layers set their window size in forward
        check_buffers_kept(buffers, versions, "it")  # a step counter, a custom norm's statistics
        self._check_grad_kept(self.path_of_module(m), "it")
        return out

    def _check_grad_kept(self, path: str, what: str) -> None:
        """Refuse where a value made without gradients is read by an op made with them (or
        returned) and would carry a gradient in a graph: one computed from a parameter or an
        input through differentiable ops. A mask of comparisons carries none either way."""
        made = self._switched_grad_off.get(path, [])
        inside = set(made)
        # Read outside the block, or not yet read (what a module returns: its caller reads it later).
        todo = [n for n in made if not n.users or any(user not in inside for user in n.users)]
        seen: set[fx.Node] = set()
        carries = False
        while todo and not carries:  # back from those values, through ops that pass a gradient on
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            value = self.example_of(node) if node.op in ("call_function", "call_method", "call_module") else None
            if isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()):
                continue  # bool or int: no gradient through it
            if node.op == "get_attr":
                carries = isinstance(_attribute(self.root, str(node.target)), nn.Parameter)
            else:
                carries = node.op == "placeholder" or node.op == "call_module" and any(
                    p.requires_grad for p in self.root.get_submodule(str(node.target)).parameters())
            todo += node.all_input_nodes
        if carries:
            raise fx.proxy.TraceError(f"{what} switches gradients off for some of its ops (torch.no_grad(), "
                                      "inference_mode), which a traced graph would train")

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        return super().create_args_for_root(_callable_as_traced(root_fn, concrete_args), is_module, concrete_args)


# A module's own state, as its forward may change it: its attributes, and the contents of its
# parameter, buffer and submodule dicts. Not its mode (`training`), which insert's tracer makes a
# graph value, nor the constants torch.fx stores on the root (`_tensor_constant0`).
_TRACER_OWN = re.compile(r"training|_tensor_constant\d+")


_AUTOGRAD_STATE = ("requires_grad", "is_leaf", "grad_fn", "grad")


def _autograd_state_read(node: fx.Node) -> str | None:
    """The autograd attribute (`requires_grad`, ...) that `node` is computed from, if any."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _AUTOGRAD_STATE:
            return n.args[1]
        stack.extend(n.all_input_nodes)
    return None


def _versions(buffers: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: buffer._version for name, buffer in buffers.items()}


def check_buffers_kept(buffers: dict[str, torch.Tensor], versions: dict[str, int], who: str) -> None:
    """Raise fx's TraceError where a buffer among `buffers` was written in place since its
    `versions`: torch.fx hands a forward the buffer itself, not a Proxy, so `self.steps += 1`
    or a custom norm's running statistics update ran once, on the tensor, and the graph would
    never do it again."""
    changed = next((name for name, buffer in buffers.items() if buffer._version != versions[name]), None)
    if changed is not None:
        raise fx.proxy.TraceError(f"{who} updates the buffer {changed} in place in its forward, which a traced graph "
                                  "would not do")


def _module_state(m: nn.Module) -> dict:
    return {k: (v, dict(v) if isinstance(v, dict) else None) for k, v in m.__dict__.items() if not _TRACER_OWN.fullmatch(k)}


@contextlib.contextmanager
def _custom_functions_checked(tracer: _Tracer):
    """While tracing, a custom `torch.autograd.Function` called on a traced value is traced
    through only where its backward is the derivative of its forward: fx runs the forward on
    Proxies and records its ops, and the graph then differentiates those ops, dropping the
    backward the Function defines. A memory-saving Swish (efficientnet-pytorch's) computes the
    same gradient either way; a straight-through estimator or a gradient reversal does not, and
    is fx's TraceError naming it (insert's tracer then keeps its module whole). torch's own
    Functions (checkpointing's) keep the gradient."""
    original = torch.autograd.Function.__dict__["apply"]
    proven: dict[tuple, bool] = {}  # per Function and argument shapes: efficientnet-b0 calls one 49 times

    def apply(cls, *args, **kwargs):
        if not cls.__module__.startswith("torch.") and any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
            examples = [tracer.example_of(a.node) if isinstance(a, fx.Proxy) else a for a in args]
            key = (cls, *((tuple(e.shape), e.dtype) if isinstance(e, torch.Tensor) else repr(e) for e in examples))
            if key not in proven:
                proven[key] = not kwargs and _backward_is_the_derivative(cls, examples, original.__func__)
            if kwargs or not proven[key]:
                raise fx.proxy.TraceError(f"it calls the custom autograd Function {cls.__qualname__}, whose own "
                                          "backward a traced graph would drop (torch.fx records its forward's ops only)")
        tracer._in_functions += 1  # its forward runs without gradients, as every Function's does
        try:
            return original.__func__(cls, *args, **kwargs)
        finally:
            tracer._in_functions -= 1

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


@contextlib.contextmanager
def _autocast_refused():
    """While tracing, entering torch.autocast (`with torch.autocast("cpu", torch.bfloat16):` in a
    forward, or `enabled=False` around a head kept in float32, as a decorator too) is fx's
    TraceError (its module is then kept whole): a graph keeps the ops, not the precision they
    run in, and the fold's artifact computed in float32, or in bfloat16 under the user's AMP."""
    autocast = torch.amp.autocast_mode.autocast
    enter = autocast.__enter__

    def refused(self):
        raise fx.proxy.TraceError("it enters torch.autocast, whose precision a traced graph would not keep")

    autocast.__enter__ = refused
    try:
        yield
    finally:
        autocast.__enter__ = enter


@contextlib.contextmanager
def _checkpoints_kept():
    """While tracing, torch.utils.checkpoint called on a traced value is fx's TraceError (its
    caller is then kept whole): fx would record the block's ops once, and the graph would store
    the activations that checkpointing recomputes in backward instead. Patched where
    `checkpoint` looks them up as it runs, so that `from torch.utils.checkpoint import
    checkpoint` in the user's file is caught too."""
    import torch.utils.checkpoint as checkpointing

    def refused(original):
        def call(*args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
                raise fx.proxy.TraceError("it calls torch.utils.checkpoint, whose recomputation in backward a traced "
                                          "graph would drop (storing the activations it saves)")
            return original(*args, **kwargs)

        return call

    originals = {"_checkpoint_without_reentrant_generator": checkpointing._checkpoint_without_reentrant_generator,
                 "CheckpointFunction": checkpointing.CheckpointFunction}
    checkpointing._checkpoint_without_reentrant_generator = refused(originals["_checkpoint_without_reentrant_generator"])
    checkpointing.CheckpointFunction = type("CheckpointFunction", (), {
        "apply": staticmethod(refused(originals["CheckpointFunction"].apply))})
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(checkpointing, name, value)


class _Context:
    """What a Function's forward may call on its ctx, doing nothing: run as plain ops."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _backward_is_the_derivative(cls, examples: list, apply) -> bool:
    """Whether `cls`'s backward gives what autograd gives for its forward's own ops, on random
    values shaped like `examples` (meta tensors; None where the trace could not tell a value's
    shape, which a (2, 3, 4, 5) stands in for: an elementwise Function runs on it, another fails
    and is not proven; any other argument as it is): False where that cannot be run or differs.
    At several scales of the values and of the gradients: a backward that clips the gradient to
    [-10, 10] is the derivative wherever N(0, 1) seeds reach."""
    examples = [torch.empty(2, 3, 4, 5, device="meta") if e is None else e for e in examples]
    if not any(isinstance(e, torch.Tensor) for e in examples):
        return False
    generator = torch.Generator().manual_seed(0)
    return all(_same_gradients(cls, examples, apply, generator, values, gradients)
               for values, gradients in ((1.0, 1.0), (100.0, 1.0), (1.0, 1e4), (1e-3, 1e-3)))


def _same_gradients(cls, examples: list, apply, generator: torch.Generator, values: float, gradients: float) -> bool:
    try:
        inputs = [(torch.randn(e.shape, generator=generator, dtype=torch.float64) * values).requires_grad_()
                  if isinstance(e, torch.Tensor) and e.is_floating_point() else e for e in examples]
        leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        with torch.enable_grad():
            own = apply(cls, *inputs)
            plain = cls.forward(_Context(), *inputs)
            outputs = [(a, b) for a, b in zip(tree_leaves(own), tree_leaves(plain)) if isinstance(a, torch.Tensor)]
            if not outputs or not all(isinstance(b, torch.Tensor) and a.shape == b.shape for a, b in outputs):
                return False
            seeds = [torch.randn(a.shape, generator=generator, dtype=a.dtype) * gradients for a, _ in outputs]
            by_backward = torch.autograd.grad([a for a, _ in outputs], leaves, seeds, allow_unused=True)
            by_forward = torch.autograd.grad([b for _, b in outputs], leaves, seeds, allow_unused=True)
    except Exception:  # noqa: BLE001 - a Function that cannot run this way is not proven: kept whole
        return False
    return all((g is None and h is None) or (g is not None and h is not None and torch.allclose(g, h, rtol=1e-6, atol=1e-8 * gradients))
               for g, h in zip(by_backward, by_forward))


def check_state_kept(m: nn.Module, state: dict, who: str) -> None:
    """Raise fx's TraceError where `m`'s state differs from `state` (`_module_state`): its
    forward set an attribute while it was traced, so the graph would compute with a value of
    that one trace (a Proxy, even) where the model recomputes it on every call."""
    now = _module_state(m)
    changed = sorted(now.keys() ^ state.keys())
    for key, (value, content) in state.items():
        if key not in now:
            continue
        if now[key][0] is not value:
            changed.append(key)
        elif content is not None:
            inner = now[key][1]
            changed += [name for name in inner.keys() ^ content.keys()]
            changed += [name for name in content.keys() & inner.keys() if inner[name] is not content[name]]
    if changed:
        raise fx.proxy.TraceError(f"{who} sets self.{changed[0]} in its forward, which a graph cannot do")


def _restore_state(m: nn.Module, state: dict) -> None:
    for key in [k for k in m.__dict__ if not _TRACER_OWN.fullmatch(k) and k not in state]:
        del m.__dict__[key]
    for key, (value, content) in state.items():
        if content is not None:
            value.clear()
            value.update(content)
        m.__dict__[key] = value


def _name_fixed_arguments_as_declared(graph: fx.Graph, concrete_args) -> None:
    """fx names the input of an argument fixed at a value (`temperature=1.0`, `mask=None`)
    `temperature_1`, one per leaf of the value, and the traced forward would take that keyword:
    `model(x, temperature=1.0)` raised a TypeError even at the value traced. A value of one leaf
    keeps its parameter's name."""
    placeholders = {node.target: node for node in graph.nodes if node.op == "placeholder"}
    for name, value in (concrete_args or {}).items() if isinstance(concrete_args, dict) else ():
        node = placeholders.get(f"{name}_1")
        if node is not None and name not in placeholders and f"{name}_2" not in placeholders and len(tree_leaves(value)) <= 1:
            node.target = name


def _callable_as_traced(root_fn, concrete_args):
    """`root_fn` as fx can trace it.

    fx takes the root forward's parameters from the function a `functools.wraps` decorator wraps
    (HuggingFace's `merge_with_config_defaults` and `can_return_tuple` on every model's forward),
    then calls the decorator's `(*args, **kwargs)` wrapper as if it had those parameters: the
    wrapper's `kwargs` gets the second argument. And a `**kwargs` parameter becomes a graph input,
    so that every use of it is a Proxy. So such a forward is traced through a function with the
    wrapped parameters but `**kwargs`, which calls it as the example's call does: its inputs by
    position, what the example fixes by keyword (a decorator such as HuggingFace's fills in a
    keyword it was not given: `use_cache` from the config), no other keywords."""
    wrapped = inspect.unwrap(root_fn)
    try:
        params = list(inspect.signature(wrapped).parameters.values())
    except (TypeError, ValueError):
        return root_fn
    hides_signature = wrapped is not root_fn and root_fn.__code__.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
    if not hides_signature and all(p.kind is not p.VAR_KEYWORD for p in params):
        return root_fn
    fixed = concrete_args if isinstance(concrete_args, dict) else {}
    declared, passed, keyword_only, by_keyword = [], [], False, False
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            continue
        if p.kind is p.VAR_POSITIONAL:
            declared.append(f"*{p.name}")
            passed.append(f"*{p.name}")
            keyword_only = True
            continue
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            declared.append("*")
            keyword_only = True
        declared.append(p.name)
        by_keyword = by_keyword or p.kind is p.KEYWORD_ONLY or p.kind is not p.POSITIONAL_ONLY and p.name in fixed
        passed.append(f"{p.name}={p.name}" if by_keyword else p.name)
    namespace: dict = {}
    # The wrapper under a name no parameter has (a forward may well take one called `call`).
    exec(f"def forward({', '.join(declared)}):\n    return __bngraph_forward__({', '.join(passed)})",  # noqa: S102
         {"__bngraph_forward__": root_fn}, namespace)
    forward = namespace["forward"]
    forward.__defaults__, forward.__kwdefaults__ = wrapped.__defaults__, wrapped.__kwdefaults__
    return forward


def _symbolic_trace(module: nn.Module, example_inputs: Sequence | None = None) -> fx.GraphModule:
    hooked = hooks_of(module, global_hooks=False)
    if hooked:
        # torch.fx runs the root's forward, never its __call__: the hooks would be lost.
        raise TraceFailed(f"{type(module).__name__} itself has a {' and a '.join(hooked)}, which a traced graph cannot keep")
    refuse_hooks_on_the_model(module)
    tracer = _Tracer(input_examples=input_examples(module, example_inputs or ()))
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def refuse_hooks_on_the_model(module: nn.Module) -> None:
    """TraceFailed where a submodule's hook works on the model itself (`hook_on_the_model`): the
    model written from a graph would rebuild that submodule, hook and all, for another model."""
    if hook := hook_on_the_model(module):
        raise TraceFailed(f"the hook {hook} works on {type(module).__name__} itself (its state), which a model "
                          "written from a traced graph could not give it")


def keep_what_its_data_means(model: nn.Module, result: nn.Module) -> None:
    """Give `result`, made from `model`, the classes its outputs are and the scale its inputs take
    (set by `bngraph.load` and `bngraph.train`): saved or fine-tuned, a folded trained model lost
    them, and a folder lacking a class shifted the others' labels."""
    for name in ("bngraph_classes", "bngraph_input_scale"):
        if getattr(model, name, None) is not None and result is not model:
            setattr(result, name, getattr(model, name))


_SET_UP_ONLY = frozenset({"reset_parameters", "extra_repr", "init_weights", "initialize_weights"})  # not run on a model


def left_out_of_the_graph(model: nn.Module, gm: nn.Module, said: Sequence[str] = (), *, in_eval: bool = False) -> str | None:
    """A note naming what a graph of `model`'s forward does not hold: the layers and tensors no
    forward reaches (an auxiliary head, a temperature another method reads; `said`, those already
    named elsewhere, left out) and the methods of the model's own class beside forward. None
    when it holds everything."""
    kept = {name for name, _ in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False))}
    names_of: dict[int, list[str]] = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        names_of.setdefault(id(tensor), []).append(name)
    every = [names[0] for names in names_of.values()]
    left_out = {names[0] for names in names_of.values() if not any(n in kept for n in names)}
    owners = sorted({_whole_owner(name, every, left_out) for name in left_out})
    owners = [o for o in owners if not any(o == p or o.startswith(f"{p}.") for p in said)]
    methods = [name for name, value in vars(type(model)).items() if name != "forward" and not name.startswith("_")
               and name not in _SET_UP_ONLY and isinstance(value, (types.FunctionType, staticmethod, classmethod))]
    if not owners and not methods:
        return None

    def listed(names: list[str]) -> str:
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    never = "never used by its forward in eval mode" if in_eval else "never used by its forward"
    left = [f"{listed(owners)} ({never}: their weights are left out)" if owners else None,
            f"{type(model).__name__}'s other methods ({listed(methods)})" if methods else None]
    return f"the result is the graph of the model's forward, without {' or '.join(x for x in left if x)}"


def _whole_owner(name: str, every: Sequence[str], left_out: set[str]) -> str:
    """The outermost module above the tensor `name` whose tensors are all `left_out`, or `name`
    itself where its module keeps some (HuBERT's masked_spec_embed, beside its used layers)."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth]) + "."
        if all(n in left_out for n in every if n.startswith(prefix)):
            return prefix[:-1]
    return name


class TraceUnfaithful(TraceFailed):
    """The traced graph computes something else than the model: a value fixed at trace time."""


def check_faithful_trace(
    module: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *, reference=None, output=None
) -> None:
    """Raise TraceUnfaithful when `gm` does not compute what `module` computes in eval mode on the
    example input: the forward branched on a tensor's value, a global or other Python state that
    the trace froze (see `bngraph.equivalence`). One forward of each; a command's own check of
    its result then covers a batch of another size too. `output`: `gm`'s from `trace_and_run`,
    which then saves the graph's forward."""
    from bngraph.equivalence import Reference  # here: equivalence imports verify, which imports this module

    reference = reference or Reference(module, example_inputs)  # `bngraph.equivalence.Reference` of `module`
    try:
        reference.check(gm, what="the traced graph", example_only=True, example_output=output)
    except CheckFailed as err:
        raise TraceUnfaithful(
            f"torch.fx's trace of {type(module).__name__} computes something else than the model ({err}): its "
            "forward depends on Python state (a tensor's value, a global, a counter) that tracing froze"
        ) from err


def trace(
    module: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None, *, training: bool | None = None
) -> fx.GraphModule:
    """Trace a copy of `module` (in train or eval mode first, with `training`); with
    `example_inputs`, fill `node.meta['tensor_meta']`."""
    return trace_and_run(module, example_inputs, training=training)[0]


def faithful_trace(module: nn.Module, example_inputs: Sequence[torch.Tensor] | None) -> fx.GraphModule:
    """The trace insert makes (`bngraph.partial_trace`): faithful in both modes, the mode a graph
    value (`F.dropout(x, training=self.training)` reads it as it runs, where `trace` writes the
    mode the model was in), a submodule torch.fx cannot follow kept whole; shapes recorded.
    Without `example_inputs` nothing can be checked: `trace` alone."""
    if example_inputs is None:
        return trace(module)
    from bngraph.partial_trace import trace_for_insert  # it builds on this module

    return trace_for_insert(module, example_inputs)[0]


def trace_and_run(
    module: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None, *, training: bool | None = None
) -> tuple[fx.GraphModule, object]:
    """`trace`, and the graph's output from the run that recorded the shapes (see
    `record_shapes`; None without `example_inputs`)."""
    if example_inputs is not None:
        materialize_lazy(module, example_inputs)
    module = copy_module(module)
    if training is not None:
        module.train(training)  # before tracing: a forward may branch on self.training
    try:
        gm = _symbolic_trace(module, example_inputs)
    except TraceFailed:
        raise
    except Exception as err:  # fx raises TraceError, TypeError, AttributeError... for one cause
        if example_inputs is not None:
            raise_if_model_raises(module, example_inputs)
        raise TraceFailed(
            f"torch.fx could not trace {type(module).__name__} at {_user_frame(err)}: {one_line(err)}"
        ) from err
    output = None
    if example_inputs is not None:
        try:
            output = record_shapes(gm, example_inputs)
        except UserError as err:
            raise_if_model_raises(module, example_inputs)  # the user's own file:line, not a node name
            # The model runs where its graph fails: the trace took a path the model does not take
            # (monai's BasicUNet), so it is untraceable, not the model's fault.
            raise TraceUnfaithful(f"torch.fx traced {type(module).__name__} unfaithfully: {err}") from err
    return gm, output


def raise_if_model_raises(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> None:
    """Run the model eagerly once, in eval mode and without gradients (each submodule's mode put
    back): when its own forward raises, say so with its file and line. Only on a failure path,
    so a model that works is never run twice."""
    modes = {m: m.training for m in module.modules()}
    try:
        with torch.no_grad():
            module.eval()(*fresh_inputs(example_inputs))
    except Exception as err:
        if user_frame(err) is not None:
            shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
            raise model_raised(err, failed=f"the model failed on its example input {shapes}") from err
    finally:
        for m, training in modes.items():
            m.training = training


class _RecordShapes(fx.Interpreter):
    """torch.fx's ShapeProp, minus its printed traceback: a failure names the node instead."""

    def run_node(self, node: fx.Node):
        try:
            result = super().run_node(node)
        except Exception as err:
            add_note(err, f"bngraph: at node {node.name}")
            self.failed_at = node.name
            raise
        if any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(result)):
            # Without the memory format, which no pass reads: torch's check of it imports sympy,
            # ~0.2 s of every command that traces.
            node.meta["tensor_meta"] = map_aggregate(
                result,
                lambda r: _extract_tensor_metadata(r, include_contiguity=False) if isinstance(r, torch.Tensor) else None,
            )
        node.meta["type"] = type(result)
        return result


def record_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]):
    """Run `gm` once in eval mode (no statistics updated, no dropout), record each node's shape,
    and return the output of that run: drawn under
    `bngraph.runners.seeded()`, as every check's runs are, so that a check of `gm` can take it
    instead of running `gm` on the example input again (`Reference.check(example_output=...)`)."""

    was_training = gm.training
    gm.eval()
    recorder = _RecordShapes(gm)
    try:
        with torch.no_grad(), seeded():
            return recorder.run(*fresh_inputs(example_inputs))
    except Exception as err:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        where = getattr(recorder, "failed_at", "?")
        raise UserError(f"the model failed on its example input {shapes} at node {where}: {one_line(err)}") from err
    finally:
        gm.train(was_training)
