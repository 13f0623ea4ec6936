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

import importlib
import sys
import types
from typing import TYPE_CHECKING

from bngraph.errors import CheckFailed, UserError

__version__ = "0.2.0"

# Each public name and the module that defines it, imported on first use: `import bngraph`
# (and so `bngraph --help`) does not start torch. Training lives in `bngraph.train`
# (`train`, `TrainConfig`, `TensorData`), the experiments in `bngraph.reproduce`.
_API = {
    "insert": "bngraph.api",
    "fold": "bngraph.fold",
    "export": "bngraph.export",
    "verify": "bngraph.verify",
    "load": "bngraph.load",
    "save": "bngraph.artifacts",
    "Report": "bngraph.report",
    "PassResult": "bngraph.passes.base",
    "Skip": "bngraph.passes.base",
}
__all__ = ["CheckFailed", "PassResult", "Report", "Skip", "UserError", "export", "fold", "insert", "load", "save", "verify"]

if TYPE_CHECKING:  # what type checkers and editors see (py.typed)
    from bngraph.api import insert
    from bngraph.artifacts import save
    from bngraph.export import export
    from bngraph.fold import fold
    from bngraph.load import load
    from bngraph.passes.base import PassResult, Skip
    from bngraph.report import Report
    from bngraph.verify import verify


class _Package(types.ModuleType):
    # `bngraph.fold` names a function and the module defining it, and importing the module sets
    # the package's attribute to the module: the public names are answered first, here.
    def __getattribute__(self, name: str):
        where = _API.get(name)
        if where is None:
            return super().__getattribute__(name)
        return getattr(importlib.import_module(where), name)

    def __dir__(self):
        return sorted({*super().__dir__(), *_API})


sys.modules[__name__].__class__ = _Package
