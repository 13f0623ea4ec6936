"""Model definitions and their registry: `create_model("inception")`, `list_models()`."""

from bngraph.zoo import inception, mnist_mlp  # noqa: F401  (imported to register the models)
from bngraph.zoo.registry import ZooEntry, create_model, get_entry, list_models, register_model

__all__ = ["ZooEntry", "create_model", "get_entry", "list_models", "register_model"]
