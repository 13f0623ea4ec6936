"""bngraph: Batch Normalization as a compiler pass, for PyTorch and ONNX.

    import bngraph
    model = bngraph.load("zoo:mnist-mlp")
    bn_model, report = bngraph.insert(model, example_inputs)
    folded, report = bngraph.fold(bn_model.eval(), example_inputs)
    result = bngraph.export(folded, example_inputs, "model.onnx")   # verified, or not written
    bngraph.save(bn_model, "out/")

Each function is what the command of the same name runs. (The functions share their names with
the modules that define them: import helpers with `from bngraph.fold import ...`.)
"""

from bngraph.api import insert
from bngraph.artifacts import save
from bngraph.errors import CheckFailed, UserError
from bngraph.export import export
from bngraph.fold import fold
from bngraph.load import load
from bngraph.verify import verify

__version__ = "0.1.0"
__all__ = ["CheckFailed", "UserError", "export", "fold", "insert", "load", "save", "verify"]
