"""Remove the bias of a conv/linear whose every user is a BatchNorm (paper, Sec. 3.2).

BN subtracts the mean, so a bias in front of it cancels; beta takes its role. Removing it
changes nothing in train mode, and in eval mode the running mean shifts by the same bias
(`running_mean -= bias`), so the model computes exactly what it did before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from bngraph.passes._fx_effects import hook_refusal, value_readers
from bngraph.passes._fx_meta import tensor_shape
from bngraph.passes._op_kinds import CONV_LINEAR_MODULES
from bngraph.passes.base import PassResult, Skip, graph_pass

_BATCHNORM = nn.modules.batchnorm._BatchNorm


def _is_transpose_1_last(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "transpose" and tuple(node.args[1:]) in {(1, -1), (-1, 1)}


class _Readers:
    """Where else the model reaches a layer's bias: `self.fc.bias` in forward (a get_attr node),
    the same Parameter under another name (tied), the layer under another path (a submodule kept
    opaque may call it). Indexed once: a pass over a 1000-layer model asks 1000 times."""

    def __init__(self, gm: fx.GraphModule):
        self.get_attrs: dict[str, list[str]] = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                self.get_attrs.setdefault(n.target, []).append(n.name)
        self.names: dict[int, list[str]] = {}
        for name, p in gm.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), []).append(name)
        for name, m in gm.named_modules(remove_duplicate=False):
            self.names.setdefault(id(m), []).append(name)

    def of(self, path: str, layer: nn.Module) -> str:
        bias_name = f"{path}.bias"
        found = list(self.get_attrs.get(bias_name, []))
        found += [n for n in self.names.get(id(layer.bias), []) if n != bias_name]
        found += [n for n in self.names.get(id(layer), []) if n != path]
        return ", ".join(found)


def _normalizing_readers(gm: fx.GraphModule, layer_node: fx.Node, features_last: bool,
                         only: Collection[str] | None) -> list[fx.Node] | None:
    """The BatchNorms that read the layer's output over its features, where they are all that
    reads it (each cancels the bias: sigmoid(BN1(h)) * tanh(BN2(h)) needs none), each once;
    None where another reader needs the bias. With `only`, the BNs this pass may change: a
    model's own BN keeps its statistics (insert puts them back), so the bias stays for it."""
    norms = {}
    for reader in value_readers(layer_node):
        if _is_transpose_1_last(reader) and features_last and len(value_readers(reader)) == 1:
            reader = value_readers(reader)[0]
        elif features_last:
            return None
        if reader.op != "call_module" or not isinstance(gm.get_submodule(reader.target), _BATCHNORM) \
                or only is not None and reader.target not in only:
            return None
        norms.setdefault(reader.target, reader)  # one BN called twice on it shifts its statistics once
    return list(norms.values())


@graph_pass(in_place=True)
def drop_bias_before_bn(gm: fx.GraphModule, only: Collection[str] | None = None) -> PassResult:
    """Drop the redundant bias before each BatchNorm (or those whose module path is in `only`)."""
    result = PassResult(gm)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    readers = _Readers(gm)
    for bn_node in gm.graph.nodes:
        if bn_node.op != "call_module" or (only is not None and bn_node.target not in only):
            continue
        bn = gm.get_submodule(bn_node.target)
        if not isinstance(bn, _BATCHNORM):
            continue
        layer_node, moved = bn_node.args[0], None
        if isinstance(layer_node, fx.Node) and _is_transpose_1_last(layer_node):
            moved, layer_node = layer_node, layer_node.args[0]
        if not isinstance(layer_node, fx.Node) or layer_node.op != "call_module":
            continue  # fed by something without a bias module: nothing to drop
        layer = gm.get_submodule(layer_node.target)
        if not isinstance(layer, CONV_LINEAR_MODULES) or layer.bias is None:
            continue
        site = bn_node.target
        shape = tensor_shape(layer_node)
        if shape is None:
            result.skipped.append(Skip(site, f"no shape recorded for {layer_node.target}'s output"))
            continue
        # The BN must normalize the layer's output features: axis 1 for a conv or a 2-D linear,
        # the last axis (reached through the transpose) for a linear on (N, T, C).
        layer_features_last = isinstance(layer, nn.Linear) and len(shape) > 2
        if layer_features_last != (moved is not None):
            result.skipped.append(Skip(site, f"normalizes another axis than {layer_node.target}'s output features"))
            continue
        group = _normalizing_readers(gm, layer_node, layer_features_last, only)
        if group is None:
            users = [u for u in value_readers(layer_node) if u is not bn_node and u is not moved]
            norms = [u for u in users if u.op == "call_module" and isinstance(gm.get_submodule(u.target), _BATCHNORM)]
            own = [u for u in norms if only is not None and u.target not in only]
            if own and len(norms) == len(users):
                why = (f"{', '.join(u.name for u in own)}, the model's own BatchNorm, whose running statistics stay as "
                       "they are (the bias is in them)")
            else:
                needing = [u for u in users if u not in norms] or users
                why = f"{', '.join(u.name for u in needing)}, which needs the bias"
            result.skipped.append(Skip(site, f"{layer_node.target}'s output also feeds {why}"))
            continue
        read_again = readers.of(layer_node.target, layer)
        if read_again:
            result.skipped.append(
                Skip(site, f"the model also reads {layer_node.target}.bias ({read_again}), so it must stay")
            )
            continue
        if parametrize.is_parametrized(layer, "bias"):
            result.skipped.append(Skip(site, f"{layer_node.target}.bias is computed by a parametrization, which "
                                             "would have nothing to compute from"))
            continue
        if parametrize.is_parametrized(layer):
            # Its class is made at run time: a written model builds it with the user's own code,
            # bias and all, and the saved weights without one would not load.
            result.skipped.append(Skip(site, f"{layer_node.target} is parametrized (weight_norm, spectral_norm), and "
                                             "a written model rebuilds it as the model's code makes it, with its bias"))
            continue
        refusal = hook_refusal(layer_node.target, layer, "dropping its bias") or next(
            (r for n in group if (r := hook_refusal(n.target, gm.get_submodule(n.target), f"dropping {layer_node.target}'s bias"))),
            None)
        if refusal:  # a hook after the bias (`output * 2`) would no longer see it cancel
            result.skipped.append(Skip(site, refusal))
            continue
        if calls[layer_node.target] > 1:
            result.skipped.append(
                Skip(
                    site,
                    f"{layer_node.target} is called at {calls[layer_node.target]} sites; its bias serves the others",
                )
            )
            continue
        with torch.no_grad():
            for norm in (gm.get_submodule(n.target) for n in group):
                if norm.running_mean is not None:
                    norm.running_mean.sub_(layer.bias.to(norm.running_mean.dtype))
        layer.bias = None
        for n in group:
            result.changed.append(n.target)
            result.details.append({"bn": n.target, "layer": layer_node.target})
    if result.changed:
        gm.recompile()
    return result
