"""Graph passes: each module does one job and returns a `PassResult` (see `base`).

Each pass is exported here by its name, as a function: `bngraph.passes.drop_bias_before_bn` is
callable, and its module stays importable (`from bngraph.passes.drop_bias_before_bn import ...`).
They are imported on first use: the ONNX passes start onnx, the others torch.
"""

import re
from pathlib import Path

from bngraph.lazy_names import answer_names_lazily

# A module that defines a function of its own name is a pass (the others are what passes share):
# found in the source text, so that listing them imports nothing and a new pass is never missed.
PASSES = sorted(
    path.stem
    for path in Path(__file__).parent.glob("*.py")
    if re.search(rf"^def {path.stem}\(", path.read_text(encoding="utf-8"), re.MULTILINE)
)
# Name -> defining module, for the passes and what they share.
_API = {
    **{name: f"bngraph.passes.{name}" for name in PASSES},
    "CalibrateBnAsIdentity": "bngraph.passes.calibrate_bn_as_identity",
    "RecalibrateBN": "bngraph.passes.recalibrate_bn",
    "PassResult": "bngraph.passes.base",
    "Skip": "bngraph.passes.base",
    "run_passes": "bngraph.passes.base",
}
__all__ = sorted(_API)


answer_names_lazily(__name__, _API)
