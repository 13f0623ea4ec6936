"""nn.Module -> torch.fx.GraphModule, with every node's output shape from an example input.

Tracing works on a deep copy: a GraphModule shares submodules with the module it was traced
from, and no bngraph command mutates the model it was handed.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from bngraph.errors import UserError


class TraceFailed(UserError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


def _user_frame(err: BaseException) -> str:
    """`file:line` of the innermost frame outside torch: where the user's code stopped tracing."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
    frames = [f for f in frames if "/bngraph/" not in f.filename or "/tests/" in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({f.line.strip() if f.line else f.name})"


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def copy_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A copy of `module` that shares no module, parameter or buffer with it (tied weights stay
    tied within the copy). copy.deepcopy does the same through pickle's generic machinery, which
    is most of the cost of tracing a large model; this copies only what a module owns."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = copy.copy(module)  # a new __dict__ whose containers are still the original's
    memo[id(module)] = new

    def tensor(t, make):
        if t is None:
            return None
        if id(t) not in memo:
            memo[id(t)] = make(t)
        return memo[id(t)]

    new._parameters = {
        k: tensor(p, lambda p: nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for k, p in module._parameters.items()
    }
    new._buffers = {k: tensor(b, lambda b: b.clone()) for k, b in module._buffers.items()}
    new._modules = {k: None if m is None else copy_module(m, memo) for k, m in module._modules.items()}
    for name, value in vars(module).items():  # hook dicts and other containers: no sharing either
        if name not in ("_parameters", "_buffers", "_modules") and isinstance(value, (dict, list, set)):
            new.__dict__[name] = copy.copy(value)
    return new


def trace(
    module: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None, *, training: bool | None = None
) -> fx.GraphModule:
    """Trace a copy of `module` (in train or eval mode first, with `training`); with
    `example_inputs`, fill `node.meta['tensor_meta']`."""
    module = copy_module(module)
    if training is not None:
        module.train(training)  # before tracing: a forward may branch on self.training
    try:
        gm = fx.symbolic_trace(module)
    except Exception as err:  # fx raises TraceError, TypeError, AttributeError... for one cause
        raise TraceFailed(
            f"torch.fx could not trace {type(module).__name__} at {_user_frame(err)}: {one_line(err)}"
        ) from err
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    return gm


class _RecordShapes(fx.Interpreter):
    """torch.fx's ShapeProp, minus its printed traceback: a failure names the node instead."""

    def run_node(self, node: fx.Node):
        try:
            result = super().run_node(node)
        except Exception as err:
            err.add_note(f"bngraph: at node {node.name}")
            self.failed_at = node.name
            raise
        if any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(result)):
            node.meta["tensor_meta"] = map_aggregate(
                result, lambda r: _extract_tensor_metadata(r) if isinstance(r, torch.Tensor) else None
            )
        node.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Run `gm` once in eval mode (no statistics updated, no dropout) and record each node's shape."""
    was_training = gm.training
    gm.eval()
    recorder = _RecordShapes(gm)
    try:
        with torch.no_grad():
            recorder.run(*example_inputs)
    except Exception as err:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        where = getattr(recorder, "failed_at", "?")
        raise UserError(f"the model failed on its example input {shapes} at node {where}: {one_line(err)}") from err
    finally:
        gm.train(was_training)
    return gm


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def tensor_dtype(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)
