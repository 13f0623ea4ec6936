"""Tidy a rewritten ONNX model and prove it well formed: onnx-ir's common passes, then onnx.checker.

Rewrites leave the old weights and BN statistics behind as unused initializers, and new
nodes at the end of the node list; a model with either still loads, but onnx.checker (with
full shape inference) is the contract every runtime assumes. `changed` names the initializers
removed.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from bngraph.passes.base import PassResult, graph_pass


@graph_pass(in_place=True)
def onnx_check(model: ir.Model) -> PassResult:
    """Remove dead nodes and initializers, sort, infer shapes, run the full onnx.checker."""
    before = set(model.graph.initializers)
    ir_passes.RemoveUnusedNodesPass()(model)
    ir_passes.TopologicalSortPass()(model)
    ir_passes.ShapeInferencePass()(model)
    ir_passes.CheckerPass(full_check=True)(model)  # raises onnx.checker.ValidationError
    result = PassResult(model)
    result.changed = sorted(before - set(model.graph.initializers))
    return result
