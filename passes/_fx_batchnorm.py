"""BatchNorms in a traced graph, read as fixed statistics, and the transposes around them.

A BatchNorm is a call of a torch BatchNorm module or of `F.batch_norm`; either way it normalizes
axis 1 of its input. It is a fixed affine map only in eval mode with running statistics that are
constants of the model, and only without hooks, which would no longer run once it is folded
away; `read_batch_norm` says why not otherwise. Statistics that are NaN or
infinite are the user's to fix, so they raise a `UserError` naming the layer. Reads only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from bngraph.errors import UserError
from bngraph.passes._bn_affine import PRECISION_LOSS_GAIN, BatchNormStats, rounding_gain
from bngraph.passes._fx_effects import hook_refusal
from bngraph.passes._fx_meta import tensor_dtype, tensor_shape
from bngraph.passes._op_kinds import op_label
from bngraph.passes.base import PassResult, Probe, Skip

_BATCHNORM = nn.modules.batchnorm._BatchNorm
# F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
_BN_ARGS = {"input": 0, "running_mean": 1, "running_var": 2, "weight": 3, "bias": 4, "training": 5, "eps": 7}
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "eps": 1e-5}
# Methods and functions that only reorder axes: output axis j holds input axis perm[j].
_PERMUTE_METHODS = {"transpose", "swapaxes", "swapdims", "permute", "contiguous"}
_PERMUTE_FUNCTIONS = {torch.transpose: "transpose", torch.swapaxes: "swapaxes", torch.swapdims: "swapdims",
                      torch.permute: "permute"}


@dataclass
class BatchNormSite:
    node: fx.Node
    label: str  # the module path, or the node name for F.batch_norm
    input: fx.Node
    stats: BatchNormStats | None  # None when `refusal` says why it is not a fixed map
    refusal: str | None = None


def arg(node: fx.Node, index: int, name: str, default=None):
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def attr_value(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def is_batch_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _BATCHNORM)
    return node.op == "call_function" and node.target is F.batch_norm and _reads_the_inputs(node)


def _reads_the_inputs(node: fx.Node) -> bool:
    """Whether `node`'s first argument is computed from the model's inputs: an F.batch_norm of a
    layer's weight (HuggingFace BiT's weight standardization, training=True) normalizes no batch,
    and is no BatchNorm to fold, keep or refuse; its value is the same whatever the input."""
    first = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(first, fx.Node):
        return True  # taken for a BatchNorm, as before this question was asked
    seen, todo = set(), [first]
    while todo:
        current = todo.pop()
        if current.op == "placeholder":
            return True
        if current not in seen:
            seen.add(current)
            todo += current.all_input_nodes
    return False


def read_batch_norm(node: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> BatchNormSite | None:
    """`node` as a BatchNorm site, or None if it is not a BatchNorm."""
    if not is_batch_norm(node, modules):
        return None
    if node.op == "call_module":
        bn = modules[node.target]
        site = BatchNormSite(node, node.target, arg(node, 0, "input"), None)
        if bn.training:
            site.refusal = "it is in training mode, normalizing with each batch's statistics"
        elif reason := hook_refusal(node.target, bn, "folding it away"):
            site.refusal = reason
        elif bn.running_mean is None or bn.running_var is None:
            site.refusal = ("it has no running statistics (track_running_stats=False), so it normalizes "
                            "with each batch's own statistics even in eval mode")
        else:
            site.stats = BatchNormStats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    else:
        site = BatchNormSite(node, node.name, arg(node, 0, "input"), None)
        site.refusal, site.stats = _read_functional(node, gm)
    if not isinstance(site.input, fx.Node):
        site.refusal, site.stats = "its input is a constant, not a tensor the model computes", None
    if site.stats is not None:
        site.refusal = _dtype_refusal(site)
        _check_finite(site)
    if site.refusal is None and tensor_shape(node) is None:
        site.refusal = "no shape was recorded for it (trace with example inputs)"
    if site.refusal is not None:
        site.stats = None
    return site


def batch_statistics(module: nn.Module) -> list[tuple[str, str]]:
    """(name, why) for each BatchNorm left in `module` (a traced graph or a model) that normalizes
    with each batch's statistics whatever its mode: a BN module without running statistics, and in
    a graph, F.batch_norm called with training=True. (One the model keeps training in eval mode
    shows only when it runs: `bngraph.fold.batch_norms_training_in_eval`.)"""
    left = []
    for path, bn in module.named_modules():
        if isinstance(bn, _BATCHNORM) and (bn.running_mean is None or bn.running_var is None):
            left.append((path, "it has no running statistics (track_running_stats=False), so it normalizes "
                               "with each batch's own statistics even in eval mode"))
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target is F.batch_norm and _reads_the_inputs(node):
                refusal, _ = _read_functional(node, module)
                if arg(node, _BN_ARGS["training"], "training", _BN_DEFAULTS["training"]) is not False:
                    left.append((node.name, refusal))
    return left


def fixed_batch_norms(gm: fx.GraphModule, result: PassResult, *, backwards: bool = False) -> Iterator[BatchNormSite]:
    """Each BatchNorm of `gm` that is a fixed affine map, in graph order (or from the output
    backwards); every other BatchNorm goes into `result.skipped` with the reason."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    for node in reversed(nodes) if backwards else nodes:
        site = read_batch_norm(node, gm, modules)
        if site is None:
            continue
        if site.refusal:
            result.skipped.append(Skip(node.name, site.refusal))
            continue
        yield site


def flag_rounding(result: PassResult, row: dict, site: BatchNormSite, probe: Probe) -> bool:
    """For a fold that magnifies float32 rounding past PRECISION_LOSS_GAIN: its gain in the
    report's `row`, and where the pipeline measures its error (`probe`). Whether it was flagged."""
    gain = rounding_gain(site.stats)
    if gain <= PRECISION_LOSS_GAIN:
        return False
    row["rounding_gain"] = gain
    result.probes[row["node"]] = probe
    return True


def _read_functional(node: fx.Node, gm: fx.GraphModule) -> tuple[str | None, BatchNormStats | None]:
    training = arg(node, _BN_ARGS["training"], "training", _BN_DEFAULTS["training"])
    if training is not False:
        return "it calls F.batch_norm with training=True, normalizing with each batch's statistics", None
    values = {}
    for name in ("running_mean", "running_var", "weight", "bias"):
        value = arg(node, _BN_ARGS[name], name, _BN_DEFAULTS.get(name))
        constant = attr_value(gm, value.target) if isinstance(value, fx.Node) and value.op == "get_attr" else None
        if value is None and name in ("weight", "bias"):
            values[name] = None
        elif value is None:
            return "it has no running statistics, so it normalizes with each batch's own statistics", None
        elif isinstance(constant, torch.Tensor):
            values[name] = constant
        else:
            where = f"by {value.name}" if isinstance(value, fx.Node) else "outside the model"
            return f"its {name} is computed {where}, not a constant of the model", None
    eps = arg(node, _BN_ARGS["eps"], "eps", _BN_DEFAULTS["eps"])
    if not isinstance(eps, (int, float)):
        return "its eps is computed in the graph, not a constant", None
    return None, BatchNormStats(values["running_mean"], values["running_var"], values["weight"], values["bias"], float(eps))


def _dtype_refusal(site: BatchNormSite) -> str | None:
    for name, tensor in site.stats.named().items():
        if tensor is not None and not tensor.is_floating_point():
            return f"its {name} is {tensor.dtype}, not floating point"
    dtype = tensor_dtype(site.input)
    if dtype is not None and not dtype.is_floating_point:
        return f"its input is {dtype}, not floating point"
    return None


def _check_finite(site: BatchNormSite) -> None:
    stats, named = site.stats, site.stats.named()
    tensors = [t.detach().reshape(-1) for t in named.values() if t is not None]
    # One check for the common case (a NaN fails the comparison too); the details only on failure.
    if bool(torch.isfinite(torch.cat(tensors)).all()) and float(stats.running_var.min()) + stats.eps > 0:
        return
    for name, tensor in named.items():
        if tensor is not None and not torch.isfinite(tensor).all():
            bad = "NaN" if torch.isnan(tensor).any() else "infinite values"
            raise UserError(f"BatchNorm {site.label!r} has {bad} in its {name}: re-estimate its statistics "
                            "(bngraph recalibrate) or load intact weights before folding")
    raise UserError(f"BatchNorm {site.label!r} has running_var + eps <= 0: its statistics are broken")


def permutation(node: fx.Node) -> list[int] | None:
    """The axis order of a transpose/permute/contiguous node (output axis j = input axis perm[j])."""
    if node.op == "call_method" and node.target in _PERMUTE_METHODS:
        name = node.target
    elif node.op == "call_function" and node.target in _PERMUTE_FUNCTIONS:
        name = _PERMUTE_FUNCTIONS[node.target]
    else:
        return None
    shape = tensor_shape(node)
    if shape is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    rank, dims = len(shape), [*node.args[1:], *node.kwargs.values()]
    perm = list(range(rank))
    if name == "contiguous":
        return perm
    if name == "permute":
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        return [d % rank for d in dims]
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return None
    a, b = (d % rank for d in dims)
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def axis_at_source(node: fx.Node, axis: int) -> tuple[fx.Node, int, list[fx.Node]]:
    """Follow `axis` of `node` back through transposes: (the node before them, its axis, them)."""
    chain = []
    while (perm := permutation(node)) is not None:
        chain.append(node)
        node, axis = node.args[0], perm[axis]
    return node, axis, chain


def axis_at_user(node: fx.Node, axis: int) -> tuple[fx.Node, int, list[fx.Node]]:
    """Follow `axis` of `node` forward through sole-user transposes: (the last of them, its axis, them)."""
    chain = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        perm = permutation(user)
        if perm is None or user.args[0] is not node:
            break
        chain.append(user)
        node, axis = user, perm.index(axis)
    return node, axis, chain


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node as a reason names it: 'pool (MaxPool2d)', 'add (add)', 'the model input x'."""
    if node.op == "placeholder":
        return f"the model input {node.name}"
    if node.op == "output":
        return "the model's output"
    if node.op == "get_attr":
        return f"the constant {node.target}"
    return f"{node.name} ({op_label(gm, node)})"
