"""What the user named: a model spec and an example input shape, parsed but not yet loaded.

Model specs, accepted by every command:
  zoo:NAME                 a model from `bngraph zoo`
  path/to/file.py:Symbol   a class with a no-argument constructor, or a function returning a module
  path/to/file.py          when the file defines exactly one nn.Module class
  path/to/artifact/        a folder written by `bngraph.save` (any `-o` of insert, fold), or a
                           `bngraph train` run folder (its artifact is run/model/)
  path/to/model.onnx       an ONNX file (fold, verify)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bngraph.errors import UserError

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
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        return ModelSpec("file", text, path=path, symbol=symbol or None)
    path = Path(text)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise UserError(f"ONNX file {path} does not exist")
        return ModelSpec("onnx", text, path=path)
    if path.is_dir():
        if not (path / ARTIFACT_META).is_file() and (path / "model" / ARTIFACT_META).is_file():
            path = path / "model"  # a `bngraph train` run folder: its artifact is model/
        if not (path / ARTIFACT_META).is_file():
            raise UserError(f"{path} is a folder but not a bngraph artifact (no {ARTIFACT_META})")
        return ModelSpec("artifact", text, path=path)
    if path.exists():
        raise UserError(f"cannot tell what model {text!r} is: expected a .py, .onnx or an artifact folder")
    raise UserError(
        f"no model {text!r}: expected zoo:NAME, file.py[:Symbol], an artifact folder or a .onnx file"
    )


def parse_input_shapes(text: str) -> list[tuple[int, ...]]:
    """'2,3,32,32' -> [(2, 3, 32, 32)]; several inputs are separated by ';' ('2,8;2,4')."""
    shapes = []
    for part in str(text).split(";"):
        try:
            dims = tuple(int(d) for d in part.split(","))
        except ValueError:
            dims = ()
        if not dims or any(d <= 0 for d in dims):
            raise UserError(f"bad --input-shape {text!r}: expected positive integers like 2,3,32,32")
        shapes.append(dims)
    return shapes
