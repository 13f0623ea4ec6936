"""Make the initializers that a file also lists as graph inputs what they are in practice: constants.

IR version 3 required every initializer to be a graph input as well (a default that a caller
may override), so older exporters list every weight and BN statistic as an input. Read
literally, no BN of such a file has constant statistics and nothing folds. Nobody feeds a model
its own weights, so they become constants: removed from the inputs, and the IR version raised
to 4, the first that lets an initializer stand alone (opsets keep their meaning). A caller that
does override one asks to keep them (`fold_onnx(keep_initializer_inputs=True)`); a BN that
reads one is then left, with that reason.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from bngraph.passes.base import PassResult, graph_pass

FIRST_IR_WITHOUT_INITIALIZER_INPUTS = 4


@graph_pass(in_place=True)
def onnx_initializer_inputs_to_constants(model: ir.Model) -> PassResult:
    """Drop every initializer from the graph inputs; `changed` names them."""
    result = PassResult(model)
    result.changed = [v.name for v in model.graph.inputs if v.name in model.graph.initializers]
    if result.changed:
        ir_passes.RemoveInitializersFromInputsPass()(model)
        result.details.append({"inputs": len(result.changed), "ir_version": model.ir_version})
        model.ir_version = max(model.ir_version, FIRST_IR_WITHOUT_INITIALIZER_INPUTS)
    return result
