"""Remove chains of transposes/permutes that undo each other.

`y = x.permute(P)` holds x's axis P[j] at axis j; `z = y.permute(Q)` then holds x's axis
P[Q[k]] at axis k, so when P[Q[k]] == k for every k, z has x's values and the chain goes. They
appear when a BN between `transpose(1, -1)` and `transpose(1, -1)` (the insert pass's way of
normalizing the features of a Linear on (N, T, C)) has been folded away. A `contiguous()` inside
the chain goes with it; one at its end stays, as a later `view` may need it. Every node of the
chain but the last must have no other user, or it still has to run. A chain with a
`contiguous()` inside, whose result is then written in place, stays: the copy `contiguous()` may
have made is what the write changed, and without the chain the write would reach its input.
"""

from __future__ import annotations

from torch import fx

from bngraph.passes._fx_batchnorm import permutation
from bngraph.passes._fx_effects import mutations_of
from bngraph.passes.base import PassResult, Skip, graph_pass


@graph_pass(in_place=True)
def cancel_inverse_permutes(gm: fx.GraphModule) -> PassResult:
    """Replace every chain of permutes that composes to the identity by its input (needs shapes)."""
    result = PassResult(gm)
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        composed = permutation(node) if node not in erased and node.target != "contiguous" else None
        if composed is None:
            continue
        chain, source = [node], node.args[0]
        while (inner := permutation(source)) is not None and len(source.users) == 1:
            composed = [inner[axis] for axis in composed]  # node's axis k is axis inner[composed[k]] here
            chain, source = [*chain, source], source.args[0]
            if composed == sorted(composed):
                written = mutations_of(node) if any(n.target == "contiguous" for n in chain) else []
                if written:
                    result.skipped.append(Skip(node.name, f"{written[0].name} writes in place into the copy that "
                                                          f"contiguous() made of {source.name}"))
                    break
                node.replace_all_uses_with(source)
                for dead in chain:  # users first
                    gm.graph.erase_node(dead)
                erased.update(chain)
                result.changed.append(node.name)
                result.details.append({"node": node.name, "undoes": ", ".join(n.name for n in chain[1:])})
                break
    if result.changed:
        gm.recompile()
    return result
