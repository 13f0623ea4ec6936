"""Model definitions and their registry: `create_model("inception")`, `list_models()`.

The model files avoid `from __future__ import annotations`: torch.fx copies a forward's
annotations into the traced graph, and string annotations make the GraphModule unpicklable.
"""

from bngraph.zoo.registry import (
    CATALOG,
    ZooEntry,
    create_model,
    describe_models,
    get_entry,
    list_models,
    register_model,
)

# The model modules register their builders when get_entry or create_model first needs them.
__all__ = ["CATALOG", "ZooEntry", "create_model", "describe_models", "get_entry", "list_models", "register_model"]
