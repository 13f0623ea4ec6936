"""Give a layer feeding a BatchNormalization its own copy of a weight or bias it shares.

Folding a BN rescales the layer's weight, W' = W * gamma / sqrt(var + eps) per output channel.
When another node reads the same initializer (a layer applied twice, tied weights), W itself
must stay, so the folded layer needs a copy: onnxscript's rules refuse shared initializers,
because they write the folded tensor back under the old name. After this pass they fold.
Only layers whose BN fold can go ahead get a copy; the file grows by one weight per copy.
"""

from __future__ import annotations

import onnx_ir as ir

from bngraph.passes._onnx_common import bns_fed_by, fresh_name, site
from bngraph.passes.base import PassResult, graph_pass

# The layers whose initializers onnxscript's BN rules rewrite under their own names.
_RULE_LAYERS = ("Conv", "ConvTranspose", "Gemm")


@graph_pass(in_place=True)
def onnx_copy_shared_weights(model: ir.Model) -> PassResult:
    """Copy each shared weight/bias of a Conv, ConvTranspose or Gemm whose only user is a BN."""
    result = PassResult(model)
    graph = model.graph
    # Other BNs are not a fold these rules make: the fold pass reports why.
    for bn, layer in bns_fed_by(model, _RULE_LAYERS):
        if len(bn.inputs[0].uses()) != 1:
            continue
        copied, shared_with = [], set()
        for index, value in list(enumerate(layer.inputs))[1:]:
            if value is None or value.const_value is None:
                continue
            others = {site(user) for user, _ in value.uses() if user is not layer}
            if not others:
                continue
            copy = ir.Value(
                name=fresh_name(graph, f"{value.name}_{site(layer)}"),
                shape=value.shape,
                type=value.type,
                const_value=ir.tensor(value.const_value.numpy().copy()),
            )
            graph.register_initializer(copy)
            layer.replace_input_with(index, copy)
            copied.append(value.name)
            shared_with |= others
        if copied:
            result.changed.append(site(layer))
            row = {"layer": site(layer), "copied": ", ".join(copied), "shared_with": ", ".join(sorted(shared_with))}
            result.details.append(row)
    return result
