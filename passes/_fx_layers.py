"""Conv, ConvTranspose and Linear calls in a traced graph, and writing folded weights back.

A layer is a module call (`self.conv(x)`) or a function call (`F.conv2d(x, self.w)`, which is
also what a Conv2d subclass with its own forward traces into). A fold needs the same facts from
either, kept in `Layer`: constant weight and bias, groups, zero padding, and the feature axis:
1 for a conv on a batched input, the last one for a linear. Weights that another node also uses
(a module called twice, tied parameters) are never changed in place: the site gets a copy.
A layer with hooks is refused (the hooks would see other values). A reparametrized weight
(`parametrizations.weight_norm`, `spectral_norm`, classic `weight_norm` with its pre-hook) is
read as the eval-mode value it computes, and a fold makes it a plain parameter, which it reports.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from bngraph.passes._fx_batchnorm import arg, attr_value
from bngraph.passes._fx_effects import hook_refusal

# Positions in the functional signatures, e.g. F.conv2d(input, weight, bias, stride, padding, ...).
_CONV = {"weight": 1, "bias": 2, "padding": 4, "dilation": 5, "groups": 6}
_CONV_T = {"weight": 1, "bias": 2, "padding": 4, "groups": 6, "dilation": 7}
_LINEAR = {"weight": 1, "bias": 2}
FUNCTIONS = {
    F.conv1d: ("conv", _CONV), F.conv2d: ("conv", _CONV), F.conv3d: ("conv", _CONV),
    F.conv_transpose1d: ("conv_transpose", _CONV_T), F.conv_transpose2d: ("conv_transpose", _CONV_T),
    F.conv_transpose3d: ("conv_transpose", _CONV_T), F.linear: ("linear", _LINEAR),
}
MODULES = (
    (nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.Conv3d, "conv"), (nn.ConvTranspose1d, "conv_transpose"),
    (nn.ConvTranspose2d, "conv_transpose"), (nn.ConvTranspose3d, "conv_transpose"), (nn.Linear, "linear"),
)


@dataclass
class Layer:
    node: fx.Node
    kind: str  # "conv" | "conv_transpose" | "linear"
    label: str  # the module path, or the node name for a function call
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    zero_padding: bool  # pads its input with zeros (which a BN before it would have shifted)
    module: nn.Module | None = None
    positions: dict[str, int] | None = None  # of a function call's arguments

    def feature_axis(self, rank: int) -> int | None:
        """The features' axis in its input and output of rank `rank`; None for an unbatched conv."""
        if self.kind == "linear":
            return rank - 1
        return 1 if rank == self.weight.ndim else None

    def axis_mismatch(self, shape: tuple[int, ...] | None, axis: int, side: str) -> str | None:
        """Why `axis` of this layer's `side` ("input"/"output") of `shape` is not its feature axis."""
        if shape is None:
            return f"no shape was recorded for the {side} of {self.label}"
        features = self.feature_axis(len(shape))
        if features is None:
            return f"{self.label} runs on an unbatched input, so axis 1 of its {side} is not its channels"
        if axis != features:
            return f"it normalizes axis {axis} of the {shape} {side} of {self.label}, whose features are on axis {features}"
        return None


def as_layer(node: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> Layer | str | None:
    """`node` as a Layer; a sentence if it is a conv/linear that cannot be folded; else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        kind = next((k for cls, k in MODULES if isinstance(module, cls) and type(module).forward is cls.forward), None)
        if kind is None:
            return None
        if reason := hook_refusal(node.target, _without_reparametrizing_hooks(module), "folding a BatchNorm into it"):
            return reason
        groups = getattr(module, "groups", 1)
        zero = kind == "conv" and module.padding_mode == "zeros" and _pads(module.padding, module.kernel_size, module.dilation)
        weight, bias = (_eval_value(module, name) for name in ("weight", "bias"))
        layer = Layer(node, kind, node.target, weight, bias, groups, zero, module=module)
    elif node.op == "call_function" and node.target in FUNCTIONS:
        kind, positions = FUNCTIONS[node.target]
        tensors = {}
        for name in ("weight", "bias"):
            value = arg(node, positions[name], name)
            constant = attr_value(gm, value.target) if isinstance(value, fx.Node) and value.op == "get_attr" else None
            if isinstance(constant, torch.Tensor):
                tensors[name] = constant
            elif value is None and name == "bias":
                tensors[name] = None
            else:
                where = f"by {value.name}" if isinstance(value, fx.Node) else "outside the model"
                return f"the {name} of {node.name} is computed {where}, not a constant of the model"
        options = {name: arg(node, positions[name], name, default) if name in positions else default
                   for name, default in (("groups", 1), ("padding", 0), ("dilation", 1))}
        groups, padding, dilation = options.values()
        if not all(isinstance(v, (int, str, tuple, list)) for v in (groups, padding, dilation)):
            return f"the groups, padding or dilation of {node.name} are computed in the graph"
        kernel = tuple(tensors["weight"].shape[2:])
        zero = kind == "conv" and _pads(padding, kernel, dilation)
        layer = Layer(node, kind, node.name, tensors["weight"], tensors["bias"], groups, zero, positions=positions)
    else:
        return None
    for name, tensor in (("weight", layer.weight), ("bias", layer.bias)):
        if tensor is not None and not tensor.is_floating_point():
            return f"the {name} of {layer.label} is {tensor.dtype}, not floating point"
    return layer


def _norm_hooks(module: nn.Module) -> dict:
    """Classic `torch.nn.utils.weight_norm`/`spectral_norm`: pre-hooks that recompute a weight."""
    return {k: h for k, h in module._forward_pre_hooks.items() if isinstance(h, (WeightNorm, SpectralNorm))}


class _without_reparametrizing_hooks:
    """`module` as the hook check sees it: the classic norms' pre-hooks are reparametrizations,
    which a fold removes (see `make_plain`), not user code."""

    def __init__(self, module: nn.Module):
        norms = _norm_hooks(module)
        for attr in ("_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
            setattr(self, attr, getattr(module, attr, None))
        self._forward_pre_hooks = {k: h for k, h in module._forward_pre_hooks.items() if k not in norms}


def _eval_value(module: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor a forward in eval mode uses for `module.<name>`."""
    for hook in _norm_hooks(module).values():
        if hook.name == name:  # the attribute holds the last forward's value: recompute it
            with torch.no_grad():
                if isinstance(hook, SpectralNorm):
                    return hook.compute_weight(module, do_power_iteration=False)
                return hook.compute_weight(module)
    return getattr(module, name)  # a parametrization computes it on access, in the module's mode


def make_plain(module: nn.Module) -> str | None:
    """Turn reparametrized weights into plain parameters holding their current value; say which."""
    removed = []
    if parametrize.is_parametrized(module):
        # Not torch's remove_parametrizations: it deletes the property from the class, which the
        # model this graph was copied from shares, and breaks it. The injected class derives
        # from the layer's own, so the instance goes back to that.
        with torch.no_grad():
            values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
        for name in values:
            kinds = "+".join(type(p).__name__.lstrip("_") for p in module.parametrizations[name])
            removed.append(f"{kinds} on {name}")
        module.__class__ = type(module).__bases__[0]
        del module._modules["parametrizations"]
        for name, value in values.items():
            module.register_parameter(name, nn.Parameter(value))
    for key, hook in _norm_hooks(module).items():
        if isinstance(hook, SpectralNorm):
            torch.nn.utils.remove_spectral_norm(module, hook.name)
        else:
            torch.nn.utils.remove_weight_norm(module, hook.name)
        removed.append(f"{type(hook).__name__} on {hook.name}")
    for name in ("weight", "bias"):  # under no_grad, torch leaves the value as a plain tensor
        value = getattr(module, name, None)
        if removed and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            delattr(module, name)
            module.register_parameter(name, nn.Parameter(value.detach().clone()))
    return f"removed its {', '.join(removed)}: the folded weights are plain parameters" if removed else None


def _pads(padding, kernel: tuple[int, ...], dilation) -> bool:
    """Whether a conv pads its input with zeros at all."""
    if isinstance(padding, str):  # "valid" pads nothing; "same" pads what the kernel overhangs
        dilation = dilation if isinstance(dilation, (tuple, list)) else (dilation,) * len(kernel)
        return padding == "same" and any(d * (k - 1) for k, d in zip(kernel, dilation))
    return any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


class TensorUses:
    """Which compute nodes use each parameter or buffer: a layer's own weights versus shared ones."""

    def __init__(self, gm: fx.GraphModule, modules: dict[str, nn.Module]):
        self._users: dict[int, set[fx.Node]] = defaultdict(set)
        self._alive: list[torch.Tensor] = []  # held so that no id is reused while we key on it
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in modules:
                module = modules[node.target]
                self._add([module], [node])  # a module called twice shares whatever it computes
                if module._modules:  # a leaf with parts (MultiheadAttention): everything it holds
                    self._add([*module.parameters(), *module.buffers()], [node])
                else:  # the common case, without walking the module tree
                    self._add([t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None], [node])
            elif node.op == "get_attr":
                value = attr_value(gm, node.target)
                if isinstance(value, torch.Tensor):
                    self._add([value], node.users)

    def _add(self, tensors, nodes) -> None:
        for tensor in tensors:
            self._alive.append(tensor)
            self._users[id(tensor)].update(nodes)

    def sharers(self, layer: Layer) -> list[str]:
        others = set()
        for tensor in (layer.module, layer.weight, layer.bias):
            if tensor is not None:
                others |= self._users.get(id(tensor), set()) - {layer.node}
        return sorted(n.name for n in others)

    def release(self, layer: Layer) -> None:
        """`layer.node` no longer uses the tensors `layer` was read with."""
        for tensor in (layer.module, layer.weight, layer.bias):
            if tensor is not None:
                self._users.get(id(tensor), set()).discard(layer.node)


def write_weights(gm, layer: Layer, weight, bias, uses: TensorUses, modules: dict[str, nn.Module],
                  bn_bias: torch.Tensor | None = None) -> str | None:
    """Give `layer` the folded weight and bias, in a copy if it shares them; say so if it did.

    Each keeps the kind (parameter or buffer) and trainability of the tensor it replaces; a bias
    the layer lacked, those of `bn_bias` (the BN's beta, which it comes from) where there is one."""
    sharers = uses.sharers(layer)
    node, like = layer.node, layer.weight
    new_bias_like = bn_bias if bn_bias is not None else like
    if layer.module is not None:
        module = layer.module
        if sharers:
            module = copy.deepcopy(module)
            parent, _, name = node.target.rpartition(".")
            node.target = ".".join(filter(None, [parent, free_name(gm.get_submodule(parent), f"{name}_folded")]))
            gm.add_submodule(node.target, module)
            modules[node.target] = module
        plain = make_plain(module)
        _store(module, "weight", weight, module.weight)
        _store(module, "bias", bias, module.bias if module.bias is not None else new_bias_like)
    else:
        for name, value in (("weight", weight), ("bias", bias)):
            current = arg(node, layer.positions[name], name)
            if current is not None and not sharers:
                owner, _, attr = current.target.rpartition(".")
                _store(gm.get_submodule(owner), attr, value, attr_value(gm, current.target))
                continue
            # A new attribute beside the weight: the bias the layer lacked, or this site's copy.
            owner_path, _, weight_attr = arg(node, layer.positions["weight"], "weight").target.rpartition(".")
            owner = gm.get_submodule(owner_path)
            attr = free_name(owner, f"{weight_attr if name == 'weight' else 'bias'}_folded")
            current_value = attr_value(gm, current.target) if current is not None else None
            _store(owner, attr, value, current_value if current_value is not None else
                   like if name == "weight" else new_bias_like)
            with gm.graph.inserting_before(node):
                getter = gm.graph.get_attr(".".join(filter(None, [owner_path, attr])))
            _set_arg(node, layer.positions[name], name, getter)
    uses.release(layer)
    notes = [f"folded into a copy of {layer.label}, whose weights {', '.join(sharers)} also uses" if sharers else None,
             plain if layer.module is not None else None]
    return "; ".join(n for n in notes if n) or None


def _store(owner: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    """Set a tensor attribute as the same kind (parameter or buffer) as `like`."""
    if isinstance(like, nn.Parameter):
        owner.register_parameter(name, nn.Parameter(value, requires_grad=like.requires_grad))
    else:
        owner.register_buffer(name, value)


def free_name(owner: nn.Module, wanted: str) -> str:
    """`wanted`, or `wanted_1`, `wanted_2`...: the first attribute name that `owner` does not use."""
    name, i = wanted, 1
    while getattr(owner, name, None) is not None:
        name, i = f"{wanted}_{i}", i + 1
    return name


def _set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        node.update_arg(index, value)
    elif name in node.kwargs or len(node.args) < index:
        node.update_kwarg(name, value)
    else:
        node.args = (*node.args, value)
