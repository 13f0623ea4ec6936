"""Replace one nonlinearity by another: ReLU -> sigmoid makes BN-x5-Sigmoid (paper, Sec. 4.2.2).

Module calls get a new module at the same path (so the artifact reads naturally); function and
method calls become a call of the new activation's functional form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from bngraph.passes._op_kinds import activation_kind
from bngraph.passes.base import PassResult, Skip, graph_pass

# What each target is as a module and as a function of one tensor.
TARGETS: dict[str, tuple[Callable[[], nn.Module], Callable]] = {
    "sigmoid": (nn.Sigmoid, torch.sigmoid),
    "relu": (nn.ReLU, torch.relu),
    "tanh": (nn.Tanh, torch.tanh),
}


class SwapActivation:
    """Swap every activation of a kind in `replace` (module class names or functional names,
    compared lower-case: 'relu' matches nn.ReLU, F.relu and x.relu()) for `to`."""

    in_place = True

    def __init__(self, to: str = "sigmoid", replace: tuple[str, ...] = ("relu",)):
        if to not in TARGETS:
            raise ValueError(f"unknown activation {to!r}; choose from {sorted(TARGETS)}")
        self.to, self.replace = to, {r.lower() for r in replace}
        self.name = f"swap_activation({'|'.join(sorted(self.replace))}->{to})"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(gm)
        make_module, function = TARGETS[self.to]
        for node in list(gm.graph.nodes):
            kind = activation_kind(gm, node)
            if kind is None or kind.lower() == self.to:
                continue
            if kind.lower() not in self.replace:  # a user's GELU under the paper's ReLU -> sigmoid
                result.skipped.append(Skip(node.name, f"{kind} is not {' or '.join(sorted(self.replace))}: kept"))
                continue
            if _writes_its_input(gm, node):
                # `h.relu_()`, ReLU(inplace=True): the code may read the result through h, so the
                # new activation writes it there too (an out-of-place sigmoid nobody read left
                # the net without its nonlinearity).
                node.op, node.target, node.args, node.kwargs = "call_method", f"{self.to}_", node.args[:1], {}
            elif node.op == "call_module":
                *parent, name = node.target.split(".")
                gm.get_submodule(".".join(parent)).add_module(name, make_module())
            else:
                node.op, node.target = "call_function", function
                node.args, node.kwargs = node.args[:1], {}  # inplace=, negative_slope= belong to the old one
            result.changed.append(node.name)
            result.details.append({"node": node.name, "from": kind, "to": self.to})
        if result.changed:
            gm.recompile()
        return result


def _writes_its_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the activation at `node` overwrites its input: a module with inplace=True,
    `F.relu(h, inplace=True)` (or True as its second argument), `torch.relu_(h)`, `h.relu_()`."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or node.kwargs.get("inplace") is True or (
        node.op == "call_function" and len(node.args) > 1 and node.args[-1] is True)


@graph_pass(in_place=True)
def swap_activation(gm: fx.GraphModule, to: str = "sigmoid", replace: tuple[str, ...] = ("relu",)) -> PassResult:
    """Replace every nonlinearity of the kinds in `replace` by `to` (ReLU -> sigmoid for
    BN-x5-Sigmoid, paper Sec. 4.2.2); see `SwapActivation`."""
    return SwapActivation(to, replace)(gm)
