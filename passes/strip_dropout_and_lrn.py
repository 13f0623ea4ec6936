"""Remove Dropout and Local Response Normalization (paper, Sec. 4.2.1: BN makes both unneeded).

Each such op is replaced by its input; the modules it called are deleted from the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from bngraph.passes._op_kinds import first_node_arg, op_label
from bngraph.passes.base import PassResult, graph_pass

STRIPPED_MODULES = (nn.modules.dropout._DropoutNd, nn.LocalResponseNorm, nn.CrossMapLRN2d)
# torch's own forms too (`torch.dropout(x, p, self.training)`), which F.dropout calls.
STRIPPED_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.local_response_norm,
    torch.dropout, torch.dropout_, torch.feature_dropout, torch.feature_dropout_, torch.alpha_dropout,
    torch.alpha_dropout_, torch.feature_alpha_dropout, torch.feature_alpha_dropout_,
}


def _is_stripped(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), STRIPPED_MODULES)
    return node.op == "call_function" and node.target in STRIPPED_FUNCTIONS


@graph_pass(in_place=True)
def strip_dropout_and_lrn(gm: fx.GraphModule) -> PassResult:
    """Replace every Dropout and LocalResponseNorm by its input."""
    result = PassResult(gm)
    for node in list(gm.graph.nodes):
        if not _is_stripped(gm, node):
            continue
        label = op_label(gm, node)
        node.replace_all_uses_with(first_node_arg(node))
        gm.graph.erase_node(node)
        result.changed.append(node.name)
        result.details.append({"node": node.name, "op": label})
    if result.changed:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return result
