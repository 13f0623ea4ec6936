"""Graph passes: each module does one job and returns a `PassResult` (see `base`, the contract).

Each pass is exported here by its name, as a function: `bngraph.passes.drop_bias_before_bn` is
callable, and its module stays importable (`from bngraph.passes.drop_bias_before_bn import ...`).
They are imported on first use: the ONNX passes start onnx, the others torch.
"""

from pathlib import Path

from bngraph.lazy_names import answer_names_lazily

# Every module but `base` (the contract) and the helpers (a leading underscore) is a pass, and
# defines a function of its own name: listed by file name, so that listing them imports nothing
# and a new pass is never missed.
PASSES = sorted(path.stem for path in Path(__file__).parent.glob("[!_]*.py") if path.stem != "base")
# Name -> defining module, for the passes and the contract.
_API = {
    **{name: f"bngraph.passes.{name}" for name in PASSES},
    "CalibrateBnAsIdentity": "bngraph.passes.calibrate_bn_as_identity",
    "RecalibrateBN": "bngraph.passes.recalibrate_bn",
    "PassResult": "bngraph.passes.base",
    "Probe": "bngraph.passes.base",
    "Skip": "bngraph.passes.base",
    "graph_pass": "bngraph.passes.base",
    "run_passes": "bngraph.passes.base",
}
__all__ = sorted(_API)


answer_names_lazily(__name__, _API)
