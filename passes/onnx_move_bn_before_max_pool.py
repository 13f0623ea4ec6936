"""Move a BatchNormalization from after a MaxPool to before it, where its scales are all >= 0,
so that it folds into the Conv that feeds the pool.

Per channel the BN is y = s * x + t. For s >= 0 that map never decreases, so it commutes with
a maximum: max_k (s x_k + t) = s max_k x_k + t, for every window and any padding (MaxPool
ignores its padding, it never takes the max over it). Then
    BN(MaxPool(Conv(x))) = MaxPool(BN(Conv(x))) = MaxPool(Conv'(x))   exactly.
A scale below zero turns the max into a min: such a BN stays where it is (reported). Trained
networks often have every gamma > 0, so this is the fold for most BNs after a pool. Only
where the pool's input comes from a Conv or ConvTranspose read by nothing else, and the pool's
output (and not its indices) is read by the BN alone: elsewhere the move gains nothing.
"""

from __future__ import annotations

import onnx_ir as ir

from bngraph.passes._onnx_common import CONV_LAYERS, bn_scale_shift, bns_fed_by, site
from bngraph.passes.base import PassResult, Skip, graph_pass

@graph_pass(in_place=True)
def onnx_move_bn_before_max_pool(model: ir.Model) -> PassResult:
    """Swap MaxPool -> BN into BN -> MaxPool where the BN then follows a layer; `changed` names the BNs."""
    result = PassResult(model)
    for bn, pool in bns_fed_by(model, ("MaxPool",)):
        pooled, pool_input = pool.outputs[0], pool.inputs[0]
        layer = pool_input.producer()
        if layer is None or layer.op_type not in CONV_LAYERS or len(pool_input.uses()) != 1 or pool_input.is_graph_output():
            continue  # no layer to fold into before the pool: moving the BN gains nothing
        if len(pooled.uses()) != 1 or pooled.is_graph_output() or any(o.uses() or o.is_graph_output() for o in pool.outputs[1:]):
            continue  # the pool's output or indices are read elsewhere: the fold passes say why
        scale, _ = bn_scale_shift(bn)
        negative = int((scale < 0).sum())
        if negative:
            why = f"{negative} of its {scale.numel()} scales are negative, and max(s * x) = s * min(x) for s < 0"
            result.skipped.append(Skip(site(bn), f"it cannot move before {site(pool)!r}: {why}"))
            continue
        normalized = bn.outputs[0]
        bn.replace_input_with(0, pool_input)
        if normalized.is_graph_output():  # the pool's output takes over the model output and its name
            outputs = model.graph.outputs
            outputs[outputs.index(normalized)] = pooled
            name = normalized.name
            normalized.name, pooled.name = f"{name}_before_pool", name
        normalized.replace_all_uses_with(pooled)
        pool.replace_input_with(0, normalized)
        normalized.shape = pool_input.shape
        model.graph.remove(bn)
        model.graph.insert_before(pool, bn)
        result.changed.append(site(bn))
        result.details.append({"node": site(bn), "moved_before": site(pool), "layer": site(layer)})
    return result
