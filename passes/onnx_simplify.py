"""Tidy the graph once the BatchNorms are gone: onnxscript's optimizer, minus its BN fusions and
the rules that are not exact (below).

Constant folding with shape inference turns the exporter's dynamic flatten chain
(Shape, Squeeze, Concat, Reshape) into one Reshape, and onnxscript's default rewrite rules
cancel the Transpose pairs that a BN over a Linear's features leaves behind. Its BatchNorm
rules are left out: they fuse a BN in training mode too (onnxscript 0.7.2), and the BNs are
ours to fold, with the guards and the report.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import onnxscript.rewriter
from onnxscript.rewriter.rules.common import _cast_constant_of_shape, _fuse_relus_clips, _no_op

from bngraph.passes._onnx_common import fold_constants_quietly, report_removed_nodes
from bngraph.passes.base import PassResult, Skip, graph_pass

# Left out besides, as not exact: the no-op rules (x * 1, x + 0, ...), whose constants match
# within a tolerance (onnxscript 0.7.2: `x + 1e-8` became x, a PixelNorm's epsilon, and before a
# log a zero's -18.4 became -inf); the Clip and Relu fusions, which read an opset-6 Clip's bounds
# as absent (two clamps became none) and merge ranges that do not overlap; the Min/Max fusions,
# whose Clip drops the rank a bound of higher rank broadcasts the input to; the Cast pair,
# which rounds a float64 once where the file rounded it twice (to float32, then float16); the
# Conv pad normalization, which computes SAME pads as if dilation were 1; and the Pad fusion into
# ConvInteger, which pads with its zero point where the Pad wrote 0; and the Casts of a filled
# constant: one casts the fill value with numpy, not as Cast does (300.0 to uint8 raised
# OverflowError, where onnxruntime wraps it to 44), the other, for a ConstantOfShape without a
# value, matches one with a value too and fills with 0.
_NOT_EXACT = {id(rule) for rules in (_no_op.rules, _fuse_relus_clips.rules, _cast_constant_of_shape.rules)
              for rule in rules.rules}
_NOT_EXACT_NAMES = ("BatchNorm", "NormalizePadFormat", "FuseConvIntegerPad", "FuseSuccessiveMin", "FuseSuccessiveMax",
                    "FuseMinMaxToClip", "FuseMaxMinToClip", "CastCast")
_TIDY = [rule for rule in onnxscript.rewriter._DEFAULT_REWRITE_RULES
         if id(rule) not in _NOT_EXACT and not any(word in (rule.name or "") for word in _NOT_EXACT_NAMES)]
# The rest write and read today's forms of their ops: a Reshape's allowzero (opset 14), a Pad's and
# an Unsqueeze's inputs, a Clip's (opset 11, 13). In an older file they failed (a Pad whose pads
# are an attribute: IndexError) or wrote an op the file's opset lacks; there only these, the same
# in every opset, run.
_ANY_OPSET = {"TransposeTranspose", "TransposeIdentity", "CastCast", "CastIdentity", "ExpandIdentity", "Flatten2Reshape",
              "ReshapeReshape", "SqueezeReshape1d", "RemoveOptionalBiasFromConv", "RemoveOptionalBiasFromConvTranspose",
              "RemoveOptionalBiasFromQLinearConv"}  # not Gemm's: its C is optional from opset 11 only


def tidy_rules(opset: int) -> onnxscript.rewriter.RewriteRuleSet:
    """The tidy rules for a file of this default-domain opset."""
    if opset >= 14:
        return onnxscript.rewriter.RewriteRuleSet(_TIDY)
    if opset >= 13:
        return onnxscript.rewriter.RewriteRuleSet([rule for rule in _TIDY if rule.name != "MaterializeReshapeShape"])
    return onnxscript.rewriter.RewriteRuleSet([rule for rule in _TIDY if rule.name in _ANY_OPSET])


@graph_pass(in_place=True)
def onnx_simplify(model: ir.Model, rounds: int = 2) -> PassResult:
    """Fold constants and apply the tidy rules; `changed` lists the nodes that disappeared."""

    rules = tidy_rules(model.opset_imports.get("", 0))
    # onnxscript rewrites inside If, Loop and Scan graphs too, where verification runs only the
    # branches its batches take: there, only constants are folded (exact, whatever the branch).
    branches = [node for node in model.graph.all_nodes() if node.op_type in ("If", "Loop", "Scan")]
    branches += [node for function in model.functions.values() for node in function.all_nodes()
                 if node.op_type in ("If", "Loop", "Scan")]

    def simplify(model: ir.Model) -> None:
        for _ in range(rounds):  # a rewrite can expose a constant, and the other way round
            fold_constants_quietly(model)
            if not branches:
                onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=rules)
            ir_passes.RemoveUnusedNodesPass()(model)
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        ir_passes.CommonSubexpressionEliminationPass()(model)

    result = report_removed_nodes(model, simplify)
    if branches:
        result.skipped.append(Skip(site="rewrite rules", reason=f"the file has {len(branches)} If/Loop/Scan node(s), "
                                   "whose graphs verification may not run: only constants were folded"))
    return result
