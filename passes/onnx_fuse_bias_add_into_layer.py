"""Move a per-channel constant Add that follows a Conv or ConvTranspose into the layer's bias,
where a BatchNormalization reads the sum.

Paddle2ONNX and others write a layer's bias as a separate Add, Conv(x, W) + c with c shaped
(1, C, 1, 1) or (C, 1, 1). A conv's bias is that same per-output-channel addition, so
    Add(Conv(x, W, B), c) = Conv(x, W, B + c)   exactly,
and the BN after it then folds into the layer (onnx_fold_bn_into_preceding_layer). Only where the layer's
output feeds nothing but the Add, and the Add nothing but a BN: elsewhere the graph stays as
written.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from bngraph.passes._onnx_common import CONV_LAYERS, bns_fed_by, constant, fresh_name, site
from bngraph.passes.base import PassResult, graph_pass

@graph_pass(in_place=True)
def onnx_fuse_bias_add_into_layer(model: ir.Model) -> PassResult:
    """Fuse Add(layer, per-channel constant) into the layer's bias before a BN; `changed` names the layers."""
    result = PassResult(model)
    graph = model.graph
    for bn, add in bns_fed_by(model, ("Add",)):
        if _has_other_users(add, bn):
            continue
        found = _layer_and_bias(add)
        if found is None:
            continue
        layer, added = found
        bias = constant(layer.inputs[2]) if len(layer.inputs) > 2 and layer.inputs[2] is not None else None
        if len(layer.inputs) > 2 and layer.inputs[2] is not None and bias is None:
            continue  # a bias computed at run time: the fold pass says why the BN stays
        weight = layer.inputs[1].const_value.numpy()
        total = added if bias is None else bias.reshape(-1) + added
        name = fresh_name(graph, f"{layer.inputs[1].name}_bias")
        value = ir.Value(name=name, const_value=ir.tensor(total.numpy().astype(weight.dtype)))
        graph.register_initializer(value)
        if len(layer.inputs) < 3:
            layer.resize_inputs(3)
        layer.replace_input_with(2, value)
        add.outputs[0].replace_all_uses_with(layer.outputs[0])
        graph.remove(add, safe=True)
        result.changed.append(site(layer))
        result.details.append({"layer": site(layer), "add": site(add), "bn": site(bn)})
    return result


def _has_other_users(add: ir.Node, bn: ir.Node) -> bool:
    return add.outputs[0].is_graph_output() or any(user is not bn for user, _ in add.outputs[0].uses())


def _layer_and_bias(add: ir.Node) -> tuple[ir.Node, torch.Tensor] | None:
    """(the Conv/ConvTranspose, the per-output-channel constant it adds), or None."""
    for layer_out, other in (add.inputs, reversed(add.inputs)):
        layer = layer_out.producer()
        added = constant(other)
        if layer is None or layer.op_type not in CONV_LAYERS or added is None or layer.domain not in ("", "ai.onnx"):
            continue
        weight = constant(layer.inputs[1])
        if weight is None or layer_out.is_graph_output() or len(layer_out.uses()) != 1:
            continue
        groups = layer.attributes.get("group")
        groups = groups.as_int() if groups is not None else 1
        channels = weight.shape[0] if layer.op_type == "Conv" else weight.shape[1] * groups
        # Broadcast from the right against (N, C, D1, ...): every axis but the channel axis is 1.
        shape = [1] * (weight.ndim - added.ndim) + list(added.shape)
        if len(shape) != weight.ndim or shape[1] not in (1, channels) or any(d != 1 for i, d in enumerate(shape) if i != 1):
            continue
        return layer, added.reshape(-1).expand(channels)
    return None
