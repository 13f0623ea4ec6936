"""Model spec -> nn.Module and its example inputs. Loaders load; they never run a pass."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bngraph.artifacts import load_artifact
from bngraph.errors import UserError
from bngraph.spec import ModelSpec, parse_input_shapes, parse_model_spec
from bngraph.trace import one_line


@dataclass
class LoadedModel:
    module: nn.Module
    spec: ModelSpec
    input_shapes: list[tuple[int, ...]] | None
    history: list[dict] = field(default_factory=list)  # passes already applied (artifacts)
    symbol: str | None = None  # the class or function a .py spec resolved to

    def example_inputs(self, seed: int = 0) -> list[torch.Tensor]:
        if not self.input_shapes:
            raise UserError(
                f"{self.spec.text} declares no example input: give one with --input-shape, e.g. 2,3,32,32"
            )
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(shape, generator=gen) for shape in self.input_shapes]


def _import_file(path: Path):
    path = path.resolve()
    name = "bngraph_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise UserError(f"importing {path} failed: {one_line(err)}") from err
    return module


def _builds_a_module(obj) -> bool:
    """An nn.Module class, or a function annotated to return one."""
    if inspect.isclass(obj):
        return issubclass(obj, nn.Module)
    if inspect.isfunction(obj):
        returns = inspect.signature(obj, eval_str=False).return_annotation
        return inspect.isclass(returns) and issubclass(returns, nn.Module)
    return False


def _module_candidates(code) -> list[str]:
    return [
        name
        for name, obj in vars(code).items()
        if getattr(obj, "__module__", None) == code.__name__ and _builds_a_module(obj)
    ]


def _build(path: Path, symbol: str | None) -> tuple[nn.Module, str]:
    code = _import_file(path)
    if symbol is None:
        candidates = _module_candidates(code)
        if len(candidates) != 1:
            found = ", ".join(candidates) or "none"
            raise UserError(
                f"{path} defines {len(candidates)} models ({found}); name one as {path}:Symbol"
            )
        symbol = candidates[0]
    if not hasattr(code, symbol):
        raise UserError(f"{path} has no symbol {symbol!r} (it has: {', '.join(_module_candidates(code)) or 'no modules'})")
    factory = getattr(code, symbol)
    if not callable(factory):
        raise UserError(f"{path}:{symbol} is not a class or function")
    try:
        module = factory()
    except TypeError as err:
        raise UserError(f"{path}:{symbol}() cannot be called without arguments: {one_line(err)}") from err
    except Exception as err:
        raise UserError(f"building {path}:{symbol}() failed: {one_line(err)}") from err
    if not isinstance(module, nn.Module):
        raise UserError(f"{path}:{symbol}() returned {type(module).__name__}, not an nn.Module")
    return module, symbol


def _declared_shapes(module: nn.Module) -> list[tuple[int, ...]] | None:
    """A model declares its example input as `example_input_shapes` (or `example_input_shape`)."""
    shapes = getattr(module, "example_input_shapes", None)
    if shapes is None and getattr(module, "example_input_shape", None) is not None:
        shapes = [module.example_input_shape]
    return [tuple(s) for s in shapes] if shapes else None


def load_weights(module: nn.Module, weights: str | Path) -> None:
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read weights {path}: {one_line(err)}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint rather than a bare state dict
    try:
        module.load_state_dict(state, strict=True)
    except Exception as err:
        raise UserError(f"weights {path} do not fit the model: {one_line(err).splitlines()[0]}") from err


def load_model(spec: str | ModelSpec, *, weights=None, input_shape: str | None = None) -> LoadedModel:
    """Load what a model spec names (see `bngraph.spec`), with its example input shapes."""
    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    history: list[dict] = []
    shapes, symbol = None, spec.symbol
    if spec.kind == "zoo":
        from bngraph.zoo import create_model, get_entry

        module = create_model(spec.symbol)
        shapes = [get_entry(spec.symbol).input_shape]
    elif spec.kind == "file":
        module, symbol = _build(spec.path, spec.symbol)
        shapes = _declared_shapes(module)
    elif spec.kind == "artifact":
        module, meta = load_artifact(spec.path)
        shapes = [tuple(s) for s in meta["input_shapes"]] if meta.get("input_shapes") else None
        history = list(meta.get("history", []))
    else:
        raise UserError(f"{spec.text} is an ONNX file; this command needs a PyTorch model")
    if weights is not None:
        load_weights(module, weights)
    if input_shape is not None:
        shapes = parse_input_shapes(input_shape)
    return LoadedModel(module, spec, shapes, history, symbol)


def load(spec: str | Path, *, weights=None) -> nn.Module:
    """`bngraph.load('zoo:mnist-mlp')`, `bngraph.load('out/')`: the nn.Module a spec names."""
    return load_model(str(spec), weights=weights).module
