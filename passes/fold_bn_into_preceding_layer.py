"""Fold each BatchNorm into the conv, transposed conv or linear layer that produces its input.

In eval mode BN(z) = s * z + t per channel (paper, Algorithm 2 step 3), so for z = W x + b the
pair is one layer with W' = diag(s) W and b' = s * b + t (see `_bn_affine`, which calls
torch.nn.utils.fusion in float64). Matched on the graph by operation, not by module type, with a
shape proof that the BN normalizes the layer's output features. Cases, numbered as in the code:
  1. The BN is not a fixed affine map (training mode, no running statistics...): skip.
  2. Its input, looked at through transposes, is not a conv or linear: skip.
  3. That output (or a transpose on the way) has other users, who need it unnormalized: skip.
  4. The axis it normalizes is not the layer's feature axis, e.g. BatchNorm1d(T) on a Linear's
     (N, T, C) output, which fx's `fuse` folds onto C when T == C: skip. The insert pass's
     `transpose(1, -1) -> BN -> transpose(1, -1)` behind a Linear passes this proof.
  5. Fold; a layer whose weights other nodes share gets a copy for this site.
The transposes left facing each other are `cancel_inverse_permutes`' job.
"""

from __future__ import annotations

import torch
from torch import fx

from bngraph.passes._bn_affine import fold_into_producer
from bngraph.passes._fx_batchnorm import axis_at_source, describe, fixed_batch_norms, flag_rounding
from bngraph.passes._fx_effects import value_readers
from bngraph.passes._fx_layers import TensorUses, as_layer, write_weights
from bngraph.passes._fx_meta import tensor_shape
from bngraph.passes.base import PassResult, Probe, Skip, graph_pass


@graph_pass(in_place=True)
def fold_bn_into_preceding_layer(gm: fx.GraphModule) -> PassResult:
    """Fold every BatchNorm that a conv or linear layer feeds (needs recorded shapes)."""
    result = PassResult(gm)
    modules = dict(gm.named_modules())
    uses = TensorUses(gm, modules)
    flagged_at: dict[fx.Node, str] = {}  # node -> the flagged BN whose error is measured at its output
    for site in fixed_batch_norms(gm, result):  # 1.
        node = site.node
        # 2.
        source, axis, moves = axis_at_source(site.input, 1)
        layer = as_layer(source, gm, modules)
        if not layer or isinstance(layer, str):
            result.skipped.append(Skip(node.name, layer or f"its input comes from {describe(gm, source)}, not a conv or linear"))
            continue
        # 3.
        busy = next((n for n in [source, *moves] if len(value_readers(n)) > 1), None)
        if busy is not None:
            others = ", ".join(u.name for u in value_readers(busy) if u is not node and u not in moves)
            result.skipped.append(Skip(node.name, f"the output of {busy.name} also feeds {others}, which needs it unnormalized"))
            continue
        # 4.
        reason = layer.axis_mismatch(tensor_shape(source), axis, "output")
        if reason:
            result.skipped.append(Skip(node.name, reason))
            continue
        # 5.
        with torch.no_grad():
            weight, bias = fold_into_producer(layer.kind, layer.weight, layer.bias, layer.groups, site.stats)
        note = write_weights(gm, layer, weight, bias, uses, modules, bn_bias=site.stats.bias)
        node.replace_all_uses_with(site.input)
        gm.graph.erase_node(node)
        result.changed.append(node.name)
        row = {"node": node.name, "into": layer.label, "how": "into the layer before it", "note": note or ""}
        if site.input in flagged_at:  # BN -> BN: that output now holds this BN's result too
            earlier = flagged_at[site.input]
            result.probes[earlier] = Probe(reference=node.name, folded=result.probes[earlier].folded)
        if flag_rounding(result, row, site, Probe(reference=node.name, folded=site.input.name)):
            flagged_at[site.input] = node.name
        result.details.append(row)
    if result.changed:
        gm.recompile()
    return result

