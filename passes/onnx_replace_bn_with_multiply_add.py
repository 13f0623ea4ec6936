"""Turn each BatchNormalization left after the folds into Mul + Add, for a runtime without a
BatchNormalization kernel (`fold_onnx(standalone_bn="mul-add")`); onnxruntime runs the BN itself
faster, so the default pipeline keeps it (bngraph/onnx_fold.py).

In eval mode a BN is the fixed affine map of Algorithm 2, step 3:
    y = s * x + t,   s = gamma / sqrt(var + eps),   t = beta - s * mean   (per channel),
with s and t from `bn_scale_shift` (torch.nn.utils.fusion) shaped (C, 1, ..., 1) to broadcast
over axis 1. Every runtime has Mul and Add, and they run where BN kernels are missing
(some accelerators have none). spatial=0 statistics (opsets 7, 8) give (C, D1, ...) constants.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from bngraph.passes._onnx_common import batchnorms, bn_scale_shift, new_initializer, rank, site, skip_reason
from bngraph.passes.base import PassResult, Skip, graph_pass


class BnToMulAdd(RewriteRuleClassBase):
    def pattern(self, op, x):
        return op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["bn_out"])

    def check(self, context, x, bn_out) -> MatchResult:
        reason = _refusal(bn_out.producer())
        return MatchResult().fail(reason) if reason else MatchResult()

    def rewrite(self, op, x, bn_out):
        bn = bn_out.producer()
        scale, shift = bn_scale_shift(bn)
        # Per channel: (C, 1, ..., 1). spatial=0 statistics are already shaped (C, D1, ...).
        shape = scale.shape if scale.ndim > 1 else (scale.shape[0],) + (1,) * (rank(x) - 2)
        # A BN may keep float32 statistics for a float16 input (opset 15); Mul and Add may not.
        graph, dtype = bn.graph, x.dtype
        y = op.Mul(x, new_initializer(op, graph, scale.reshape(shape), f"{bn.inputs[1].name}_scale", dtype))
        return op.Add(y, new_initializer(op, graph, shift.reshape(shape), f"{bn.inputs[2].name}_shift", dtype))


def _refusal(bn: ir.Node) -> str | None:
    reason = skip_reason(bn)
    if reason:
        return reason
    if rank(bn.inputs[0]) is None:
        return "the rank of its input is unknown, so its channel axis cannot be broadcast"
    return _statistics_misfit(bn)


def _statistics_misfit(bn: ir.Node) -> str | None:
    """Why its statistics cannot broadcast over its input: (C,), or (C, D1, ...) for spatial=0, is
    what the spec allows; flattened (C*D,) ones, which onnxruntime refuses to run too, made a
    Mul the checker failed."""
    stats = bn.inputs[3].shape
    sizes = list(bn.inputs[0].shape or [])[1:]
    if stats is None:
        return None
    expected = sizes[:1] if len(stats) == 1 else sizes
    if len(stats) != len(expected) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                          for a, b in zip(stats, expected)):
        return (f"its statistics are shaped {list(stats)}, which fits neither its channel axis nor its input's "
                f"{[d if isinstance(d, int) else '?' for d in sizes]} per example")
    return None


RULES = RewriteRuleSet([BnToMulAdd.rule()])


@graph_pass(in_place=True)
def onnx_replace_bn_with_multiply_add(model: ir.Model) -> PassResult:
    """Rewrite every eval-mode BN of constants as Mul + Add; a training-mode BN stays."""
    result = PassResult(model)
    before = batchnorms(model)
    RULES.apply_to_model(model)
    left = set(batchnorms(model))
    for bn in before:
        if bn in left:
            result.skipped.append(Skip(site(bn), _refusal(bn) or "no rule matched it"))
        else:
            result.changed.append(site(bn))
            result.details.append({"node": site(bn), "into": "Mul + Add", "how": "multiply-add", "note": ""})
    return result
