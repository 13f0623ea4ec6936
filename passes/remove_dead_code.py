"""Remove what no longer computes anything: dead nodes, then the modules and tensors only they used.

After a fold the BatchNorm modules, the get_attr nodes of F.batch_norm's statistics and the
weights of layers that got a copy are unreachable; left in place they would still be saved,
loaded and moved between devices. torch.fx's `delete_all_unused_submodules` tests membership
in a list (quadratic in the number of modules), so this pass keeps sets. A node nobody reads
is dead only if it has no effect: `out.add_(x)`, `x[i] = v`, an inplace ReLU or a hooked module
stay (`_fx_effects.is_impure_node`; fx's own rule knows none of them). A module the graph reads
a tensor of keeps all its own tensors.
"""

from __future__ import annotations

from torch import fx, nn

from bngraph.passes._fx_effects import is_impure_node
from bngraph.passes.base import PassResult, graph_pass


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _is_module(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


@graph_pass(in_place=True)
def remove_dead_code(gm: fx.GraphModule) -> PassResult:
    """Eliminate dead nodes, then every submodule, parameter and buffer that no node reaches."""
    result = PassResult(gm)
    before = [n.name for n in gm.graph.nodes]
    gm.graph.eliminate_dead_code(is_impure_node=is_impure_node)
    alive = {n.name for n in gm.graph.nodes}
    result.changed += [name for name in before if name not in alive]

    fetched = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    # Used with all they hold: modules called, and modules fetched whole (passed to a function).
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"} | {t for t in fetched if _is_module(gm, t)}
    on_path = {p for target in called | fetched for p in _prefixes(target)}

    def is_held(path: str) -> bool:  # by a called module, itself or an ancestor
        return bool(path) and any(p in called for p in _prefixes(path))

    def is_used(path: str) -> bool:
        return path in on_path or is_held(path)

    dropped: set[str] = set()
    for path, _ in gm.named_modules():
        if path and not is_used(path) and not any(p in dropped for p in _prefixes(path)[:-1]):
            dropped.add(path)
    for path in sorted(dropped):
        gm.delete_submodule(path)
    # A module one of whose own tensors a node reads (`self.bn.weight` in the forward) keeps them
    # all: a BatchNorm2d without its running_var is no BatchNorm2d (its repr, its state dict and
    # a move to a device read every one). Only the graph itself and fx's plain containers give theirs up.
    read_whole = {t.rpartition(".")[0] for t in fetched if not _is_module(gm, t)}
    for owner, module in gm.named_modules():
        if is_held(owner) or owner and owner in read_whole and type(module) is not nn.Module:
            continue
        for tensors in (module._parameters, module._buffers):
            for attr in [a for a, t in tensors.items() if t is not None]:
                path = f"{owner}.{attr}" if owner else attr
                if path not in fetched:
                    delattr(module, attr)
                    dropped.add(path)
    result.changed += [f"self.{path}" for path in sorted(dropped)]  # attributes, apart from node names
    if result.changed:
        gm.recompile()
    return result
