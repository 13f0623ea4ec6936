"""Fold a BatchNorm that no layer could take into the conv or linear layer that consumes it.

For y = W BN(x) + b with BN(x) = s * x + t per input channel: W' = W diag(s) and
b' = b + sum over input channels and kernel taps of W t (see `_bn_affine`, in float64). This
is exact only when every output of the layer sums whole kernels of BN'd values, so a conv
that pads with zeros is refused: the folded conv would see 0 at the border where the original
saw BN(0) = t. Reflect, replicate and circular padding copy BN'd values and commute with a
per-channel affine map, so they fold. Cases, numbered as in the code:
  1. The BN is not a fixed affine map: skip.
  2. Its output, looked at through transposes and a flatten to (N, C * positions) (a classifier
     head: `BN -> flatten -> Linear`, where each channel's scale and shift apply to its
     positions' columns of W), feeds more than one op, or no conv/linear: skip.
  3. It feeds a transposed conv, whose outputs near the border sum fewer kernel taps, so the
     shift would not be uniform: skip. (Feeding a weight makes the layer unfoldable in case 2.)
  4. The axis it normalizes is not the layer's input feature axis: skip.
  5. The conv pads with zeros: skip.
  6. The BN's input (or a view of it) is written in place between the BN and the layer, so the
     layer would read the written values where it read the BN's copy: skip.
  7. Fold; a layer whose weights other nodes share gets a copy for this site.
Runs from the output backwards, so BN -> BN -> Linear folds both.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from bngraph.passes._bn_affine import fold_into_consumer
from bngraph.passes._fx_batchnorm import axis_at_user, describe, fixed_batch_norms, flag_rounding
from bngraph.passes._fx_effects import mutations_of
from bngraph.passes._fx_layers import TensorUses, as_layer, write_weights
from bngraph.passes._fx_meta import tensor_shape
from bngraph.passes._op_kinds import first_node_arg, is_shape_only
from bngraph.passes.base import PassResult, Probe, Skip, graph_pass


def _flattened(gm: fx.GraphModule, node: fx.Node, axis: int) -> tuple[fx.Node, int] | None:
    """(the flatten, positions per channel) where `node`, channels on axis 1 of (N, C, *spatial),
    goes only to one shape-only op (nn.Flatten, .flatten(1), .view(N, -1), .reshape) whose output
    is (N, C * positions): channel c's values become columns c * positions ... (c + 1) * positions - 1."""
    shape = tensor_shape(node)
    values = [u for u in node.users if not _reads_shape_only(u)]  # y.view(y.size(0), -1) reads y twice
    if axis != 1 or shape is None or len(shape) < 3 or len(values) != 1:
        return None
    flat = values[0]
    positions = math.prod(shape[2:])
    if not is_shape_only(gm, flat) or first_node_arg(flat) is not node or tensor_shape(flat) != (shape[0], shape[1] * positions):
        return None
    return flat, positions


def _reads_shape_only(node: fx.Node) -> bool:
    """`y.size(0)`, `y.dim()`, `y.shape`: the same for the BN's input as for its output."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)


@graph_pass(in_place=True)
def fold_bn_into_following_layer(gm: fx.GraphModule) -> PassResult:
    """Fold every BatchNorm whose only consumer is a linear or a conv without zero padding."""
    result = PassResult(gm)
    modules = dict(gm.named_modules())
    uses = TensorUses(gm, modules)
    for site in fixed_batch_norms(gm, result, backwards=True):  # 1.
        node = site.node
        # 2.
        last, axis, _ = axis_at_user(node, 1)
        stats = site.stats
        flattened = _flattened(gm, last, axis)
        if flattened is not None:
            last, positions = flattened
            axis, stats = 1, stats.per_position(positions)
        users = list(last.users)
        if len(users) != 1:
            fed = ", ".join(u.name for u in users) or "nothing"
            result.skipped.append(Skip(node.name, f"its output feeds {len(users)} ops ({fed}), not one layer"))
            continue
        consumer = users[0]
        layer = as_layer(consumer, gm, modules)
        if not layer or isinstance(layer, str):
            result.skipped.append(Skip(node.name, layer or f"its output goes to {describe(gm, consumer)}, not a conv or linear"))
            continue
        # 3. (A BN feeding a weight or bias made that layer's `as_layer` fail: computed, not constant.)
        if layer.kind == "conv_transpose":
            result.skipped.append(Skip(node.name, f"{layer.label} is a transposed conv: its border outputs sum fewer "
                                                  "kernel taps, so the BN's shift cannot move into its bias"))
            continue
        # 4.
        reason = layer.axis_mismatch(tensor_shape(last), axis, "input")
        if reason:
            result.skipped.append(Skip(node.name, reason))
            continue
        # 5.
        if layer.zero_padding:
            result.skipped.append(Skip(node.name, f"{layer.label} pads with zeros, where the BN would have put its shift: "
                                                  "the border would differ"))
            continue
        # 6.
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        between = [w for w in mutations_of(site.input, modules) if order[node] < order[w] < order[consumer]]
        if between:
            result.skipped.append(Skip(node.name, f"{between[0].name} writes in place into {site.input.name}, the BN's "
                                                  f"input, before {layer.label} would read it"))
            continue
        # 7.
        with torch.no_grad():
            weight, bias = fold_into_consumer(layer.weight, layer.bias, layer.groups, stats)
        note = write_weights(gm, layer, weight, bias, uses, modules, bn_bias=site.stats.bias)
        node.replace_all_uses_with(site.input)
        gm.graph.erase_node(node)
        result.changed.append(node.name)
        how = "into the layer after it" + (f", through {last.name}" if flattened is not None else "")
        row = {"node": node.name, "into": layer.label, "how": how, "note": note or ""}
        flag_rounding(result, row, site, Probe(reference=consumer.name, folded=consumer.name))
        result.details.append(row)
    if result.changed:
        gm.recompile()
    return result
