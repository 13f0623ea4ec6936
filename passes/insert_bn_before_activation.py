"""Put a BatchNorm in front of every elementwise nonlinearity: z = g(BN(Wu)) (paper, Sec. 3.2).

Cases, numbered as in the code:
  1. The input is already normalized (a norm, maybe behind shape-only ops or a Dropout): skip.
  2. Features in axis 1, (N, C) or (N, C, *spatial): BatchNorm{1,2,3}d(C), one gamma/beta per
     feature map with statistics over the batch and every position, as the paper does for convs.
  3. Features in the last axis, e.g. a Linear on (N, T, C): the same BatchNorm between two
     `transpose(1, -1)`, so each feature is normalized over all other axes.
An activation module called at several sites gets one BatchNorm per site. Dropping the bias
that BN makes redundant is a separate pass (`drop_bias_before_bn`).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from bngraph.passes.base import PassResult, Skip
from bngraph.passes.op_kinds import activation_kind, features_last, normalizer_behind, op_label
from bngraph.trace import tensor_dtype, tensor_shape

BATCHNORM_BY_RANK: dict[int, type[nn.Module]] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _free_name(gm: fx.GraphModule, wanted: str) -> str:
    name, i = wanted, 1
    while _exists(gm, name):
        name, i = f"{wanted}_{i}", i + 1
    return name


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def _device(gm: fx.GraphModule) -> torch.device:
    return next((t.device for t in [*gm.parameters(), *gm.buffers()]), torch.device("cpu"))


def insert_bn_before_activation(gm: fx.GraphModule) -> PassResult:
    """Insert a BatchNorm before each nonlinearity whose input is not normalized (needs shapes:
    `bngraph.trace.trace(module, example_inputs)`). Works in place on `gm`."""
    result = PassResult(gm)
    device = _device(gm)
    for act in list(gm.graph.nodes):
        kind = activation_kind(gm, act)
        if kind is None:
            continue
        x = act.args[0] if act.args else act.kwargs.get("input")
        if not isinstance(x, fx.Node):
            result.skipped.append(Skip(act.name, "its input is a constant, not a tensor computed by the model"))
            continue
        # 1. Already normalized.
        norm = normalizer_behind(gm, x)
        if norm is not None:
            result.skipped.append(Skip(act.name, f"input already normalized by {norm.name} ({op_label(gm, norm)})"))
            continue
        shape, dtype = tensor_shape(x), tensor_dtype(x)
        if shape is None:
            result.skipped.append(Skip(act.name, "no shape recorded for its input (not a single tensor)"))
            continue
        if dtype is None or not dtype.is_floating_point:
            result.skipped.append(Skip(act.name, f"input has dtype {dtype}; BatchNorm needs floating point"))
            continue
        if len(shape) not in BATCHNORM_BY_RANK:
            why = "no batch axis besides the features" if len(shape) < 2 else f"no BatchNorm for rank-{len(shape)} tensors"
            result.skipped.append(Skip(act.name, f"input of shape {shape}: {why}"))
            continue
        # 2./3. Per feature: axis 1, or the last axis behind a transpose pair.
        last = len(shape) > 2 and features_last(gm, x)
        features = shape[-1] if last else shape[1]
        norm_cls = BATCHNORM_BY_RANK[len(shape)]
        bn = norm_cls(features, device=device, dtype=dtype).train(gm.training)
        owner = act.target if act.op == "call_module" else act.name
        bn_path = _free_name(gm, f"{owner}_bn")
        gm.add_submodule(bn_path, bn)
        with gm.graph.inserting_before(act):
            if last:
                moved = gm.graph.call_method("transpose", (x, 1, -1))
                bn_node = gm.graph.call_module(bn_path, (moved,))
                normed = gm.graph.call_method("transpose", (bn_node, 1, -1))
                # Shapes stay known for the passes that follow, without running the model again.
                swapped = torch.empty(shape, dtype=dtype, device="meta").transpose(1, -1)
                moved.meta["tensor_meta"] = bn_node.meta["tensor_meta"] = _extract_tensor_metadata(swapped)
            else:
                normed = gm.graph.call_module(bn_path, (x,))
            normed.meta["tensor_meta"] = x.meta["tensor_meta"]
        act.replace_input_with(x, normed)
        result.changed.append(act.name)
        result.details.append(
            {
                "node": act.name,
                "activation": kind,
                "norm": norm_cls.__name__,
                "features": features,
                "axis": "last" if last else "1",
                "bn": bn_path,
                "input": x.name,
            }
        )
    if result.changed:
        gm.graph.lint()
        gm.recompile()
    return result
