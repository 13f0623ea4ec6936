"""Fold a BatchNormalization that no layer precedes into the Conv or Gemm after it.

The BN is the affine map x -> s * x + t per input channel c (s, t from `bn_scale_shift`, that
is torch.nn.utils.fusion). A layer after it sums over input channels, so for each output o:
    sum_c W[o, c] (s[c] x[c] + t[c]) + B[o]  =  sum_c W'[o, c] x[c] + B'[o],
    W'[o, c] = W[o, c] s[c],   B'[o] = B[o] + sum_c,k W[o, c, k] t[c].
Exact for a Conv only without zero padding: the original conv pads the BN's output with 0,
the folded one pads x with 0, which the BN would have turned into t. Such a BN (and one before
a pool, an add...) is left for `onnx_replace_bn_with_multiply_add`. Grouped convs fold per group.
A BN before a flatten (a Reshape to (N, C * positions)) and a Gemm folds into the Gemm, each
channel's s and t spread over its positions' rows of W. A BN on (N, C) before a MatMul by a
constant (C, out) matrix, a bias-less Linear as the TorchScript exporter writes it, folds into
MatMul(x, W') + t W: on (N, C) the BN's channel axis is the one the MatMul sums over.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from bngraph.passes._onnx_common import (
    bn_scale_shift, constant, exposed_reason, fold_by_rules, layer_fold_reason, new_initializer, opset_of,
    overflow_reason, rank, site,
)
from bngraph.passes.base import PassResult, graph_pass


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


class _FoldBnIntoNext(RewriteRuleClassBase):
    op_type = ""

    def pattern(self, op, x, w):
        bn = op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["bn_out"])
        return getattr(op, self.op_type)(bn, w, _allow_other_inputs=True, _outputs=["layer_out"])

    def check(self, context, x, w, bn_out, layer_out) -> MatchResult:
        reason = _refusal(bn_out.producer(), layer_out.producer())
        return MatchResult().fail(reason) if reason else MatchResult()


class FoldBnIntoNextConv(_FoldBnIntoNext):
    op_type = "Conv"

    def rewrite(self, op, x, w, bn_out, layer_out):
        conv, weight = layer_out.producer(), constant(w)
        scale, shift = bn_scale_shift(bn_out.producer())
        groups = _attr(conv, "group", 1)
        # Input channel c feeds the outputs of group c // (C / groups), as weight column c % (C / groups).
        out_channels, per_group = weight.shape[0], weight.shape[1]
        index = (torch.arange(out_channels) // (out_channels // groups))[:, None] * per_group + torch.arange(per_group)
        shape = (out_channels, per_group) + (1,) * (weight.ndim - 2)
        folded_w = (weight * scale[index].reshape(shape)).to(weight.dtype)
        folded_b = (weight * shift[index].reshape(shape)).flatten(1).sum(1) + _bias(conv, out_channels)
        folded_b = folded_b.to(weight.dtype)
        graph = conv.graph
        return op.Conv(
            x,
            new_initializer(op, graph, folded_w, w.name),
            new_initializer(op, graph, folded_b, _bias_name(conv)),
            **conv.attributes,
        )


class FoldBnIntoNextGemm(_FoldBnIntoNext):
    op_type = "Gemm"

    def rewrite(self, op, x, w, bn_out, layer_out):
        return _folded_gemm(op, x, w, bn_out.producer(), layer_out.producer(), positions=1)


class FoldBnIntoNextMatMul(_FoldBnIntoNext):
    op_type = "MatMul"

    def rewrite(self, op, x, w, bn_out, layer_out):
        weight = constant(w)
        scale, shift = bn_scale_shift(bn_out.producer())
        folded_w = (weight * scale[:, None]).to(weight.dtype)
        folded_b = (shift @ weight.to(shift.dtype)).to(weight.dtype)
        graph = layer_out.producer().graph
        y = op.MatMul(x, new_initializer(op, graph, folded_w, w.name))
        return op.Add(y, new_initializer(op, graph, folded_b, f"{w.name}_bias"))


class _FoldBnIntoGemmThroughFlatten(RewriteRuleClassBase):
    """BN -> a flatten -> Gemm, a classifier head: channel c's scale and shift apply to the
    `positions` columns of W that its values flatten into. The two flattens exporters write are
    the subclasses' patterns; the fold rebuilds the same flatten on the BN's input."""

    def check(self, context, w, bn_out, flat_out, layer_out, **_) -> MatchResult:
        reason = _refusal(bn_out.producer(), layer_out.producer()) or _not_a_flatten(bn_out, flat_out, w)
        return MatchResult().fail(reason) if reason else MatchResult()

    def rewrite(self, op, x, w, bn_out, flat_out, layer_out, **_):
        flat = flat_out.producer()
        flattened = getattr(op, flat.op_type)(x, *flat.inputs[1:], **flat.attributes)
        positions = _in_features(layer_out.producer(), w) // _channels(bn_out)
        return _folded_gemm(op, flattened, w, bn_out.producer(), layer_out.producer(), positions)


class FoldBnIntoGemmThroughReshape(_FoldBnIntoGemmThroughFlatten):
    """Reshape(N, C * positions), as the torch.export-based exporter writes `x.flatten(1)`."""

    def pattern(self, op, x, shape, w):
        bn = op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["bn_out"])
        flat = op.Reshape(bn, shape, _allow_other_attributes=True, _outputs=["flat_out"])
        return op.Gemm(flat, w, _allow_other_inputs=True, _outputs=["layer_out"])


class FoldBnIntoGemmThroughFlatten(_FoldBnIntoGemmThroughFlatten):
    """Flatten(axis=1), as older exporters write it."""

    def pattern(self, op, x, w):
        bn = op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["bn_out"])
        flat = op.Flatten(bn, _allow_other_attributes=True, _outputs=["flat_out"])
        return op.Gemm(flat, w, _allow_other_inputs=True, _outputs=["layer_out"])


def _folded_gemm(op, x, w, bn: ir.Node, gemm: ir.Node, positions: int):
    """Gemm(x) with `bn` (before it, each channel's values over `positions` columns) folded in."""
    weight = constant(w)
    scale, shift = (t.repeat_interleave(positions) for t in bn_scale_shift(bn))
    by_row = weight if not _attr(gemm, "transB", 0) else weight.T  # (in, out) either way
    alpha, beta = _attr(gemm, "alpha", 1.0), _attr(gemm, "beta", 1.0)
    folded = (by_row * scale[:, None]).to(weight.dtype)
    # Y = alpha (s x + t) W + beta C  =  alpha x (s W) + (alpha t W + beta C): beta is spent here.
    folded_b = (alpha * (shift @ by_row.to(shift.dtype)) + beta * _bias(gemm, by_row.shape[1])).to(weight.dtype)
    attributes = {k: v for k, v in gemm.attributes.items() if k != "beta"}
    return op.Gemm(
        x,
        new_initializer(op, gemm.graph, folded if not _attr(gemm, "transB", 0) else folded.T, w.name),
        new_initializer(op, gemm.graph, folded_b, _bias_name(gemm)),
        **attributes,
    )


def _channels(bn_out: ir.Value) -> int:
    return constant(bn_out.producer().inputs[3]).numel()


def _in_features(gemm: ir.Node, w: ir.Value) -> int:
    return constant(w).shape[1 if _attr(gemm, "transB", 0) else 0]


def _not_a_flatten(bn_out: ir.Value, flat_out: ir.Value, w: ir.Value) -> str | None:
    """Why the Reshape or Flatten between the BN and the Gemm is not (N, C, *spatial) ->
    (N, C * positions) (a Reshape: with the spatial sizes known)."""
    flat, gemm = flat_out.producer(), flat_out.uses()[0].node
    if flat.op_type == "Flatten":
        if _attr(flat, "axis", 1) != 1:
            return f"the Flatten after it keeps {_attr(flat, 'axis', 1)} axes, not the batch alone"
        if _in_features(gemm, w) % _channels(bn_out):
            return "the Gemm after the flatten does not read its values as the flatten lays them out"
        return None
    dims, out = bn_out.shape, flat_out.shape
    if dims is None or len(dims) < 3 or any(not isinstance(d, int) for d in list(dims)[1:]):
        return "the reshape after it is not a flatten of each example with a known size"
    per_example = math.prod(list(dims)[1:])
    # Per example: the output keeps the batch dimension (the same value, or symbol) and holds
    # the rest in one axis; or, shapes unknown, the constant target is (-1, per_example).
    shape = constant(flat.inputs[1])
    keep_batch = (-1,) if _attr(flat, "allowzero", 0) else (-1, 0)
    by_shapes = out is not None and len(out) == 2 and out[0] == dims[0] and out[1] == per_example
    by_target = shape is not None and shape.numel() == 2 and int(shape[0]) in keep_batch and int(shape[1]) == per_example
    if not (by_shapes or by_target):
        return "the reshape after it is not a flatten of each example"
    if _in_features(flat_out.uses()[0].node, w) != per_example or per_example % _channels(bn_out):
        return "the Gemm after the flatten does not read its values as the flatten lays them out"
    return None


def _bias(layer: ir.Node, out_features: int) -> torch.Tensor:
    bias = constant(layer.inputs[2]) if len(layer.inputs) > 2 else None
    return torch.zeros(out_features) if bias is None else bias.reshape(-1).expand(out_features)


def _bias_name(layer: ir.Node) -> str:
    has_bias = len(layer.inputs) > 2 and layer.inputs[2] is not None
    return layer.inputs[2].name if has_bias else f"{layer.inputs[1].name}_bias"


def _refusal(bn: ir.Node, layer: ir.Node) -> str | None:
    """Why `bn` may not fold into `layer`, the only user of its output; None when it may."""
    reason = layer_fold_reason(bn) or exposed_reason(*layer.inputs[1:])
    if reason:
        return reason
    where = f"{layer.op_type} {site(layer)!r}"
    if constant(layer.inputs[1]) is None:
        return f"the weight of {where} is not a constant"
    if len(layer.inputs) > 2 and layer.inputs[2] is not None and constant(layer.inputs[2]) is None:
        return f"the bias of {where} is not a constant"
    if reason := overflow_reason(bn, layer):
        return reason
    if layer.op_type == "Conv":
        pads = _attr(layer, "pads", [0])
        if _attr(layer, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or any(pads):
            return f"{where} pads with zeros, which the BN would have shifted: the border would differ"
    if layer.op_type == "MatMul":
        weight, channels = constant(layer.inputs[1]), _channels(bn.outputs[0])
        if weight.ndim != 2 or weight.shape[0] != channels:
            return f"the weight of {where} is {tuple(weight.shape)}, not a ({channels}, out) matrix over the BN's channels"
        if rank(bn.inputs[0]) != 2:
            # On (N, C, L) the BN normalizes axis 1 while the MatMul sums over the last axis.
            return f"it normalizes axis 1 of a rank-{rank(bn.inputs[0])} input, which {where} does not sum over"
        if opset_of(layer) < 7:
            return f"{where} is in opset {opset_of(layer)}, whose Add broadcasts a bias only with an attribute"
    if layer.op_type == "Gemm":
        if _attr(layer, "transA", 0):
            return f"{where} transposes its input (transA), so the BN's channels are not its rows"
        bias = layer.inputs[2] if len(layer.inputs) > 2 else None
        out_features = constant(layer.inputs[1]).shape[0 if _attr(layer, "transB", 0) else 1]
        # C broadcasts to (rows, out_features): one bias per output feature only where it is
        # (), (k,) or (1, k) with k 1 or out_features; an (M, 1) C is one per row, even when M
        # equals out_features.
        shape = tuple(constant(bias).shape) if bias is not None else ()
        if shape and (shape[-1] not in (1, out_features) or any(d != 1 for d in shape[:-1])):
            return f"the bias of {where} has shape {shape}: it differs per row, not per output feature"
    return None


RULES = RewriteRuleSet([
    FoldBnIntoNextConv.rule(), FoldBnIntoNextGemm.rule(), FoldBnIntoNextMatMul.rule(),
    FoldBnIntoGemmThroughReshape.rule(),
    FoldBnIntoGemmThroughFlatten.rule(),
])


@graph_pass(in_place=True)
def onnx_fold_bn_into_following_layer(model: ir.Model) -> PassResult:
    """Fold every BN whose output only feeds a Conv (without zero padding), a Gemm or a MatMul."""
    return fold_by_rules(model, RULES, _next_layer, _why_left, "into the layer after it")


def _next_layer(bn: ir.Node) -> ir.Node | None:
    """The one node reading the BN's output, or past a Reshape (a flatten), the one reading that."""
    uses = bn.outputs[0].uses()
    node = uses[0].node if len(uses) == 1 and not bn.outputs[0].is_graph_output() else None
    if node is not None and node.op_type in ("Reshape", "Flatten") and len(node.outputs[0].uses()) == 1:
        after = node.outputs[0].uses()[0].node
        return after if after.op_type == "Gemm" else node
    return node


def _why_left(bn: ir.Node, layer: ir.Node | None) -> str:
    reason = layer_fold_reason(bn)
    if reason:
        return reason
    if bn.outputs[0].is_graph_output():
        return "its output is a model output, not a layer's input"
    if layer is None:
        users = sorted(site(u) for u, _ in bn.outputs[0].uses())
        return f"its output feeds {len(users)} nodes ({', '.join(users)}), not one layer"
    if layer.op_type not in ("Conv", "Gemm", "MatMul"):
        return f"its output feeds {layer.op_type} {site(layer)!r}, not a Conv, Gemm or MatMul"
    reshape = layer.inputs[0].producer() if layer.inputs[0] is not None else None
    if reshape is not None and reshape.op_type in ("Reshape", "Flatten") and reshape.inputs[0] is bn.outputs[0]:
        return (_refusal(bn, layer) or _not_a_flatten(bn.outputs[0], reshape.outputs[0], layer.inputs[1])
                or f"no rule folds it through {site(reshape)!r} into {layer.op_type} {site(layer)!r}")
    if layer.inputs[0] is not bn.outputs[0]:
        return f"it feeds the weight of {layer.op_type} {site(layer)!r}, not its input"
    return _refusal(bn, layer) or f"no rule folds it into {layer.op_type} {site(layer)!r}"
