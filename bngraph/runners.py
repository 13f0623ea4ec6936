"""What runs a model on numpy inputs, for `verify`: PyTorch, onnxruntime, onnx's ReferenceEvaluator.

A runner maps a list of numpy inputs to a list of outputs. An ONNX model runs in onnxruntime on
the CPU at ORT_DISABLE_ALL (our graph as written) and at ORT_ENABLE_ALL (as deployed:
onnxruntime then fuses BN and constant-folds on its own, which hides what the file says);
onnx's ReferenceEvaluator is a third opinion that shares no kernel with either. Also here: the
random batches both sides run on, and the input shapes an ONNX file declares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bngraph.errors import UserError
from bngraph.trace import one_line

ORT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")
# Several single examples, then an odd batch: batch 1 and a batch the example never had show
# that the batch axis is really dynamic (torch.export specializes an example batch of 1).
BATCH_SIZES = (1, 1, 1, 7)


class TorchRunner:
    kind, output_names = "torch", None

    def __init__(self, module: nn.Module, label: str = "torch"):
        self.module, self.label = module, label

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad(), eval_mode(self.module):
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
        return [t.detach().cpu().numpy() for t in _leaves(out)]


class OrtRunner:
    kind = "onnx"

    def __init__(self, model: str | Path | bytes, level: str = "ORT_DISABLE_ALL"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.log_severity_level = 3  # unused initializers are warnings; our report says more
        source = str(model) if isinstance(model, Path) else model
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise UserError(f"onnxruntime cannot load {_describe(model)}: {one_line(err)}") from err
        self.label = "ort-" + level.removeprefix("ORT_").lower().replace("_", "-")  # ort-disable-all
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {i.name: x for i, x in zip(self.session.get_inputs(), inputs)}
        return self.session.run(None, feeds)


class EvaluatorRunner:
    kind, label = "onnx", "onnx-reference"

    def __init__(self, model: str | Path | bytes):
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        self.evaluator = ReferenceEvaluator(proto)
        self.input_names = [i for i in self.evaluator.input_names if i not in {t.name for t in proto.graph.initializer}]
        self.output_names = list(self.evaluator.output_names)

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(self.evaluator.run(None, dict(zip(self.input_names, inputs))))


def runners_for(model: Any, *, evaluator: bool = False) -> list:
    """A PyTorch module runs once; an ONNX model (path, bytes or ModelProto) at each ORT level."""
    if isinstance(model, nn.Module):
        return [TorchRunner(model)]
    if isinstance(model, (TorchRunner, OrtRunner, EvaluatorRunner)):
        return [model]
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    runners = [OrtRunner(model, level) for level in ORT_LEVELS]
    return runners + ([EvaluatorRunner(model)] if evaluator else [])


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    # No command mutates the model it was handed: put back each submodule's mode afterwards.
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a forward's result (a tensor, or tuples, lists and dicts of them) in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if not isinstance(out, (list, tuple)):
        return []  # a constant the exporter would bake in: nothing to compare
    return [t for item in out for t in _leaves(item)]


def _describe(model: Any) -> str:
    return "the ONNX model" if isinstance(model, bytes) else str(model)


# ---- inputs -------------------------------------------------------------------------------


def random_batches(
    shapes: Sequence[Sequence[int]],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    dtypes: Sequence[np.dtype] | None = None,
    seed: int = 0,
) -> list[list[np.ndarray]]:
    """One list of inputs per batch size: `shapes` with the batch axis (0) replaced."""
    rng = np.random.default_rng(seed)
    dtypes = dtypes or [np.dtype(np.float32)] * len(shapes)
    batches = []
    for batch in batch_sizes:
        batches.append([_random(rng, (batch, *shape[1:]), dtype) for shape, dtype in zip(shapes, dtypes)])
    return batches


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 2, shape).astype(dtype)  # indices: 0 and 1 are valid in any table


@dataclass
class OnnxInputs:
    shapes: list[tuple[int, ...]]  # batch axis as 1 where it is symbolic
    dtypes: list[np.dtype]
    fixed_batch: int | None  # the batch size the file allows, when it fixes one


def onnx_inputs(model: str | Path | bytes, input_shape: list[tuple[int, ...]] | None = None) -> OnnxInputs:
    """The graph's inputs (initializers listed as inputs excluded), as shapes to feed."""
    import onnx

    try:
        if isinstance(model, bytes):
            proto = onnx.load_from_string(model)
        else:
            proto = onnx.load(str(model), load_external_data=False)  # the graph is enough
    except Exception as err:
        raise UserError(f"{_describe(model)} is not a valid ONNX model: {one_line(err)}") from err
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if input_shape is not None and len(input_shape) != len(inputs):
        raise UserError(f"--input-shape gives {len(input_shape)} shapes; {_describe(model)} has {len(inputs)} inputs")
    shapes, dtypes, fixed = [], [], set()
    for index, value in enumerate(inputs):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        dtypes.append(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
        if dims and dims[0] is not None:
            fixed.add(dims[0])
        if input_shape is not None:
            shapes.append(tuple(input_shape[index]))
        elif any(d is None for d in dims[1:]):
            raise UserError(
                f"input {value.name!r} of {_describe(model)} has symbolic dimensions {dims} beyond the batch: "
                "give them with --input-shape"
            )
        else:
            shapes.append((1, *dims[1:]) if dims else ())
    return OnnxInputs(shapes, dtypes, fixed.pop() if len(fixed) == 1 else None)
