"""bngraph: Batch Normalization as a compiler pass, for PyTorch and ONNX.

    import bngraph
    model = bngraph.load("zoo:mnist-mlp")
    bn_model, report = bngraph.insert(model, example_inputs)
    bngraph.save(bn_model, "out/")
"""

from bngraph.api import insert  # noqa: F401
from bngraph.artifacts import save
from bngraph.errors import UserError
from bngraph.load import load

__version__ = "0.1.0"
__all__ = ["UserError", "insert", "load", "save"]
