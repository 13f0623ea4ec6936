"""What the user named: a model spec and its example inputs, parsed but not yet loaded.

Model specs, accepted by every command:
  zoo:NAME                 a model from `bngraph zoo`
  path/to/file.py:Symbol   a class with a no-argument constructor, or a function returning a module
  path/to/file.py          when the file defines exactly one nn.Module class
  path/to/artifact/        a folder written by `bngraph.save` (any `-o` of insert, fold), or a
                           `bngraph train` run folder (its artifact is run/model/)
  path/to/model.onnx       an ONNX file (fold, verify)

Example inputs: each has a shape, a dtype and a batch axis (axis 0, or none):
  --input-shape 2,3,32,32;4,4   one shape per input, separated by ';' (an empty one: a 0-d input)
  --input-dtype float32;int64   one numpy dtype name per input (default float32)
  --static-input 1              input 1 (0-based) has no batch axis: it keeps its shape when
                                a check varies the batch (a mask, a per-feature scale); repeatable
A 0-d input never has a batch axis. Random example values: floats N(0, 1); integers 0 or 1
(valid indices into any embedding table); booleans either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bngraph.atomic import ARTIFACT, DESCRIBED, output_kind
from bngraph.errors import UserError, require_file

ARTIFACT_META = "bngraph.json"


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "zoo" | "file" | "artifact" | "onnx"
    text: str  # as the user wrote it, for messages and artifact history
    path: Path | None = None
    symbol: str | None = None  # zoo name, or the symbol inside a .py file


def parse_model_spec(text: str) -> ModelSpec:
    text = str(text)
    if text.startswith("zoo:"):
        name = text[4:]
        if not name:
            raise UserError("empty zoo name in 'zoo:' (list them: bngraph zoo)")
        return ModelSpec("zoo", text, symbol=name)
    path_text, _, symbol = text.partition(".py:")
    if symbol or text.endswith(".py"):
        path = Path(path_text + ".py" if symbol else text)
        if path.is_dir():  # "does not exist" sent the user looking for a path that is there
            raise UserError(f"model file {path} is a folder, not a Python file")
        require_file(path, "model file")
        return ModelSpec("file", text, path=path, symbol=symbol or None)
    path = Path(text)
    if path.suffix == ".onnx" and not (path / ARTIFACT_META).is_file():  # an artifact may be named x.onnx
        if path.is_dir():
            raise UserError(f"{path} is a folder, not an ONNX file")
        require_file(path, "ONNX file")
        return ModelSpec("onnx", text, path=path)
    if path.is_dir():
        kind = output_kind(path)
        if kind != ARTIFACT and (path / "model" / ARTIFACT_META).is_file():
            if (behind := model_behind_its_run(path)) is not None:
                raise UserError(f"{path} is a run stopped before it wrote its model: its evaluations reach step "
                                f"{behind[1]}, its model/ is step {behind[0]}'s; finish it with `bngraph train ... "
                                f"--resume`, or name {path / 'model'} for that older model")
            path, kind = path / "model", ARTIFACT  # a `bngraph train` run folder: its artifact is model/
        if kind not in (ARTIFACT, None):
            raise UserError(f"{path} is {DESCRIBED[kind]}, not an artifact: name one of the artifacts in it")
        if not (path / ARTIFACT_META).is_file():
            raise UserError(f"{path} is a folder but not a bngraph artifact (no {ARTIFACT_META})")
        return ModelSpec("artifact", text, path=path)
    if path.exists():
        raise UserError(f"cannot tell what model {text!r} is: expected a .py, .onnx or an artifact folder")
    raise UserError(f"no model {text!r}: expected zoo:NAME, file.py[:Symbol], an artifact folder or a .onnx file")


def model_steps(run: Path) -> int | None:
    """The steps the model in the run folder `run` was trained for (its history's last `train`
    entry, in its bngraph.json), or None where there is none to read."""
    try:
        history = json.loads((run / "model" / ARTIFACT_META).read_text(encoding="utf-8"))["history"]
        return int(next(e for e in reversed(history) if e.get("command") == "train")["config"]["steps"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return None


def model_behind_its_run(run: Path) -> tuple[int, int] | None:
    """(the model's steps, the last evaluated step) where the run folder `run` evaluated past
    the model it holds: stopped after its last checkpoint, as it wrote the model."""
    steps = model_steps(run)
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        evaluated = int(json.loads(next(line for line in reversed(lines) if line.strip()))["step"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    return (steps, evaluated) if steps is not None and evaluated > steps else None


def parse_input_shapes(text: str) -> list[tuple[int, ...]]:
    """'2,3,32,32' -> [(2, 3, 32, 32)]; several inputs are separated by ';' ('2,8;2,4'); an empty
    shape is a 0-d input ('2,8;' -> [(2, 8), ()])."""
    shapes = []
    for part in str(text).split(";"):
        if not part.strip():
            shapes.append(())
            continue
        try:
            dims = tuple(int(d) for d in part.split(","))
        except ValueError:
            dims = ()
        if not dims or any(d <= 0 for d in dims):
            raise UserError(f"bad --input-shape {text!r}: expected positive integers like 2,3,32,32")
        shapes.append(dims)
    return shapes


def parse_input_dtypes(text: str) -> list[str]:
    """'float32;int64' -> ['float32', 'int64'] (numpy's names; 'long' and friends are refused)."""
    import numpy as np  # here: `bngraph --help` imports this module and should stay fast

    dtypes = []
    for part in str(text).split(";"):
        name = part.strip()
        try:
            dtype = np.dtype(name)
        except TypeError:
            dtype = None
        if name == "bfloat16":  # the checks draw their inputs in numpy, which has no bfloat16
            raise UserError(f"bad --input-dtype in {text!r}: bngraph checks models on numpy inputs, which have no "
                            "bfloat16 (float16 and float32 are); train in bfloat16 with `train --precision bf16`")
        if dtype is None or dtype.name != name or dtype.kind not in "biuf":
            raise UserError(f"bad --input-dtype {name!r} in {text!r}: expected names like float32, int64, bool")
        dtypes.append(dtype.name)
    return dtypes


def input_layout(
    shapes: Sequence[Sequence[int]],
    dtypes: Sequence[str] | None = None,
    static: Sequence[int] = (),
    batch_axes: Sequence[int | None] | None = None,
) -> tuple[list[str], list[int | None]]:
    """Each input's dtype and batch axis (0 or None), checked against the number of inputs.

    `static` lists inputs without a batch axis (--static-input); `batch_axes`, where a model or an
    artifact declares them, is the starting point. A 0-d input has no batch axis.
    """
    count = len(shapes)
    if dtypes is not None and len(dtypes) != count:
        raise UserError(f"--input-dtype gives {len(dtypes)} dtypes for {count} inputs")
    if batch_axes is not None and len(batch_axes) != count:
        raise UserError(f"{len(batch_axes)} batch axes declared for {count} inputs")
    for index in static:
        if not 0 <= index < count:
            raise UserError(f"--static-input {index}: the model has inputs 0 to {count - 1}")
    axes = list(batch_axes) if batch_axes is not None else [0] * count
    axes = [None if i in set(static) or not len(shape) else axis for i, (shape, axis) in enumerate(zip(shapes, axes))]
    return list(dtypes) if dtypes is not None else ["float32"] * count, axes
