"""What a traced node does besides returning a value: in-place mutation, hooks, opaque code.

torch.fx's `eliminate_dead_code` deletes any node without users unless fx knows it is impure,
and fx knows only a few ops (aten ops with a mutable schema, random ops). A user's in-place
statement, `out.add_(x)`, `scores.masked_fill_(mask, -inf)`, `F.relu(x, inplace=True)`, a
`ReLU(inplace=True)` module or `x[i] = v`, returns a value nobody reads: deleting it changes
what the model computes. `is_impure_node` is the rule every pass that removes nodes passes to
`eliminate_dead_code`, and `mutations_of` finds the statements that write into a tensor through
any of its views, which decide whether a BatchNorm can move across them. Reads only.
"""

from __future__ import annotations

import inspect
import operator

import torch
from torch import fx, nn

# Python's augmented assignments: in place on a tensor (`out += x`; fx usually records `add`).
_AUGMENTED = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
              operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
              operator.ixor, operator.ilshift, operator.irshift}
_STORES = {operator.setitem, operator.delitem, setattr, delattr}
# Methods that act on the world or the autograd graph rather than return a value.
_EFFECT_METHODS = {"__setitem__", "backward", "register_hook", "retain_grad", "record_stream", "set_"}
# Methods and functions whose result shares memory with their first argument: writing into the
# result writes into the input.
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "T", "mT", "select",
                 "narrow", "expand", "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten", "unfold",
                 "as_strided", "diagonal", "movedim", "moveaxis", "swapaxes", "swapdims", "split", "chunk",
                 "unbind", "tensor_split", "detach", "contiguous", "real", "imag", "__getitem__", "type_as",
                 "to", "float", "double", "half", "bfloat16", "data"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.select, torch.narrow,
                   torch.squeeze, torch.unsqueeze, torch.flatten, torch.movedim, torch.swapaxes, torch.swapdims,
                   torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.diagonal, torch.detach,
                   torch.t, torch.as_strided}
_HOOK_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
               ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


def _is_inplace_name(name: str) -> bool:
    """`add_`, `relu_`, `masked_fill_`: torch's in-place naming (dunder names are not)."""
    return name.endswith("_") and not name.startswith("__") and name != "_"


def _inplace_flag(target, node: fx.Node) -> bool:
    """A function called with `inplace=True` (F.relu, F.dropout...) or `out=` a tensor."""
    if node.kwargs.get("inplace") is True or isinstance(node.kwargs.get("out"), fx.Node):
        return True
    try:
        parameters = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return False
    if "inplace" in parameters and parameters.index("inplace") < len(node.args):
        return node.args[parameters.index("inplace")] is True
    return False


def _is_torch_function(target) -> bool:
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "operator", "math", "builtins", "_operator") or isinstance(
        target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
    )


def mutates_first_argument(node: fx.Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """Whether `node` writes into the tensor of its first argument."""
    if node.op == "call_method":
        return _is_inplace_name(node.target) or node.target == "__setitem__"
    if node.op == "call_function":
        target = node.target
        if target in _AUGMENTED or target is operator.setitem:
            return True
        if isinstance(target, torch._ops.OpOverload):
            return any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments[:1])
        return _is_inplace_name(getattr(target, "__name__", "")) or _inplace_flag(target, node)
    if node.op == "call_module":
        root = node.graph.owning_module
        module = modules.get(node.target) if modules is not None else None
        if module is None and root is not None:
            module = root.get_submodule(node.target)
        return getattr(module, "inplace", False) is True
    return False


def hooks_of(module: nn.Module, *, global_hooks: bool = True) -> list[str]:
    """The kinds of hook `module` runs when called ('forward hook', ...), global ones included."""
    kinds = [kind for attr, kind in _HOOK_KINDS if getattr(module, attr, None)]
    return kinds + global_hook_kinds() if global_hooks else kinds


def global_hook_kinds() -> list[str]:
    """The kinds of hook registered for every module (`register_module_forward_hook`...)."""
    globals_ = nn.modules.module
    return [kind for attr, kind in (("_global_forward_pre_hooks", "global forward pre-hook"),
                                    ("_global_forward_hooks", "global forward hook"),
                                    ("_global_backward_pre_hooks", "global backward pre-hook"),
                                    ("_global_backward_hooks", "global backward hook"))
            if getattr(globals_, attr, None)]


def hook_on_the_model(root: nn.Module) -> str | None:
    """'path's NAME' for a hook on a submodule of `root` that is the model's own method, or a
    function holding the model (a feature extractor's `self.feats[name] = out`), or None: a
    written model rebuilds that submodule with the model's code, whose hook would then update
    the model built for it, not the one written."""
    for path, module in root.named_modules():
        if not path:
            continue
        for attr, _ in _HOOK_KINDS:
            for hook in (getattr(module, attr, None) or {}).values():
                hook = getattr(hook, "func", hook)  # functools.partial
                cells = []
                for cell in getattr(hook, "__closure__", None) or ():
                    try:
                        cells.append(cell.cell_contents)
                    except ValueError:  # an empty cell
                        continue
                if getattr(hook, "__self__", None) is root or any(c is root for c in cells):
                    return f"{path}'s {getattr(hook, '__qualname__', type(hook).__name__)}"
    return None


def hook_refusal(label: str, module: nn.Module, change: str) -> str | None:
    """Why a fold must not go through `module` because of its hooks, or None.

    A hook is the user's code: it sees the module's input and output and may read its weights.
    A fold changes all three, and removes the BN's call altogether, so no hook stays exact."""
    kinds = hooks_of(module)
    if not kinds:
        return None
    return f"{label} has a {' and a '.join(dict.fromkeys(kinds))}; {change} would change what it sees"


# The guards bngraph's tracer writes into a graph whose forward branched on a dtype or on shapes:
# they read a value's dtype or a shape only, which folding a BatchNorm into the layer that made
# the value keeps.
_GUARDS = frozenset({("bngraph.trace", "check_input_dtype"), ("bngraph.trace", "check_traced_dtype"),
                     ("bngraph.trace", "check_traced_shapes"), ("bngraph.trace", "check_traced_length")})


def is_guard(node: fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and (getattr(target, "__module__", None), getattr(target, "__name__", None)) in _GUARDS


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read `node`'s values: its users but the guards."""
    return [u for u in node.users if not is_guard(u)]


def is_impure_node(node: fx.Node) -> bool:
    """Whether removing `node` when nobody reads its value could change what the model does."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "get_attr":
        return False
    modules = None
    if node.op == "call_module":
        root = node.graph.owning_module
        module = root.get_submodule(node.target) if root is not None else None
        if module is None:
            return True
        cls = type(module)
        # A module from outside torch.nn that fx kept as a leaf (or a TorchScript one) runs code
        # we cannot see; hooks and inplace=True change what a call does beyond its value.
        if not cls.__module__.startswith("torch.nn.") or isinstance(module, torch.jit.ScriptModule):
            return True
        if hooks_of(module) or getattr(module, "_is_impure", False):
            return True
        modules = {node.target: module}
    elif node.op == "call_method":
        if node.target in _EFFECT_METHODS:
            return True
    elif node.op == "call_function":
        if node.target in _STORES or node.target in _AUGMENTED:
            return True
        if not _is_torch_function(node.target):
            return True  # a user function kept as one call (torch.fx.wrap): it may do anything
        try:
            if node.is_impure():
                return True
        except Exception:  # fx's own rule can fail on odd targets: keep the node
            return True
    return mutates_first_argument(node, modules)


def aliases_of(node: fx.Node) -> set[fx.Node]:
    """`node` and every node that may share its memory through views (`x.view`, `x[:, 1]`,
    `x.transpose`, the result of an in-place op, which is its input)."""
    seen, todo = {node}, [node]
    while todo:
        current = todo.pop()
        for user in current.users:
            if user in seen or not user.args or user.args[0] is not current:
                continue
            if _is_view(user) or mutates_first_argument(user):
                seen.add(user)
                todo.append(user)
    return seen


def _is_view(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in _VIEW_FUNCTIONS
    )


def base_of(node: fx.Node) -> fx.Node:
    """The node whose tensor `node` is a view of (or the result of writing into), or `node`."""
    while (_is_view(node) or mutates_first_argument(node)) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def mutations_of(node: fx.Node, modules: dict[str, nn.Module] | None = None) -> list[fx.Node]:
    """The nodes that write into `node`'s memory: into it, its base tensor or any view of them."""
    found = []
    for alias in aliases_of(base_of(node)):
        found += [u for u in alias.users if u.args and u.args[0] is alias and mutates_first_argument(u, modules)]
    return sorted(set(found), key=_position(node.graph))


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


__all__ = [
    "aliases_of",
    "base_of",
    "hook_refusal",
    "hooks_of",
    "is_impure_node",
    "mutates_first_argument",
    "mutations_of",
]
