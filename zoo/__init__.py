"""Model definitions and their registry: `create_model("inception")`, `list_models()`.

The model files avoid `from __future__ import annotations`: torch.fx copies a forward's
annotations into the traced graph, and string annotations make the GraphModule unpicklable.
"""

from bngraph.zoo import inception, mnist_mlp  # noqa: F401  (imported to register the models)
from bngraph.zoo.registry import ZooEntry, create_model, get_entry, list_models, register_model

__all__ = ["ZooEntry", "create_model", "get_entry", "list_models", "register_model"]
