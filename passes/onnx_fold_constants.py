"""Compute every subgraph of constants once, so that the BN rules see weights and biases as initializers.

The torch.export-based exporter with its optimizer off writes the bias of a bias-free conv as
a computation on the weight's shape, `Expand(CastLike(0, x), Shape(W)[0:1])`, and the
TorchScript exporter without constant folding writes a Linear's weight as `Transpose(W)`.
A BN fold needs both as constants, so this pass runs first: onnxscript's constant folder
(its own size limits, which still fold a large weight's Transpose since that frees the
original), then every Constant node lifted to an initializer, then dead nodes removed.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from bngraph.passes._onnx_common import fold_constants_quietly, report_removed_nodes
from bngraph.passes.base import PassResult, graph_pass


@graph_pass(in_place=True)
def onnx_fold_constants(model: ir.Model) -> PassResult:
    """Fold constant subgraphs into initializers; `changed` lists the nodes that disappeared."""

    def fold(model: ir.Model) -> None:
        fold_constants_quietly(model)  # with shape inference: a BN's Mul+Add form needs its input's rank
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        ir_passes.RemoveUnusedNodesPass()(model)

    return report_removed_nodes(model, fold)
