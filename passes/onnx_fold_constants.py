"""Compute every subgraph of constants once, so that the BN rules see weights and biases as initializers.

The torch.export-based exporter with its optimizer off writes the bias of a bias-free conv as
a computation on the weight's shape, `Expand(CastLike(0, x), Shape(W)[0:1])`, and the
TorchScript exporter without constant folding writes a Linear's weight as `Transpose(W)`.
A BN fold needs both as constants, so this pass runs first: onnxscript's constant folder
(its own size limits, which still fold a large weight's Transpose since that frees the
original), then every Constant node lifted to an initializer, then dead nodes removed.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript.optimizer import fold_constants_ir

from bngraph.passes._onnx_common import report_removed_nodes
from bngraph.passes.base import PassResult, graph_pass


@graph_pass(in_place=True)
def onnx_fold_constants(model: ir.Model) -> PassResult:
    """Fold constant subgraphs into initializers; `changed` lists the nodes that disappeared."""

    def fold(model: ir.Model) -> None:
        # Shape inference on: later passes need the rank of a BN's input for its Mul+Add form.
        # The folder logs a warning for each node it cannot evaluate ("Evaluation failed: cannot
        # reshape array...", on BERT's position ids) and leaves that node as it was: nothing
        # for the user's terminal.
        folder_log = logging.getLogger("onnxscript.optimizer._constant_folding")
        level = folder_log.level
        folder_log.setLevel(logging.ERROR)
        try:
            fold_constants_ir(model, onnx_shape_inference=True)
        finally:
            folder_log.setLevel(level)
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        ir_passes.RemoveUnusedNodesPass()(model)

    return report_removed_nodes(model, fold)
