"""BatchNorms that the folding passes cannot reach in a traced graph, and the one way in.

fx keeps some modules as one call: a TorchScript module, a custom leaf, and (`bngraph.trace`)
any module with hooks, which run only when the module itself is called. A BN inside one, or a
BN the graph hands to a wrapped function as a module, is no node of the graph: each is listed
with the reason, so that `fold --strict` sees it. A BN the forward never reaches is noted.

A module kept whole for its hooks is folded on its own: its hooks see its inputs and its
output, which folding inside it does not change, so its folded graph, with the same hooks,
takes its place (`fold_inside_hooked_modules`), unless the hooks also read the module itself
(`m.bn.running_var`, `m.conv.weight`), which the fold changes: checked, then left whole. A submodule a partial trace kept whole (its
forward cannot be traced) is folded inside module by module (`fold_inside_kept_whole`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from functools import partial

import torch
from torch import fx, nn

from bngraph.equivalence import check_same_function
from bngraph.errors import CheckFailed, UserError, one_line
from bngraph.fold_untraced import rounding_gains
from bngraph.passes.base import run_passes
from bngraph.passes.fold_bn_into_producer_module import fold_bn_into_producer_module
from bngraph.passes._fx_effects import hooks_of
from bngraph.passes._fx_meta import has_submodule

_HOOK_ATTRS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook")


def fold_inside_kept_whole(gm: fx.GraphModule, example_inputs, leaves: Sequence[str], opaque: list[dict]):
    """The BNs inside the submodules a partial trace kept whole (HF ResNet's embedder, LeViT's
    attention, what insert wrapped in Swin's blocks), folded module by module as for a model fx
    cannot trace at all: (gm, the pass's results, the largest rounding gain of a BN it folded,
    the `opaque` rows left, each with why the pass left it)."""
    gains = rounding_gains(gm)
    gm, results = run_passes(gm, [partial(fold_bn_into_producer_module, example_inputs=example_inputs, within=leaves)])
    result = results[fold_bn_into_producer_module.__name__]
    why = {s.site: s.reason for s in result.skipped}
    left = [{**row, "reason": f"{row['reason']}; module by module: {why[row['node']]}"} if row["node"] in why else row
            for row in opaque if row["node"] not in result.changed]
    return gm, results, max((gains.get(p, 0.0) for p in result.changed), default=0.0), left


def fold_inside_hooked_modules(gm: fx.GraphModule, example_inputs, fold: Callable) -> tuple[list[dict], list[dict], set[str]]:
    """Fold the BatchNorms inside each module the trace kept whole for its hooks, on its own.

    A hook sees the module's inputs and output, which folding inside it does not change: the
    module is folded as a model of its own (on the inputs it got from the example) and its
    folded graph, with the same hooks, takes its place. Returns the folded rows, the BNs left
    inside with their reasons, and the module paths done. `fold` is `bngraph.fold.fold`, which
    calls this: a module is folded as a model."""
    targets = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in targets:
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, (torch.jit.ScriptModule, nn.modules.batchnorm._BatchNorm)) or not hooks_of(
            module, global_hooks=False
        ):
            continue
        if any(is_batch_norm_module(m) for m in module.modules()) and not node.kwargs:
            targets[node.target] = node
    if not targets:
        return [], [], set()
    capture = _CaptureArgs(gm, {n.name for n in targets.values()})
    with torch.no_grad():
        capture.run(*(x.clone() for x in example_inputs))
    rows, left, done = [], [], set()
    for target, node in targets.items():
        module = gm.get_submodule(target)
        hooks = {attr: getattr(module, attr) for attr in _HOOK_ATTRS if hasattr(module, attr)}
        for attr, value in hooks.items():
            setattr(module, attr, type(value)())  # the module alone, as its hooks' caller sees it
        try:
            folded, report = fold(module, capture.args[node.name])  # checked against `module` there
        except (UserError, CheckFailed):
            continue  # left whole: `opaque_batch_norms` lists its BNs
        finally:
            for attr, value in hooks.items():
                setattr(module, attr, value)
        for attr, value in hooks.items():
            setattr(folded, attr, value)
        if (why := _hooks_differ(module, folded, capture.args[node.name], target)) is not None:
            left += [{"node": f"{target}.{row['node']}", "reason": f"it is inside {target}, kept as one call for its "
                      f"hooks, which read the module itself: {why}"} for row in report.sections["folded"]]
            left += [{**row, "node": f"{target}.{row['node']}"} for row in report.sections["remaining"]]
            done.add(target)
            continue
        parent, _, name = target.rpartition(".")
        setattr(gm.get_submodule(parent), name, folded)
        rows += [{**row, "node": f"{target}.{row['node']}"} for row in report.sections["folded"]]
        left += [{**row, "node": f"{target}.{row['node']}"} for row in report.sections["remaining"]]
        done.add(target)
    return rows, left, done


def _hooks_differ(module: nn.Module, folded: nn.Module, args, target: str) -> str | None:
    """Why `folded` with `module`'s hooks does not stand in for `module` with them (a hook reads
    a BN the fold removed, or a weight it changed), or None where it does, on `args`."""
    try:
        check_same_function(module, folded, args, what=f"{target} folded, with its hooks")
    except CheckFailed:
        return "folded, it computes something else with them"
    except UserError as err:
        while err.__cause__ is not None:  # the hook's own error, not the check's words around it
            err = err.__cause__
        return f"they raise on the folded module ({one_line(err)})"
    return None


class _CaptureArgs(fx.Interpreter):
    """Runs a graph and keeps the positional tensor arguments of the nodes named in `names`."""

    def __init__(self, gm: fx.GraphModule, names: Collection[str]):
        super().__init__(gm)
        self.names, self.args = set(names), {}

    def call_module(self, target, args, kwargs):
        node = self.current_node if hasattr(self, "current_node") else None
        if node is not None and node.name in self.names and node.name not in self.args:
            self.args[node.name] = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        return super().call_module(target, args, kwargs)

    def run_node(self, node: fx.Node):
        self.current_node = node
        return super().run_node(node)


def unused_batch_norms(module: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Paths of the BatchNorms `module` holds that the traced forward never reaches."""
    reached = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    reached = {p for target in reached for p in _prefixes(target)}
    return [path for path, m in module.named_modules()
            if path and is_batch_norm_module(m) and not any(p in reached for p in _prefixes(path))]


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def opaque_batch_norms(gm: fx.GraphModule) -> list[dict]:
    """BatchNorms inside modules that the graph calls as a whole, so no pass can reach them (a
    TorchScript module, a module kept whole for its hooks, a custom leaf), or that it passes as a
    module to a function: each with the reason."""
    found = []
    for node in gm.graph.nodes:
        if (
            node.op == "get_attr"
            and has_submodule(gm, node.target)
            and is_batch_norm_module(gm.get_submodule(node.target))
        ):
            users = ", ".join(u.name for u in node.users)
            found.append({"node": node.target, "reason": f"the graph passes it as a module to {users}, which torch.fx "
                                                          "does not trace, so it cannot be folded"})
    for target in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"):
        module = gm.get_submodule(target)
        if is_batch_norm_module(module):
            continue
        if isinstance(module, torch.jit.ScriptModule):
            why = "a TorchScript module, which torch.fx calls as a whole"
        elif hooks := hooks_of(module, global_hooks=False):
            why = f"kept as one call for its {' and '.join(dict.fromkeys(hooks))}"
        else:
            why = f"a {type(module).__name__}, which torch.fx calls as a whole"
        for path, inner in module.named_modules():
            if path and is_batch_norm_module(inner):
                found.append(
                    {"node": f"{target}.{path}", "reason": f"it is inside {target} ({why}), so it cannot be folded"}
                )
    return found



def is_batch_norm_module(module: nn.Module | None) -> bool:
    if isinstance(module, torch.jit.ScriptModule):
        return re.fullmatch(r"(Sync)?BatchNorm\dd?|_?BatchNorm", getattr(module, "original_name", "")) is not None
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


__all__ = ["fold_inside_hooked_modules", "fold_inside_kept_whole", "is_batch_norm_module", "opaque_batch_norms", "unused_batch_norms"]
