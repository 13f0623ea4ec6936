"""Model spec -> nn.Module and its example inputs. Loaders load; they never run a pass."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import pickle
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from bngraph.artifacts import load_artifact
from bngraph.errors import UserError, model_raised, one_line, require_file
from bngraph.library_call import library_call
from bngraph.runners import ExampleInputs, random_tensor
from bngraph.spec import ModelSpec, input_layout, parse_input_dtypes, parse_input_shapes, parse_model_spec
from bngraph.trace import check_model, materialize_lazy
from bngraph.user_modules import (
    forget_stale_siblings, importing_beside, put_back, refuse_ambiguous_imports_in_forward, remember_siblings,
    working_folder_restored,
)
from bngraph.zoo import create_model, get_entry


@dataclass
class LoadedModel:
    module: nn.Module
    spec: ModelSpec
    input_shapes: list[tuple[int, ...]] | None
    history: list[dict] = field(default_factory=list)  # passes already applied (artifacts)
    symbol: str | None = None  # the class, function or module-level instance a .py spec resolved to
    input_dtypes: list[str] | None = None  # numpy names, one per input; None: all float32
    batch_axes: list[int | None] | None = None  # 0, or None for an input without one; None: all 0
    symbol_is_instance: bool = False  # `model = nn.Sequential(...)`: a model the file builds as it runs

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The classes its training recorded in its history (output i is class i), or None."""
        entries = (e for e in reversed(self.history) if isinstance(e, dict) and e.get("classes"))
        return next((tuple(e["classes"]) for e in entries), None)

    @property
    def input_scale(self) -> str | None:
        """How the inputs of its last training or recalibration that scaled them were scaled, as
        its history records it (`input_scale`), or None where it does not say (a model never
        trained here, or trained before bngraph recorded it). Entries on data used as stored are
        passed over: recalibrated on floats in [0, 1] (which `check_input_scale` lets through
        for a model trained on pixels / 255), the model still takes [0, 1], and a later
        recalibration on 0-255 floats was let through."""
        from bngraph.training.data import AS_STORED  # here: bngraph.training imports this module

        entries = (e for e in reversed(self.history) if isinstance(e, dict) and e.get("input_scale") not in (None, AS_STORED))
        return next((e["input_scale"] for e in entries), None)

    def example_inputs(self, seed: int = 0) -> ExampleInputs:
        """Random inputs of the declared shapes and dtypes (see `bngraph.runners.random_tensor`),
        carrying each one's batch axis for the checks that vary the batch."""
        if not self.input_shapes:
            raise UserError(
                f"{self.spec.text} declares no example input: give one with --input-shape, e.g. 2,3,32,32"
            )
        dtypes, batch_axes = input_layout(self.input_shapes, self.input_dtypes, (), self.batch_axes)
        gen = torch.Generator().manual_seed(seed)
        tensors = [
            random_tensor(shape, _torch_dtype(dtype), gen) for shape, dtype in zip(self.input_shapes, dtypes)
        ]
        # Lazy layers take their shapes now, on the model itself, so that every command and the
        # copies they make see one set of weights (see `bngraph.trace.materialize_lazy`).
        materialize_lazy(self.module, tensors)
        return ExampleInputs(tensors, batch_axes)


def _torch_dtype(name: str) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=name)).dtype


def import_user_file(path: Path):
    """The user's file imported as `python path` would run it: `from blocks import Block` finds
    the file's sibling blocks.py (`importing_beside`)."""
    path = path.resolve()
    name = "bngraph_user_" + hashlib.sha1(os.fsencode(path)).hexdigest()[:12]  # a Latin-1 folder name too
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    forgotten = forget_stale_siblings(path.parent)
    try:
        with importing_beside(path.parent):
            spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise UserError(f"importing {path} failed: {one_line(err)}") from err
    finally:
        remember_siblings(path.parent)
        put_back(forgotten)
    refuse_ambiguous_imports_in_forward(path, forgotten)
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
    """What in the user's file builds a model: its classes and functions that do, else the
    models it builds as it runs (`model = nn.Sequential(...)`), but for those inside another."""
    builders = [
        name
        for name, obj in vars(code).items()
        if getattr(obj, "__module__", None) == code.__name__ and _builds_a_module(obj)
    ]
    if builders:
        return builders
    instances = {name: obj for name, obj in vars(code).items() if isinstance(obj, nn.Module) and not name.startswith("_")}
    inside = {id(sub) for obj in instances.values() for sub in obj.modules() if sub is not obj}
    return [name for name, obj in instances.items() if id(obj) not in inside]


def _build(path: Path, symbol: str | None) -> tuple[nn.Module, str, object]:
    """The model `symbol` of the user's file builds (or is), its name, and the file's Python module."""
    code = import_user_file(path)
    if symbol is None:
        candidates = _module_candidates(code)
        if not candidates:
            raise UserError(
                f"{path} defines no model (an nn.Module class, a function annotated `-> nn.Module`, or "
                f"an nn.Module it builds at module level); name what builds it as {path}:Symbol"
            )
        if len(candidates) > 1:
            raise UserError(f"{path} defines {len(candidates)} models ({', '.join(candidates)}); name one as {path}:Symbol")
        symbol = candidates[0]
    if not hasattr(code, symbol) and symbol != (utf8 := os.fsencode(symbol).decode("utf-8", "replace")):
        symbol = utf8  # an argument the locale (LANG=C) decoded byte by byte; Python names are UTF-8
    if not hasattr(code, symbol):
        raise UserError(f"{path} has no symbol {symbol!r} (it has: {', '.join(_module_candidates(code)) or 'no modules'})")
    factory = getattr(code, symbol)
    if isinstance(factory, nn.Module):
        check_model(factory, "bngraph")
        return factory, symbol, code  # built as the file ran, under the same seeded generator
    if not callable(factory):
        raise UserError(f"{path}:{symbol} is not a class, a function or an nn.Module")
    with importing_beside(path.parent):  # a constructor's `from blocks import Block` finds this folder's first
        module = call_user_factory(path, symbol, factory)
    if not isinstance(module, nn.Module):
        raise UserError(f"{path}:{symbol}() returned {type(module).__name__}, not an nn.Module")
    check_model(module, "bngraph")
    return module, symbol, code


def call_user_factory(path: Path, symbol: str, factory):
    """`factory()`, `symbol` of the user's file `path`: whatever it raises is the user's error."""
    try:
        inspect.signature(factory).bind()
    except TypeError as err:  # before calling: a TypeError raised inside it is another story
        raise UserError(
            f"{path}:{symbol}() cannot be called without arguments ({err}); add a function that builds it "
            f"to {path.name}, e.g. `def build(): return {symbol}(...)`, and name that: {path}:build"
        ) from err
    except ValueError:
        pass  # no signature to read (a builtin): the call says
    try:
        return factory()
    except Exception as err:
        raise model_raised(err, f"{path}:{symbol}()") from err


def declared_shapes(module, where: str) -> list[tuple[int, ...]] | None:
    """A model (or its file) declares its example input as `example_input_shapes` (or
    `example_input_shape`)."""
    shapes = getattr(module, "example_input_shapes", None)
    if shapes is None and getattr(module, "example_input_shape", None) is not None:
        shapes = [module.example_input_shape]
    shapes = [tuple(s) for s in shapes] if shapes else None
    for shape in shapes or ():
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            plural = " (several inputs: example_input_shapes = [...])" if any(isinstance(d, (tuple, list)) for d in shape) else ""
            raise UserError(f"{where}: the example input shape {shape!r} is not a tuple of sizes{plural}")
    return shapes


def load_weights(module: nn.Module, weights: str | Path | Mapping) -> None:
    """Load a state dict (or a checkpoint holding one under "state_dict"/"model") into `module`,
    strictly: every key present, none extra, every shape the model's (once a wrapper's prefix on
    every key is dropped: `_without_wrapper_prefix`). `weights`: a file torch.save wrote, or
    (from Python) the state dict itself."""
    if isinstance(weights, Mapping):
        path, state = "given", dict(weights)
    elif isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        state = _read_weights(path)
    else:  # a model given for its weights: pathlib's TypeError
        raise UserError(f"weights are a {type(weights).__name__}: give a state dict (model.state_dict()) or the path "
                        "of a file torch.save wrote")
    if isinstance(state, dict):
        for key in ("state_dict", "model"):  # a training checkpoint rather than a bare state dict
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UserError(f"weights {path} hold a {type(state).__name__}, not a state dict (parameter name -> tensor)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"weights {path} are not a state dict: {_some(not_tensors)} are not tensors")
    own = module.state_dict()
    counted = any(k.rsplit(".", 1)[-1] == _BATCHES_TRACKED for k in state)
    if not counted:
        # A BatchNorm's state from before torch 0.4.1 has no counter (nor one a user popped): each
        # keeps the model's. torch fills it in only where the file's metadata says it is that old.
        own = {k: v for k, v in own.items() if k.rsplit(".", 1)[-1] != _BATCHES_TRACKED}
    state = _without_wrapper_prefix(state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if mismatched:
        problems.append(f"shapes differ (file vs model) for {_some(mismatched)}")
    if problems:
        raise UserError(f"weights {path} are for another model: " + "; ".join(problems))
    try:
        module.load_state_dict(state, strict=counted)  # every other key was checked above
    except Exception as err:
        raise UserError(f"weights {path} do not fit the model: {_first_line(one_line(err))}") from err


def _read_weights(path: Path):
    if path.is_dir():
        raise UserError(f"weights {path} is a folder, not a file: give the state dict file saved with torch.save")
    require_file(path, "weights file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only=True unpickles tensors and containers only; anything else, or bytes that
        # are no pickle at all, ends here (and loading it unrestricted would run its code).
        raise UserError(
            f"cannot read weights {path}: not a state dict saved with torch.save (it holds other "
            f"objects, or is not a torch file at all)"
        ) from err
    except PermissionError as err:
        raise UserError(f"cannot read weights {path}: {err.strerror}") from err
    except Exception as err:
        # A truncated or text file fails deep in torch's readers, as "OSError: [Errno 22] Invalid
        # argument", "KeyError: 101", EOFError: say what the file is not, then torch's words.
        cause = _first_line(one_line(err)).split(". ")[0]
        raise UserError(f"cannot read weights {path}: not a PyTorch state dict file torch can read (cut short, or "
                        f"not saved with torch.save; {cause})") from err


_BATCHES_TRACKED = "num_batches_tracked"


def _without_wrapper_prefix(state: dict, own: dict) -> dict:
    """`state` with the prefix a wrapper put on every key removed (DataParallel's and DDP's
    `module.`, torch.compile's `_orig_mod.`, a Lightning module's `model.`), where the keys left are
    exactly the model's: no other reading of them is possible. Else `state` as it is."""
    keys, stripped = set(own), state
    while set(stripped) != keys:
        heads = {k.split(".", 1)[0] for k in stripped}
        if len(heads) != 1 or not all("." in k for k in stripped):
            return state
        cut = len(heads.pop()) + 1
        stripped = {k[cut:]: v for k, v in stripped.items()}
    return stripped


def _some(names: list[str], shown: int = 3) -> str:
    """"3 keys: a, b, c" or "12 keys: a, b, c, ...": a few names and the count."""
    more = ", ..." if len(names) > shown else ""
    return f"{len(names)} key{'s' if len(names) != 1 else ''}: {', '.join(names[:shown])}{more}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def load_model(
    spec: str | ModelSpec,
    *,
    weights=None,
    input_shape: str | None = None,
    input_dtype: str | None = None,
    static_inputs: Sequence[int] = (),
    seed: int = 0,
) -> LoadedModel:
    """Load what a model spec names (see `bngraph.spec`), with its example inputs' shapes, dtypes
    and batch axes: declared (zoo entry; a model class's `example_input_shapes`,
    `example_input_dtypes`, `example_input_batch_axes`, or its file's; an artifact's bngraph.json)
    unless given.

    A file's or zoo model is built with torch's generator seeded to `seed` (and put back after),
    so a spec names the same initial weights on every load: `bngraph fold
    model.py:Net -o folded` and then `bngraph verify model.py:Net folded` compare one model."""
    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    history: list[dict] = []
    shapes, symbol = None, spec.symbol
    dtypes, batch_axes = None, None
    symbol_is_instance = False
    if spec.kind == "zoo":
        module = create_model(spec.symbol, seed=seed)
        shapes = [get_entry(spec.symbol).input_shape]
    elif spec.kind == "file":
        # Read again later (the artifact carries its source), perhaps after the model's forward
        # moved the working folder: absolute from here on.
        spec = replace(spec, path=spec.path.absolute())
        with torch.random.fork_rng(devices=[]), working_folder_restored():
            torch.manual_seed(seed)
            module, symbol, code = _build(spec.path, spec.symbol)
        symbol_is_instance = getattr(code, symbol) is module
        # The model's own declaration, else its file's (module-level constants, as users write them).
        declares = module if declared_shapes(module, str(spec.path)) else code
        shapes = declared_shapes(declares, str(spec.path))
        dtypes, batch_axes = _declared(declares, "example_input_dtypes"), _declared(declares, "example_input_batch_axes")
    elif spec.kind == "artifact":
        module, meta = load_artifact(spec.path)
        shapes = [tuple(s) for s in meta["input_shapes"]] if meta.get("input_shapes") else None
        dtypes, batch_axes = meta.get("input_dtypes"), meta.get("input_batch_axes")  # absent before they were stored
        history = list(meta.get("history", []))
    else:
        raise UserError(f"{spec.text} is an ONNX file; this command needs a PyTorch model")
    if input_shape is not None:
        given = parse_input_shapes(input_shape)
        if shapes is None or len(given) != len(shapes):
            dtypes, batch_axes = None, None  # declared for other inputs
        shapes = given
    if input_dtype is not None:
        dtypes = parse_input_dtypes(input_dtype)
    elif dtypes is not None:  # declared as numpy names or torch dtypes
        dtypes = parse_input_dtypes(";".join(str(d).removeprefix("torch.") for d in dtypes))
    if shapes is not None:
        dtypes, batch_axes = input_layout(shapes, dtypes, static_inputs, batch_axes)
    elif input_dtype is not None or static_inputs:
        raise UserError(f"{spec.text} declares no example input: give --input-shape with --input-dtype/--static-input")
    loaded = LoadedModel(module, spec, shapes, history, symbol, dtypes, batch_axes, symbol_is_instance)
    if shapes is not None and any(is_lazy(t) for t in (*module.parameters(), *module.buffers())):
        # Lazy layers take their shapes, and draw their weights, from the example now, seeded as
        # the model was built: drawn at their first call, two loads of one spec differed. With
        # weights, as the user's own model did before it saved them: torch's load alone gives
        # them shapes but leaves them lazy, and their first call later fails on a copy.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loaded.example_inputs()
    if weights is not None:
        load_weights(module, weights)
    return loaded


def _declared(module, name: str) -> list | None:
    value = getattr(module, name, None)
    return list(value) if value is not None else None


@library_call
def load(spec: str | Path, *, weights=None) -> nn.Module:
    """`bngraph.load('zoo:mnist-mlp')`, `bngraph.load('out/')`: the nn.Module a spec names, with
    `weights` loaded into it strictly where given (a file torch.save wrote, or a state dict).

    Loading runs Python code: a `file.py` spec, and an artifact's `model.py` (its generated
    code). As with pickle, load only artifacts and files you trust. The weights are read with
    `weights_only=True`, and an artifact whose files no longer match the checksums in its
    bngraph.json is refused (UserError), so a changed or damaged file is never run unnoticed;
    but the checksums live in the same folder, so they are no defence against a folder someone
    else wrote.

    A model from a run or an artifact carries what its training recorded, for `bngraph.train`
    to read data as `bngraph train` does: its classes (an image folder's) as `bngraph_classes`
    (output i is class i), its input scale as `bngraph_input_scale`, and its inputs' dtypes as
    `example_input_dtypes` (integer pixels for a model that takes them, not floats / 255).
    """
    loaded = load_model(str(spec), weights=weights)
    module = module_with_its_meaning(loaded)
    if loaded.input_dtypes is not None and getattr(module, "example_input_dtypes", None) is None:
        module.example_input_dtypes = tuple(loaded.input_dtypes)
    return module


def module_with_its_meaning(loaded: LoadedModel) -> nn.Module:
    """`loaded.module` carrying what its training recorded: its classes as `bngraph_classes`, its
    input scale as `bngraph_input_scale` (which export writes into the ONNX file's metadata)."""
    module = loaded.module
    if loaded.classes is not None:
        module.bngraph_classes = loaded.classes
    if loaded.input_scale is not None:
        module.bngraph_input_scale = loaded.input_scale
    return module
