"""What a traced node's output is (the shape and dtype recorded in its `tensor_meta`), and whether
a name is taken by a submodule of the graph.

`bngraph.trace` runs the example input through the graph and records them (as torch.fx's
ShapeProp does); a pass that inserts a node records its own. A node whose output is not one
tensor (a tuple, a module call returning several) has no shape here: None.
"""

from __future__ import annotations

import torch
from torch import fx


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def tensor_dtype(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def has_submodule(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False
