"""Fold each BatchNormalization into the layer before it (Algorithm 2, step 3 of the paper).

For a layer Y = W x + B and a BN with s = gamma / sqrt(var + eps):
    BN(Y) = s * (W x + B - mean) + beta  =  W' x + B',  W' = s * W (per output channel),
                                                        B' = s * (B - mean) + beta.
onnxscript's rules fold into Conv, ConvTranspose (grouped too) and Gemm (with or without
transB); we use them as they are, adding a training-mode guard they lack. Our one rule covers
what they do not match: a Linear exported as MatMul (+ Add), on (N, C) or, through the
Transpose users write around BatchNorm1d, on (N, T, C). It feeds the initializers to
torch.nn.utils.fusion.fuse_linear_bn_weights, the FX fold's own function.
"""

from __future__ import annotations

from functools import partial

import onnx_ir as ir
import torch
from onnxscript.rewriter import MatchingTracer, MatchResult, MatchStatus, RewriteRuleClassBase, RewriteRuleSet

# The rule classes, not just the rule objects onnxscript.rewriter.rules.common exports: we
# subclass them to add the training-mode guard. A private module, so a move fails this import
# loudly. onnxscript >= 0.7 is needed: 0.6 crashed on grouped ConvTranspose (onnxscript#2867)
# and ignored Gemm's beta (onnxscript#3027); the tests fold both.
from onnxscript.rewriter.rules.common._fuse_batchnorm import (
    FuseBatchNormIntoConv,
    FuseBatchNormIntoConvTranspose,
    FuseBatchNormIntoGemm,
)
from torch.nn.utils.fusion import fuse_linear_bn_weights

from bngraph.passes._onnx_common import (
    LAYER_OPS,
    bn_parameters,
    constant,
    exposed_reason,
    fold_by_rules,
    layer_fold_reason,
    new_initializer,
    overflow_reason,
    rank,
    site,
)
from bngraph.passes.base import PassResult, graph_pass


class _EvalModeOnly:
    """Their check reads constants only; a training-mode BN uses batch statistics instead, and
    a spatial=0 BN has statistics per position, which no per-channel weight can take."""

    def check(self, context, x, inbound_out, batchnorm_out) -> MatchResult:
        bn, layer = batchnorm_out.producer(), inbound_out.producer()
        reason = (layer_fold_reason(bn) or exposed_reason(*layer.inputs[1:]) or _coarser_statistics(bn, layer)
                  or (constant(layer.inputs[1]) is not None and overflow_reason(bn, layer)))
        return MatchResult().fail(reason) if reason else super().check(context, x, inbound_out, batchnorm_out)

    def rewrite(self, op, x, inbound_out, batchnorm_out):
        folded = super().rewrite(op, x, inbound_out, batchnorm_out)
        # Opset 15 lets a float16 layer's BN keep float32 statistics; their numpy algebra then
        # promotes the folded weight and bias to float32, which the layer's type forbids.
        dtype = inbound_out.producer().inputs[1].dtype
        for value in folded.producer().inputs[1:]:
            if value is not None and value.dtype != dtype:
                value.const_value = ir.tensor(value.const_value.numpy().astype(dtype.numpy()), name=value.name)
                value.dtype = dtype
        return folded


def _coarser_statistics(bn: ir.Node, layer: ir.Node) -> str | None:
    """Their algebra runs in the statistics' type: float16 statistics (opset 15 allows them beside
    float32 data) would round a float32 layer's folded weights to float16's precision."""
    weight_type = layer.inputs[1].dtype
    coarser = [v for v in bn.inputs[1:5] if v is not None and v.dtype is not None and weight_type is not None
               and v.dtype.itemsize < weight_type.itemsize]
    if coarser:
        return (f"its statistics are {coarser[0].dtype.numpy().name} and the {layer.op_type}'s weight "
                f"{weight_type.numpy().name}: folded in the statistics' type, the weights would lose precision")
    return None


class FoldBnIntoConv(_EvalModeOnly, FuseBatchNormIntoConv): ...


class FoldBnIntoConvTranspose(_EvalModeOnly, FuseBatchNormIntoConvTranspose): ...


class FoldBnIntoGemm(_EvalModeOnly, FuseBatchNormIntoGemm): ...


class FoldBnIntoMatMul(RewriteRuleClassBase):
    """BN(Transpose?(Add?(MatMul(x, W), b))) -> Transpose?(Add(MatMul(x, W'), b')).

    MatMul's W is (in, out), the transpose of nn.Linear's weight, so the fold goes through
    W.T. The BN's channel axis (1) must be the MatMul's feature axis (the last): the output
    is (N, C), or a Transpose moves the last axis to axis 1.
    """

    def __init__(self, has_bias: bool, moved: bool):
        super().__init__(name=f"FoldBnIntoMatMul{'Add' if has_bias else ''}{'Transpose' if moved else ''}")
        self.has_bias, self.moved = has_bias, moved

    def pattern(self, op, x, w, b):
        y = op.MatMul(x, w, _outputs=["layer_out"])
        if self.has_bias:
            y = op.Add(y, b)
        if self.moved:
            y = op.Transpose(y, _outputs=["moved"])
        return op.BatchNormalization(y, _allow_other_inputs=True, _outputs=["bn_out"])

    def check(self, context, x, w, b=None, layer_out=None, bn_out=None, moved=None, **_) -> MatchResult:
        result = MatchResult()
        bn = bn_out.producer()
        reason = layer_fold_reason(bn) or exposed_reason(w, b)
        if reason:
            return result.fail(reason)
        weight = constant(w)
        if weight is None or weight.ndim != 2:
            return result.fail(f"MatMul weight {w.name!r} is not a constant matrix")
        if moved is not None:
            perm = _perm(moved.producer())
            if perm is None or perm[1] != len(perm) - 1:
                return result.fail("the Transpose before it does not move the MatMul's features to axis 1")
        elif rank(layer_out) != 2:
            return result.fail(f"it normalizes axis 1 of a rank-{rank(layer_out)} MatMul output, not its features")
        channels = constant(bn.inputs[3]).numel()
        if weight.shape[1] != channels:
            return result.fail(f"it normalizes {channels} channels, but the MatMul has {weight.shape[1]} features")
        if b is not None:
            bias = constant(b)
            if bias is None or bias.numel() != channels or any(d != 1 for d in bias.shape[:-1]):
                return result.fail(f"the Add after the MatMul does not add a constant per-feature bias ({b.name!r})")
            if (out_rank := rank(layer_out)) is None or bias.ndim > out_rank:
                # (N, C) + (1, 1, C) is (1, N, C): the BN's axis 1 is then the MatMul's rows
                return result.fail(f"the Add after the MatMul raises its rank with {b.name!r} {tuple(bias.shape)}")
        if reason := overflow_reason(bn, layer_out.producer(), constant(b) if b is not None else None):
            return result.fail(reason)
        return result

    def rewrite(self, op, x, w, b=None, layer_out=None, bn_out=None, moved=None, **_):
        graph = bn_out.producer().graph
        bias = constant(b).reshape(-1) if b is not None else None
        with torch.no_grad():
            weight, bias = fuse_linear_bn_weights(constant(w).T, bias, **bn_parameters(bn_out.producer()))
        dtype = w.dtype  # float32 statistics of a float16 layer (opset 15) must not promote it
        y = op.MatMul(x, new_initializer(op, graph, weight.T, w.name, dtype))
        y = op.Add(y, new_initializer(op, graph, bias, b.name if b is not None else f"{w.name}_bias", dtype))
        if moved is not None:
            y = op.Transpose(y, **moved.producer().attributes)
        return y


def _perm(transpose: ir.Node) -> list[int] | None:
    attr = transpose.attributes.get("perm")
    if attr is not None:
        return list(attr.as_ints())
    r = rank(transpose.inputs[0])
    return list(reversed(range(r))) if r is not None else None  # no perm: reverse the axes


RULES = RewriteRuleSet(
    [
        FoldBnIntoConv.rule(),
        FoldBnIntoConvTranspose.rule(),
        FoldBnIntoGemm.rule(),
        *(FoldBnIntoMatMul.rule(has_bias, moved) for has_bias in (True, False) for moved in (True, False)),
    ],
    commute=True,  # the exporters write both Add(MatMul, b) and Add(b, MatMul)
)


@graph_pass(in_place=True)
def onnx_fold_bn_into_preceding_layer(model: ir.Model) -> PassResult:
    """Fold every BN that follows a Conv, ConvTranspose, Gemm or MatMul; say why for the others."""
    return fold_by_rules(
        model, RULES, _layer_path, partial(_why_left, model), "into the layer before it", layer_in=lambda path: path[-1]
    )


def _layer_path(bn: ir.Node) -> list[ir.Node]:
    """The nodes from the BN back to its layer, through a Transpose and an Add; [] if none."""
    path, node = [], bn.inputs[0].producer()
    while node is not None and len(path) < 3:
        path.append(node)
        if node.op_type in LAYER_OPS:
            return path
        if node.op_type not in ("Transpose", "Add"):
            break
        node = node.inputs[0].producer() if node.op_type == "Transpose" else _matmul_operand(node)
    return []


def _matmul_operand(add: ir.Node) -> ir.Node | None:
    producers = [v.producer() for v in add.inputs if v is not None]
    return next((p for p in producers if p is not None and p.op_type == "MatMul"), None)


def _why_left(model: ir.Model, bn: ir.Node, path: list[ir.Node]) -> str:
    reason = layer_fold_reason(bn)
    if reason:
        return reason
    source = bn.inputs[0].producer()
    if source is None:
        return f"its input {bn.inputs[0].name!r} is a graph input: there is no layer before it"
    if not path:
        return f"its input comes from {source.op_type} {site(source)!r}, not from a Conv, ConvTranspose, Gemm or MatMul"
    for node in path:
        others = sorted({site(u) for u, _ in node.outputs[0].uses()} - {site(bn)} - {site(n) for n in path})
        if others:
            feeds = ", ".join(others)
            return f"the output of {node.op_type} {site(node)!r} also feeds {feeds}, which needs it unnormalized"
        if node.outputs[0].is_graph_output():
            return (f"the output of {node.op_type} {site(node)!r} is also the graph output "
                    f"{node.outputs[0].name!r}, which must keep its value")
    # The structure fits a rule, so its check said no: take the reason it gave.
    for rule in RULES:
        tracer = MatchingTracer()
        rule.match(model, model.graph, bn, tracer=tracer)
        for info in tracer.best_matches_map.get(rule, []):
            if info.status == MatchStatus.CONDITION_FAILED and info.match_result.reason:
                return info.match_result.reason
    return f"no rule folds it into {path[-1].op_type} {site(path[-1])!r}"
