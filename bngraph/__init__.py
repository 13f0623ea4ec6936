"""bngraph: Batch Normalization as a compiler pass, for PyTorch and ONNX.

    import bngraph
    model = bngraph.load("zoo:mnist-mlp")
    bn_model, report = bngraph.insert(model, example_inputs)
    folded, report = bngraph.fold(bn_model.eval(), example_inputs)
    result = bngraph.export(folded, example_inputs, "model.onnx")   # verified, or not written
    bngraph.save(bn_model, "out/")

Each function is the core of the command of the same name, and lives in the module of that name
(`bngraph.insert`, `bngraph.fold`, `bngraph.export`, `bngraph.verify`), beside the function the
command runs on a model spec. (The functions share their names with their modules: import
helpers with `from bngraph.fold import ...`.)
"""

from typing import TYPE_CHECKING

from bngraph.errors import CheckFailed, UserError
from bngraph.lazy_names import answer_names_lazily

__version__ = "0.2.0"

# Each public name and the module that defines it, imported on first use: `import bngraph`
# (and so `bngraph --help`) does not start torch. Training lives in `bngraph.training`
# (`train`, `TrainConfig`, `TensorData`), the experiments in `bngraph.reproduce`.
_API = {
    "insert": "bngraph.insert",
    "fold": "bngraph.fold",
    "export": "bngraph.export",
    "verify": "bngraph.verify",
    "load": "bngraph.load",
    "save": "bngraph.artifacts",
    "train": "bngraph.training.loop",
    "Report": "bngraph.report",
    "PassResult": "bngraph.passes.base",
    "Skip": "bngraph.passes.base",
}
__all__ = [
    "CheckFailed", "PassResult", "Report", "Skip", "UserError", "export", "fold", "insert", "load", "save", "train",
    "verify",
]

if TYPE_CHECKING:  # what type checkers and editors see (py.typed)
    from bngraph.artifacts import save
    from bngraph.export import export
    from bngraph.fold import fold
    from bngraph.insert import insert
    from bngraph.load import load
    from bngraph.passes.base import PassResult, Skip
    from bngraph.report import Report
    from bngraph.training.loop import train
    from bngraph.verify import verify


answer_names_lazily(__name__, _API)
