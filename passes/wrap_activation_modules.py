"""The fallback for models torch.fx cannot trace: wrap activation modules, not graph sites.

Without a graph, an activation is only visible as a module instance, and its input only when it
runs. So: run the model once on the example input, recording each activation module's calls and
input shape, then replace each one called exactly once by `Sequential(bn=BatchNorm, act=...)`.
A module called at several sites is refused: one BatchNorm would pool the statistics of
different layers. Functional activations (`F.relu`) and features-last layouts need the graph,
and are reported as out of reach.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from bngraph.passes.base import PassResult, Skip
from bngraph.passes.insert_bn_before_activation import BATCHNORM_BY_RANK
from bngraph.passes.op_kinds import ACTIVATION_MODULES, LAST_AXIS_MODULES, NORM_MODULES


def _previous_sibling(parent: nn.Module, name: str) -> nn.Module | None:
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    i = names.index(name)
    return parent._modules[names[i - 1]] if i > 0 else None


def wrap_activation_modules(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> PassResult:
    """Wrap each activation module of `module` (in place) with a BatchNorm in front of it."""
    result = PassResult(module)
    seen: dict[str, list[torch.Size]] = {}
    handles = []
    for path, m in module.named_modules():
        if isinstance(m, ACTIVATION_MODULES):
            seen[path] = []
            handles.append(m.register_forward_pre_hook(lambda _m, inp, p=path: seen[p].append(inp[0].shape)))
    was_training = module.training
    try:
        with torch.no_grad():
            module.eval()(*example_inputs)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    for path, shapes in seen.items():
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        previous = _previous_sibling(parent, name)
        if not shapes:
            result.skipped.append(Skip(path, "never called on the example input"))
        elif len(shapes) > 1:
            result.skipped.append(Skip(path, f"called {len(shapes)} times; without a graph one BatchNorm would mix their statistics"))
        elif isinstance(previous, NORM_MODULES):
            result.skipped.append(Skip(path, f"input already normalized by {type(previous).__name__}"))
        elif len(shapes[0]) not in BATCHNORM_BY_RANK:
            result.skipped.append(Skip(path, f"input of shape {tuple(shapes[0])} has no BatchNorm of its rank"))
        elif len(shapes[0]) > 2 and isinstance(previous, LAST_AXIS_MODULES):
            result.skipped.append(Skip(path, "features in the last axis need a traced graph to normalize"))
        else:
            shape = shapes[0]
            act = parent._modules[name]
            norm_cls = BATCHNORM_BY_RANK[len(shape)]
            ref = next(iter(act.parameters()), None) or next(iter(module.parameters()), torch.empty(0))
            bn = norm_cls(shape[1], device=ref.device).train(was_training)
            parent._modules[name] = nn.Sequential(OrderedDict(bn=bn, act=act))
            result.changed.append(path)
            result.details.append(
                {"node": path, "activation": type(act).__name__, "norm": norm_cls.__name__, "features": shape[1], "axis": "1", "bn": f"{path}.bn"}
            )
    return result
