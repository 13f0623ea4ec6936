"""Trace as much of a model as torch.fx can follow, faithfully, for `insert`.

`fx.symbolic_trace` is all or nothing, bakes the mode the model is in into the graph, and can
record a path the model does not take. `trace_for_insert` fixes the three:

  1. Mode. Every module's `training` flag is a graph value (`self.training`) while tracing, so
     `F.dropout(x, training=self.training)` keeps reading the mode at run time. A forward that
     branches on it in Python (`if self.training:`, a drop-path helper) cannot be traced; that
     submodule stays a leaf (3.), and the mode-dependence stays exact because the leaf runs its
     own code.
  2. Faithfulness. The graph is compared with the model on the example input: eval-mode
     outputs, the graphs traced in train and in eval mode, and, where the graph reads the mode,
     train-mode outputs under one random seed. A difference is located at the first leaf call
     whose input differs (or the node that raised), and the innermost submodule whose traced
     code produced it becomes a leaf. Arguments of forward beyond the example inputs are fixed
     at their defaults (`mask=None`, `return_dict=None`), as in the call the example stands for.
  3. Partial tracing. A submodule in whose forward tracing fails, or that 2. blames, is kept as
     one opaque call (a leaf) and the model is traced again, up to `MAX_LEAVES` times. Only a
     failure in the top-level forward, or in code 2. cannot place, makes the whole trace fail.

The leaves are reported (`Opaque`): insert does not see inside them.

One module, though long: the tracer, the faithfulness checks and the blame that picks the next leaf
are the three steps of one loop (`trace_for_insert`), each reading what the last one found.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from bngraph.passes._dataflow import NONLINEARITIES, normalizer_of, record_run
from bngraph.errors import UserError, model_raised, one_line, user_frame, users_file
from bngraph.passes._op_kinds import ACTIVATION_MODULES
from bngraph.passes._fx_effects import hooks_of
from bngraph.runners import fresh_inputs
from bngraph.trace import (TraceFailed, _RecordShapes, _Tracer, assert_argument_is_none, copy_module, input_examples,
                           refuse_hooks_on_the_model)

MAX_LEAVES = 48
_SEED = 20150211  # the paper's arXiv date: any fixed seed makes two train-mode runs comparable


@dataclass(frozen=True)
class Opaque:
    module: str  # path in the model
    type: str
    reason: str


def kept_whole_modules(opaque: Sequence[Opaque]) -> list[str]:
    """The paths of the submodules among `opaque` (the rest are functions called whole), which
    insert and fold reach into module by module."""
    return [o.module for o in opaque if o.type != "function"]


_fx_assert_is_none = torch.fx._symbolic_trace._assert_is_none


class InsertTracer(_Tracer):
    """bngraph's tracer (modules with hooks and TorchScript modules stay one call) with the mode
    as a graph value (1.) and the modules at `leaves` kept opaque (3.)."""

    trains = True

    def __init__(self, leaves: Sequence[str] = (), functions: Sequence = (), examples: Sequence[dict] = (),
                 mode: bool | None = None):
        super().__init__(autowrap_functions=tuple(functions), input_examples=examples)
        self.leaves = set(leaves)
        self.mode = mode  # what `if self.training:` in the top-level forward takes (None: fx's TraceError)
        self.branched_on_mode: str | None = None  # where it did
        self._saved_flags: dict[nn.Module, bool] = {}
        self._is_users = users_file()
        self._users_code: dict[object, bool] = {}
        self._calls: dict[object, tuple[str, int]] = {}  # frame -> (name, serial): each call its own
        self._trace_frame = None

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        calls = self._function_calls()
        if calls:
            proxy.node.meta["function_calls"] = calls
        return proxy

    def _function_calls(self) -> tuple[tuple[str, int], ...]:
        """The calls of the user's plain functions (and methods other than `forward`) that the
        node being made comes from, outermost first, up to the module forward that made them:
        `def nonlinearity(x): return x * torch.sigmoid(x)` (latent diffusion's swish) is one
        nonlinearity of x, as a module whose forward does the same is (`composite_activation`)."""
        calls = []
        frame = sys._getframe(2)
        while frame is not None and frame is not self._trace_frame:  # not the callers of trace()
            code = frame.f_code
            users = self._users_code.get(code)
            if users is None:
                users = self._users_code[code] = self._is_users(code.co_filename)
            if users:
                if code.co_name == "forward" and code.co_argcount >= 1 and \
                        isinstance(frame.f_locals.get(code.co_varnames[0]), nn.Module):
                    # A module's forward, whatever its first parameter is called (`def forward(s, x)`
                    # read as a plain function made tanh(relu(x)) one nonlinearity), and not a
                    # helper function of that name (`def forward(x): return x * torch.sigmoid(x)`).
                    break
                if frame not in self._calls:  # the frame stays referenced: no other call gets its id
                    # co_qualname from Python 3.11 on
                    self._calls[frame] = (getattr(code, "co_qualname", code.co_name), len(self._calls))
                calls.append(self._calls[frame])
            frame = frame.f_back
        return tuple(reversed(calls))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def to_bool(self, obj: fx.Proxy) -> bool:
        # The top-level forward branching on the mode (BART's `if self.training and
        # self.layerdrop > 0.0:`) has no submodule to keep whole: it is traced in each mode
        # (`_graph`), and the graph stands only where both are the same.
        if obj.node.op == "get_attr" and obj.node.target == "training" and not self.module_stack and self.mode is not None:
            self.branched_on_mode = self.branched_on_mode or self._users_line()
            return self.mode
        return super().to_bool(obj)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        made = super().create_args_for_root(root_fn, is_module, concrete_args)
        if is_module:
            # One graph value for every module's flag: the root's, which model.train()/eval() sets
            # on all of them together (a submodule switched on its own is the exception we accept).
            flag = self.create_proxy("get_attr", "training", (), {})
            for module in self.root.modules():
                if isinstance(module.__dict__.get("training"), bool):  # a TorchScript module keeps it in C++
                    self._saved_flags[module] = module.__dict__["training"]
                    module.__dict__["training"] = flag
        return made

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self._trace_frame = sys._getframe()
        try:
            graph = super().trace(root, concrete_args)
        finally:
            for module, flag in self._saved_flags.items():
                module.__dict__["training"] = flag
            self._saved_flags.clear()
            self._calls.clear()  # the frames, and the tensors they hold
            self._trace_frame = None
        for node in graph.nodes:  # no forward read the mode: no node for it
            if node.op == "get_attr" and node.target == "training" and not node.users:
                graph.erase_node(node)
            elif node.op == "call_function" and node.target is _fx_assert_is_none:
                node.target = assert_argument_is_none
            elif node.op == "call_function" and isinstance(node.target, torch.jit.ScriptFunction):
                node.target = _python_caller(node.target)
        return graph

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            # The innermost module whose forward was being traced when it failed (set once, on
            # the way out of the innermost call).
            if not hasattr(err, "_bngraph_module"):
                path = self.path_of_module(m)
                if not self.is_leaf_module(m, path):
                    err._bngraph_module = path
            raise


def _fixed_arguments(model: nn.Module, given: int) -> dict:
    """The forward's parameters past the `given` example inputs, at their defaults: a flag such as
    HuggingFace's `return_dict=None` is then a Python value while tracing, as in every call the
    example stands for, not a graph input that `if not return_dict:` cannot branch on."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    fixed = {}
    for p in parameters[given:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            return {}  # a required parameter the example does not give: let fx say so
        fixed[p.name] = p.default
    return fixed


def _graph(model: nn.Module, leaves: Sequence[str], functions: Sequence, example_inputs) -> fx.Graph:
    examples, fixed = input_examples(model, example_inputs), _fixed_arguments(model, len(example_inputs)) or None
    tracer = InsertTracer(leaves, functions, examples, mode=model.training)
    graph = tracer.trace(model, concrete_args=fixed)
    if tracer.branched_on_mode is None:
        return graph
    differs = f"its forward branches on self.training at {tracer.branched_on_mode}, and the other mode"
    try:
        other = InsertTracer(leaves, functions, examples, mode=not model.training).trace(model, concrete_args=fixed)
    except Exception as err:
        raise fx.proxy.TraceError(f"{differs} cannot be traced ({one_line(err)})") from err
    if _structure(graph, model) != _structure(other, model):
        raise fx.proxy.TraceError(f"{differs} traces to another graph")
    return graph


def _trace(model: nn.Module, leaves: Sequence[str], functions: Sequence, example_inputs) -> fx.GraphModule:
    return fx.GraphModule(model, _graph(model, leaves, functions, example_inputs), class_name=type(model).__name__)


def _failing_function(err: BaseException):
    """The module-level function of the user's code (not a method: a forward is its module's)
    in which tracing failed, or None."""
    frame_summary = user_frame(err)
    if frame_summary is None:
        return None
    tb, frame = err.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == frame_summary.filename and tb.tb_lineno == frame_summary.lineno:
            frame = tb.tb_frame
        tb = tb.tb_next
    # A TorchScript function (`@torch.jit.script def swish(x)`) refuses fx's Proxy: it is called
    # from `frame`, and found there by the name its error gives.
    refused = re.match(r"(\w+)\(\) Expected a value of type", str(err))
    if frame is not None and refused and isinstance(frame.f_globals.get(refused[1]), torch.jit.ScriptFunction):
        return frame.f_globals[refused[1]]
    if frame is None or frame.f_code.co_name.startswith("_"):  # fx wraps public names only
        return None
    function = frame.f_globals.get(frame.f_code.co_name)
    if getattr(function, "__code__", None) is not frame.f_code:
        return None
    return function


def _script_name(script: torch.jit.ScriptFunction) -> tuple[str, str]:
    """(Python module, name) of a TorchScript function: its qualified name, less TorchScript's prefix."""
    module, _, name = script.qualified_name.removeprefix("__torch__.").rpartition(".")
    return module, name


def _python_caller(script: torch.jit.ScriptFunction):
    """A Python function that calls TorchScript function `script`, named as `script` is in the
    user's file: fx's generated code would name a ScriptFunction by its class, and an artifact's
    code finds the function in the user's source it carries."""

    def call(*args, **kwargs):
        return script(*args, **kwargs)

    module, name = _script_name(script)
    call.__module__, call.__name__, call.__qualname__, call.__wrapped__ = module, name, name, script
    return call


def _function_label(function) -> str:
    """`module.name` of a function, a TorchScript one's included; `model.py:name` for one of the
    user's file (which bngraph imports under a name of its own)."""
    if isinstance(function, torch.jit.ScriptFunction):
        module, name = _script_name(function)
    else:
        module, name = function.__module__, function.__qualname__
    file = getattr(sys.modules.get(module), "__file__", None)
    return f"{os.path.basename(file)}:{name}" if module.startswith("bngraph_user_") and file else f"{module}.{name}"


def _stack(node: fx.Node) -> list[str]:
    """Paths of the modules whose traced code `node` came from, outermost first (not its own)."""
    paths = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return [p for p in paths if p]


def _culprit(node: fx.Node, leaves: dict[str, Opaque]) -> str | None:
    """The innermost submodule whose traced code produced the wrong value at `node`: the deepest
    module that both `node` and the nodes feeding it were traced in (the code between them)."""
    own = _stack(node)
    common = own
    for arg in node.all_input_nodes:
        theirs = _stack(arg) + ([arg.target] if arg.op == "call_module" else [])
        n = 0
        while n < min(len(common), len(theirs)) and common[n] == theirs[n]:
            n += 1
        common = common[:n]
    for candidates in (common, own):
        for path in reversed(candidates):
            if path not in leaves:
                return path
    return None


def _same(a, b) -> bool:
    flat_a, flat_b = tree_leaves(a), tree_leaves(b)
    if len(flat_a) != len(flat_b):
        return False
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point() or x.is_complex():
                scale = max(1.0, float(y.detach().abs().max())) if y.numel() else 1.0
                if not torch.allclose(x.detach(), y.detach(), rtol=1e-4, atol=1e-5 * scale, equal_nan=True):
                    return False
            elif not torch.equal(x, y):
                return False
    return True


class _Divergence(Exception):
    def __init__(self, node: fx.Node):
        self.node = node


class _CompareLeafInputs(fx.Interpreter):
    """Run `gm`, checking each leaf call's inputs against what the model gave that module."""

    def __init__(self, gm: fx.GraphModule, seen: dict[str, list]):
        super().__init__(gm)
        self.seen, self.calls = seen, {}
        self.extra_traceback = False  # fx's error decoration imports torch._inductor: seconds, for nothing

    def run_node(self, node: fx.Node):
        try:
            if node.op == "call_module" and node.target in self.seen:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                k = self.calls[node.target] = self.calls.get(node.target, -1) + 1
                recorded = self.seen[node.target]
                if k >= len(recorded) or not _same((args, kwargs), recorded[k]):
                    raise _Divergence(node)
            return super().run_node(node)
        except _Divergence:
            raise
        except Exception as err:
            raise _Divergence(node) from err


def _run(module: nn.Module, inputs, training: bool):
    modes = {m: m.training for m in module.modules()}  # each put back: a submodule may differ
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            module.train(training)
            with torch.no_grad():
                return module(*fresh_inputs(inputs))
    finally:
        for m, flag in modes.items():
            if m.training is not flag:  # nn.Module's __setattr__ is slow on 1000s of layers
                m.training = flag


class _Reference:
    """The user's model, run without changing it: in eval mode the model itself (under no_grad
    nothing in it changes), in train mode a copy reset before each run (statistics move)."""

    def __init__(self, module: nn.Module, inputs):
        self.module, self.inputs = module, inputs
        self._copy, self._state = None, None
        try:
            self.eval_output = _run(module, inputs, False)
        except Exception as err:
            if user_frame(err) is not None:
                raise model_raised(err) from err
            shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
            raise UserError(f"the model failed on its example input {shapes}: {one_line(err)}") from err

    def model(self, training: bool) -> nn.Module:
        if not training:
            return self.module
        if self._copy is None:
            self._copy = copy_module(self.module)
            self._state = {k: v.clone() for k, v in self._copy.state_dict().items()}
        self._copy.load_state_dict(self._state)
        return self._copy


def _run_graph(gm: fx.GraphModule, inputs, training: bool):
    state = {k: v.clone() for k, v in gm.state_dict().items()} if training else None
    try:
        return _run(gm, inputs, training)
    finally:
        if state is not None:
            gm.load_state_dict(state)


def _first_divergence(reference: _Reference, gm: fx.GraphModule, training: bool) -> fx.Node | None:
    """The node where `gm` first computes something else than the model (None: only the outputs
    differ): the first leaf call whose arguments differ from the module's in the model's own run,
    or the node that raises."""
    model = reference.model(training)
    seen: dict[str, list] = {}
    handles = []
    for path in {n.target for n in gm.graph.nodes if n.op == "call_module"}:

        def record(module, args, kwargs, path=path):
            # a copy: an in-place module (ReLU(inplace=True)) changes its input after this hook
            copied = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, (args, kwargs))
            seen[path].append(copied)

        try:
            handles.append(model.get_submodule(path).register_forward_pre_hook(record, with_kwargs=True))
            seen[path] = []
        except Exception:  # a TorchScript module takes no hooks: its calls go unchecked
            continue
    try:
        _run(model, reference.inputs, training)
    finally:
        for h in handles:
            h.remove()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    was_training = gm.training
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            gm.train(training)
            with torch.no_grad():
                _CompareLeafInputs(gm, seen).run(*reference.inputs)
    except _Divergence as found:
        return found.node
    finally:
        gm.load_state_dict(state)
        gm.train(was_training)
    return None


def _structure(graph: fx.Graph, root: nn.Module) -> list:
    """Each node as (op, target, args, kwargs), comparable between two traces. A tensor the code
    made from constants is named by the order fx stored it in (`_tensor_constant4` in one trace
    is `_tensor_constant5` in a second one of the same root) and compared by its values."""
    index = {n: i for i, n in enumerate(graph.nodes)}

    def norm(a):
        return ("node", index[a]) if isinstance(a, fx.Node) else repr(a)

    def target(n: fx.Node) -> str:
        if n.op == "get_attr" and re.fullmatch(r"_tensor_constant\d+", str(n.target)):
            value = getattr(root, n.target)
            return f"constant {value.dtype} {tuple(value.shape)} {hash(value.cpu().numpy().tobytes())}"
        return str(n.target)

    return [
        (n.op, target(n), repr(fx.node.map_aggregate(n.args, norm)), repr(fx.node.map_aggregate(n.kwargs, norm)))
        for n in graph.nodes
    ]


def _mode_is_only_the_flags(model: nn.Module) -> bool:
    """Whether switching `model`'s mode changes nothing that tracing reads but the `training`
    flags, which `InsertTracer` replaces by one graph value in either mode: then tracing in the
    other mode records this graph again, and need not be done. Not so where a class overrides
    train(), eval() or __setattr__ (which may set other state a forward reads), or keeps its flag
    elsewhere than in its __dict__ (TorchScript, a property), where the tracer cannot replace it."""
    for m in model.modules():
        cls = type(m)
        if (
            cls.train is not nn.Module.train
            or cls.eval is not nn.Module.eval
            or cls.__setattr__ is not nn.Module.__setattr__
        ):
            return False
        if not isinstance(m.__dict__.get("training"), bool):
            return False
    return True


def _graph_difference(model: nn.Module, gm: fx.GraphModule, leaves, functions, example_inputs) -> fx.Node | None:
    """The first node at which tracing in the other mode records another graph."""
    if _mode_is_only_the_flags(model):
        return None
    was_training = model.training
    try:
        other = _graph(model.train(not was_training), leaves, functions, example_inputs)
    finally:
        model.train(was_training)
    mine, theirs = _structure(gm.graph, gm), _structure(other, model)
    nodes = list(gm.graph.nodes)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return nodes[i]
    return None if len(mine) == len(theirs) else nodes[min(len(mine), len(theirs)) - 1]


def _check(reference: _Reference, model, gm, leaves, functions) -> tuple[fx.Node | None, str] | None:
    """None when `gm` is the model; else (the node to blame or None, what differed)."""
    inputs = reference.inputs
    was_training = gm.training
    try:
        gm.eval()
        with torch.no_grad():
            recorder = _RecordShapes(gm)
            recorder.extra_traceback = False
            got = recorder.run(*fresh_inputs(inputs))  # shapes and the eval output in one run
    except Exception as err:  # said with its cause: "fails" alone left the user nothing to look at
        return _first_divergence(reference, gm, False), f"the traced graph fails on the example input ({one_line(err)})"
    finally:
        gm.train(was_training)
    if not _same(got, reference.eval_output):
        return _first_divergence(reference, gm, False), "the traced graph's eval-mode output differs"
    node = _graph_difference(model, gm, leaves, functions, inputs)
    if node is not None:
        return node, "tracing in train and in eval mode records different graphs"
    if any(n.op == "get_attr" and n.target == "training" for n in gm.graph.nodes):
        # The graph reads the mode: train mode, under one seed, must drop what the model drops.
        try:
            want = _run(reference.model(True), inputs, True)
        except Exception:
            return None  # train mode impossible on this input (a BatchNorm on one value)
        try:
            got = _run_graph(gm, inputs, True)
        except Exception:
            got = None
        if got is None or not _same(got, want):
            return _first_divergence(reference, gm, True), "the traced graph's train-mode output differs"
    return None


def trace_for_insert(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[fx.GraphModule, list[Opaque]]:
    """A faithful GraphModule of a copy of `module` with shapes recorded, and the submodules kept
    opaque. Raises TraceFailed when no partial trace is faithful."""
    name = type(module).__name__
    hooked = hooks_of(module, global_hooks=False)
    if hooked:  # torch.fx runs the root's forward, never its __call__: the hooks would be lost
        raise TraceFailed(f"{name} itself has a {' and a '.join(hooked)}, which a traced graph cannot keep")
    refuse_hooks_on_the_model(module)
    reference = _Reference(module, example_inputs)
    model = copy_module(module)
    leaves: dict[str, Opaque] = {}
    functions: dict[int, object] = {}
    opaque_functions: dict[str, Opaque] = {}
    for _ in range(MAX_LEAVES + 1):
        try:
            gm = _trace(model, list(leaves), list(functions.values()), example_inputs)
        except Exception as err:  # fx raises TraceError, TypeError, AttributeError... for one cause
            where = user_frame(err)
            at = f" at {where.filename}:{where.lineno} ({(where.line or '').strip()})" if where else ""
            function = _failing_function(err)
            if function is not None and id(function) not in functions:
                # A helper such as drop_connect(x, p, training): one call in the graph, run with the
                # real values (the mode included), keeps the module around it traceable.
                functions[id(function)] = function
                label = _function_label(function)
                leaves_reason = f"torch.fx cannot trace it{at}: {one_line(err)}"
                opaque_functions[label] = Opaque(label, "function", leaves_reason)
                continue
            path = getattr(err, "_bngraph_module", None)
            if path is None or path in leaves:
                raise TraceFailed(f"torch.fx could not trace {name}{at}: {one_line(err)}") from err
            kind = type(model.get_submodule(path)).__name__
            leaves[path] = Opaque(path, kind, f"torch.fx cannot trace its forward{at}: {one_line(err)}")
            continue
        problem = _check(reference, model, gm, list(leaves), list(functions.values()))
        if problem is None:
            gm.train(model.training)
            used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
            called = {_function_label(getattr(t, "__wrapped__", t)) for n in gm.graph.nodes if n.op == "call_function"
                      for t in [n.target]
                      if id(t) in functions or getattr(t, "__wrapped__", None) is not None and id(t.__wrapped__) in functions}
            return gm, [o for p, o in leaves.items() if p in used] + [
                o for p, o in opaque_functions.items() if p in called
            ]
        node, what = problem
        path = _culprit(node, leaves) if node is not None else None
        if path is None:
            where = f" (at node {node.name})" if node is not None else ""
            raise TraceFailed(f"torch.fx traced {name} unfaithfully: {what}{where}, in its top-level forward")
        kind = type(model.get_submodule(path)).__name__
        leaves[path] = Opaque(path, kind, f"its traced code computes something else than it does: {what}")
    raise TraceFailed(f"torch.fx could not trace {name}: still failing after {MAX_LEAVES} submodules kept opaque")


# torch.nn leaves that run no elementwise nonlinearity: no need to look inside them.
_NO_NONLINEARITY = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
    nn.RMSNorm, nn.LocalResponseNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd,
    nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.Unflatten, nn.Embedding, nn.EmbeddingBag,
    nn.Upsample, nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Softmax,
    nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention,
)


def _containing(path: str, leaves: dict[str, nn.Module]) -> str | None:
    return next((leaf for leaf in leaves if path == leaf or path.startswith(leaf + ".")), None)


def _why_opaque(path: str, module: nn.Module, opaque: dict[str, Opaque]) -> str:
    if path in opaque:
        return f"inside {path} ({opaque[path].type}), kept opaque: {opaque[path].reason}"
    if isinstance(module, torch.jit.ScriptModule):
        return f"inside {path}, a TorchScript module, which runs as one call"
    if hooked := hooks_of(module, global_hooks=False):  # `trace.must_stay_whole`: its hooks run only on its call
        return f"inside {path} ({type(module).__name__}), kept as one call so that its {' and '.join(hooked)} still runs"
    return f"inside {path} ({type(module).__name__}), a torch.nn layer torch.fx does not trace into"


def nonlinearities_not_handled(
    gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], opaque: Sequence[Opaque] = ()
) -> list[dict]:
    """Every nonlinearity `gm` runs inside a leaf module (one call in the graph, so insert never
    saw it): found by running `gm` once with every torch function and module call recorded, and
    for TorchScript leaves, which run in C++, by reading their graphs."""
    leaves = {
        n.target: gm.get_submodule(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module"
        and not isinstance(gm.get_submodule(n.target), (*ACTIVATION_MODULES, *_NO_NONLINEARITY))
    }
    by_path = {o.module: o for o in opaque}
    found = [
        {"module": path, "nonlinearity": "sigmoid/tanh gates", "input_normalized": None,
         "reason": f"inside {path} ({type(m).__name__}): the gates run inside torch's fused recurrent op"}
        for path, m in leaves.items() if isinstance(m, nn.RNNBase)
    ]
    leaves = {p: m for p, m in leaves.items() if not isinstance(m, nn.RNNBase)}
    if not leaves:
        return found
    rows = []
    record = record_run(gm, example_inputs)
    for call in record.module_calls:
        # Inside a leaf by its path, or by where it ran: an activation module the model also
        # hands to a block kept whole (`Blk(self.act)`) runs inside it under its own path.
        leaf = _containing(call.path, leaves) or next(filter(None, (_containing(p, leaves) for p in call.within)), None)
        if leaf is not None and call.path != leaf and isinstance(call.module, ACTIVATION_MODULES):
            rows.append((call.path, type(call.module).__name__, leaf, call.input))
    for fn in record.functional:
        leaf = _containing(fn.module, leaves) if fn.module else None
        if leaf is not None:
            rows.append((fn.module, fn.op, leaf, fn.input))
    found += [
        {
            "module": path,
            "nonlinearity": kind,
            "reason": _why_opaque(leaf, leaves[leaf], by_path),
            "input_normalized": normalizer_of(value) is not None,
        }
        for path, kind, leaf, value in rows
    ]
    for leaf, module in leaves.items():
        if isinstance(module, torch.jit.ScriptModule):
            for node in module.inlined_graph.nodes():
                kind = node.kind().removeprefix("aten::").rstrip("_")
                if node.kind().startswith("aten::") and kind in NONLINEARITIES:
                    found.append({"module": leaf, "nonlinearity": kind, "reason": _why_opaque(leaf, module, by_path),
                                  "input_normalized": None})
    return found


__all__ = ["InsertTracer", "MAX_LEAVES", "Opaque", "kept_whole_modules", "nonlinearities_not_handled", "trace_for_insert"]
