"""Remove the ops that return their input in eval mode: nn.Identity and Dropout.

A Dropout module in eval mode, or F.dropout called with training=False, passes its input
through; in the folded model such a node is only a call's overhead, and it can stand between a
layer and its BatchNorm. Unlike `strip_dropout_and_lrn` (paper, Sec. 4.2.1) this never changes
what the model computes: a Dropout in training mode, or F.dropout with training=True (which
drops activations even in eval mode), is kept, with the reason, and so is a module with hooks,
which would no longer run.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from bngraph.passes._fx_batchnorm import arg
from bngraph.passes._fx_effects import hook_refusal
from bngraph.passes.base import PassResult, Skip, graph_pass

# Each dropout function's `training` argument (position 2) and its default.
_DROPOUT_FUNCTIONS = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True,
                      F.alpha_dropout: False, F.feature_alpha_dropout: False}


@graph_pass(in_place=True)
def remove_eval_identities(gm: fx.GraphModule) -> PassResult:
    """Replace every nn.Identity and every Dropout that is off by its input."""
    result = PassResult(gm)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), (nn.Identity, nn.modules.dropout._DropoutNd)):
            module = modules[node.target]
            if module.training and not isinstance(module, nn.Identity):
                result.skipped.append(Skip(node.name, f"{node.target} is in training mode, so it drops activations"))
                continue
            if reason := hook_refusal(node.target, module, "removing it"):
                result.skipped.append(Skip(node.name, reason))
                continue
            label = type(module).__name__
        elif node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            if arg(node, 2, "training", _DROPOUT_FUNCTIONS[node.target]) is not False:
                result.skipped.append(Skip(node.name, f"it calls F.{node.target.__name__} with training=True, "
                                                      "which drops activations in eval mode too"))
                continue
            label = f"F.{node.target.__name__}"
        else:
            continue
        node.replace_all_uses_with(arg(node, 0, "input"))
        gm.graph.erase_node(node)
        result.changed.append(node.name)
        result.details.append({"node": node.name, "op": label})
    if result.changed:
        gm.recompile()
    return result
