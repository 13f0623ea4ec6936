"""Replace each BatchNorm that no layer could take by one per-channel multiply-add.

In eval mode BN(x) = s * x + t with s and t per channel of axis 1 (paper, Algorithm 2 step 3;
s and t from `_bn_affine`, which asks torch.nn.utils.fusion in float64). The BN becomes a single
`torch.addcmul(t, x, s)` with s and t constant buffers shaped (C, 1, ..., 1), so that they
broadcast over axis 1: exact for any producer (a pool, an add, a model input) and any consumer.
A BN that is not a fixed affine map (training mode, no running statistics, statistics computed
in the graph) is left as it is, with the reason.

Speed on one CPU thread (benchmarks/multiply_add_speed.py prints the ratios): on (N, C) the
addcmul takes 0.4x the time of the eval-mode BN kernel; with spatial axes it takes 1.7-3x, as
TensorIterator vectorizes a loop with one broadcast operand, not two, while the BN kernel runs
per channel plane. `x * s` then an in-place `+ t` lies between. Every other single op measured
(a depthwise 1x1 conv) is slower still; the BN kernel itself would leave a BatchNorm in the graph.
"""

from __future__ import annotations

import torch
from torch import fx

from bngraph.passes._bn_affine import scale_shift
from bngraph.passes._fx_batchnorm import fixed_batch_norms, flag_rounding
from bngraph.passes._fx_layers import free_name
from bngraph.passes._fx_meta import tensor_dtype, tensor_shape
from bngraph.passes.base import PassResult, Probe, graph_pass


@graph_pass(in_place=True)
def replace_bn_with_multiply_add(gm: fx.GraphModule) -> PassResult:
    """Turn every BatchNorm with fixed statistics into `addcmul(shift, x, scale)`."""
    result = PassResult(gm)
    for site in fixed_batch_norms(gm, result):
        node = site.node
        rank, dtype = len(tensor_shape(node)), tensor_dtype(node)
        like = site.stats.running_mean
        with torch.no_grad():
            scale, shift = scale_shift(site.stats)
        per_channel = (scale.shape[0],) + (1,) * (rank - 2)  # broadcasts over axis 1 of (N, C, *)
        names = []
        for what, value in (("scale", scale), ("shift", shift)):
            names.append(free_name(gm, f"{node.name}_{what}"))
            gm.register_buffer(names[-1], value.reshape(per_channel).to(dtype=dtype or like.dtype, device=like.device))
        with gm.graph.inserting_before(node):
            scale_node, shift_node = gm.graph.get_attr(names[0]), gm.graph.get_attr(names[1])
            # One kernel rather than a mul and an add.
            multiply_add = gm.graph.call_function(torch.addcmul, (shift_node, site.input, scale_node))
        multiply_add.meta = dict(node.meta)
        node.replace_all_uses_with(multiply_add)
        gm.graph.erase_node(node)
        result.changed.append(node.name)
        row = {"node": node.name, "into": multiply_add.name, "how": "multiply-add", "note": ""}
        flag_rounding(result, row, site, Probe(reference=node.name, folded=multiply_add.name))
        result.details.append(row)
    if result.changed:
        gm.recompile()
    return result

