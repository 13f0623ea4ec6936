"""Artifacts: a folder that turns back into the same nn.Module without the user's model.py.

    model.py       readable module code generated from the traced graph (constructors + forward)
    weights.pt     the state dict, read back with torch.load(weights_only=True): no pickled objects
    code/          the user's own modules model.py imports (blocks.py beside their model.py), if any
    bngraph.json   format version, example input shapes, dtypes and batch axes (0 or null), the
                   passes applied with their reports, and SHA-256 of the files above, so a
                   corrupted copy is refused, not half-loaded

model.py comes from `bngraph.artifact_code`. `save` loads what it wrote and compares weights and
outputs before the folder appears: an artifact that would not round-trip is never written.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import fx, nn

from bngraph.artifact_code import CARRIED_DIR, CLASS_NAME, CODE_FILE, module_source
from bngraph.atomic import ARTIFACT, check_output, description_text, save_tensors, sha256, write_dir_atomically
from bngraph.errors import UserError, one_line
from bngraph.library_call import library_call
from bngraph.passes._fx_effects import global_hook_kinds
from bngraph.runners import batch_axes_of, fresh_inputs, named_tensors, seeded
from bngraph.spec import ARTIFACT_META
from bngraph.trace import TraceFailed, check_model, check_modules_registered, copy_module, faithful_trace
from bngraph.user_modules import importing_beside, imports_in_forward, isolated_modules, python_files

FORMAT = "bngraph-artifact"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"

@library_call(refuse_inference_mode=True)
def save(
    module: nn.Module,
    path: str | Path,
    *,
    example_inputs: Sequence[torch.Tensor] | None = None,
    history: Sequence[dict] = (),
    source: str = "a module",
    code: str | None = None,
    base: tuple[str, str] | None = None,
    carry: dict[str, bytes] | None = None,
    force: bool = False,
    untraceable_code: str | None = None,
) -> Path:
    """Write `module` as an artifact folder at `path`, whole or not at all.

    An existing `path` is replaced only when it is an artifact folder and `force` is true:
    anything else there is refused (UserError) and left as it was (see bngraph.atomic).

    The module is traced and written as generated code, unless `code` (see `wrapped_source`)
    gives the source of a model that cannot be traced (`bngraph.artifact_code.wrapped_source`).
    `base` (`bngraph.artifact_code.user_code`) is the user's code that generated code naming the
    user's own functions, classes and untraced layers carries in front of it. `carry`
    (`bngraph.artifact_code.user_files`) holds the user's modules that code imports from beside
    its file (relative path -> contents): they go to code/, which loading imports from.
    `untraceable_code` is the code to write where torch.fx cannot trace the module: the source it
    was loaded from, for verbs that change only weights (`bngraph.artifact_code.kept_source`).
    """
    # A path given for the module, one tensor or a numpy array for the list of inputs: one line,
    # not an AttributeError (a single (1, 3, 8, 8) tensor was taken row by row, as three inputs).
    check_model(module, "save") if example_inputs is None else check_model(module, "save", example_inputs)
    check_output(path, ARTIFACT, force=force)  # before the trace, not after it
    check_modules_registered(module)  # layers no state dict holds: no artifact computes the same
    check_no_global_hooks(module)
    history = list(history)
    classes, scale = getattr(module, "bngraph_classes", None), getattr(module, "bngraph_input_scale", None)
    recorded = {key for e in history if isinstance(e, dict) for key in ("classes", "input_scale") if e.get(key)}
    if classes and "classes" not in recorded or scale and "input_scale" not in recorded:
        # A model `bngraph.train` returned: its classes and input scale, as a run records them.
        history.append({"command": "bngraph.save", **({"classes": list(classes)} if classes else {}),
                        **({"input_scale": scale} if scale else {})})
    input_shapes = [list(x.shape) for x in example_inputs] if example_inputs is not None else None
    # Each input's dtype and batch axis (0, or None), so that later commands build the same inputs.
    input_dtypes = [str(x.dtype).removeprefix("torch.") for x in example_inputs] if example_inputs is not None else None
    batch_axes = batch_axes_of(example_inputs) if example_inputs is not None else None
    given = module
    if code is None and not isinstance(module, fx.GraphModule):
        try:
            module = faithful_trace(module, example_inputs)
        except TraceFailed as err:
            if untraceable_code is None:  # the CLI carries the model's own file instead; an object alone has none
                raise TraceFailed(f"cannot save {type(module).__name__} as an artifact: an artifact holds traced code, "
                                  f"and {err}. Keep its state_dict with torch.save, or run the command on the model's "
                                  "file (`bngraph fold model.py:Net -o DIR`), whose artifact carries the file's own "
                                  "code") from err
            code = untraceable_code
    if code is None:
        code = module_source(module, input_shapes=input_shapes, source=source, base=base)
    text = code
    _refuse_imports_in_forward(type(given).__name__, text, carry or {})
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    carried = {f"{CARRIED_DIR}/{name}": data for name, data in (carry or {}).items()}

    def write(folder: Path) -> None:
        # The code names its source, whose path may hold bytes that are not UTF-8 (a folder named
        # in Latin-1): written as escapes, which Python reads back as the same name.
        (folder / CODE_FILE).write_text(text, encoding="utf-8", errors="backslashreplace")
        save_tensors(state, folder / WEIGHTS_FILE)
        for name, data in carried.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "torch_version": torch.__version__,
            "source": source,
            "input_shapes": input_shapes,
            "input_dtypes": input_dtypes,
            "input_batch_axes": batch_axes,
            "sha256": {f: sha256(folder / f) for f in (CODE_FILE, WEIGHTS_FILE, *carried)},
            "history": list(history),
        }
        (folder / ARTIFACT_META).write_text(description_text(meta), encoding="utf-8")
        _check_round_trip(given, module, load_artifact(folder)[0], example_inputs)

    return write_dir_atomically(path, write, kind=ARTIFACT, force=force)


def _refuse_imports_in_forward(name: str, code: str, carry: dict[str, bytes]) -> None:
    """An artifact's modules (code/) are its own only while it loads: a forward that imports one
    as it runs took the fresh, unconfigured file, or another artifact's or the user's module of
    that name (a model whose forward read settings.SCALE computed 3x less, loaded elsewhere)."""
    names = {path.split("/")[0].removesuffix(".py") for path in carry}
    sources = {CODE_FILE: code.encode(errors="backslashreplace"), **{f"{CARRIED_DIR}/{path}": data for path, data in carry.items()}}
    if found := imports_in_forward(sources, names):
        file, line, module = found[0]
        raise UserError(f"cannot save {name} as an artifact: {file}:{line} imports {module} inside forward, and a "
                        f"saved model cannot keep that import to its own {module.partition('.')[0]!r} (it takes "
                        "whichever the process holds as it runs); import it at the top of the model's file")


def check_no_global_hooks(module: nn.Module) -> None:
    """Refuse to write `module` while a hook is registered for every module: it runs in this
    process, on the check of the written model too, and a model loaded elsewhere computes without it."""
    if hooks := global_hook_kinds():
        raise UserError(f"cannot save {type(module).__name__}: a {' and a '.join(hooks)} is registered for every "
                        "module (torch.nn.modules.module.register_module_forward_hook...), which no written model "
                        "holds; remove it before saving")


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and values, NaN where the other has NaN: a model that computes NaN for
    an input (a user's NaN image, say) is saved faithfully when its artifact computes NaN too."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)


def _check_round_trip(given: nn.Module, saved: nn.Module, loaded: nn.Module, example_inputs) -> None:
    """`loaded`, the artifact read back, holds the weights of `saved` (what was written: `given`
    or its trace) and computes what `given` does, in eval mode and in train mode."""
    mine, theirs = saved.state_dict(), loaded.state_dict()
    if mine.keys() != theirs.keys() or not all(_identical(mine[k], theirs[k]) for k in mine):
        raise AssertionError("bngraph bug: the artifact's weights do not match the module saved")
    if example_inputs is None:
        return
    for training in (False, True):
        expected = _outputs(given, example_inputs, training)
        if expected is None:  # the model does not run in train mode on its example (a batch of 1 into BN)
            continue
        found = _outputs(loaded, example_inputs, training)
        # Named as verify names them: a user's own dataclass (a class pytree does not know, loaded
        # again with the artifact's code) is compared field by field, not with its __eq__.
        named_a, named_b = named_tensors(expected), named_tensors(found) if found is not None else []
        if found is None or [n for n, _ in named_a] != [n for n, _ in named_b] or not all(
            _identical(x, y) for (_, x), (_, y) in zip(named_a, named_b)
        ):
            if training:
                raise UserError("the written model computes something else than the model given in train mode "
                                "(code that depends on the mode written for one mode only): nothing was written")
            # The weights matched: what differs is state the model's own code makes when built again.
            raise UserError("the written model computes something else than the model given, built again from the "
                            "model's code: its constructor makes state that is not saved (a non-persistent buffer "
                            "drawn at random, or read from elsewhere); nothing was written")


def _outputs(module: nn.Module, example_inputs, training: bool):
    """`module`'s outputs on the example, from one random state (a VAE's sampler draws in eval
    mode too; dropout in train mode), without gradients; in train mode on a copy, whose
    statistics move. None where it raises in train mode."""
    if training:
        module = copy_module(module).train()
        with contextlib.suppress(Exception), torch.no_grad(), seeded():  # noqa: BLE001 (the user's model)
            return module(*fresh_inputs(example_inputs))
        return None
    modes = {m: m.training for m in module.modules()}  # each put back: a submodule may differ
    try:
        with torch.no_grad(), seeded():
            return module.eval()(*fresh_inputs(example_inputs))
    finally:
        for m, flag in modes.items():
            m.training = flag


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / ARTIFACT_META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is not a bngraph artifact (no {ARTIFACT_META})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"artifact {path} is corrupted: {ARTIFACT_META} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}/{ARTIFACT_META} is not a bngraph artifact description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"artifact {path} has format version {meta.get('format_version')}; "
            f"this bngraph reads version {FORMAT_VERSION}"
        )
    return meta


def load_artifact(path: str | Path) -> tuple[nn.Module, dict]:
    """Artifact folder -> (module in train mode, its bngraph.json)."""
    path = Path(path)
    meta = read_meta(path)
    for name, digest in meta.get("sha256", {}).items():
        file = path / name
        if not file.is_file():
            raise UserError(f"artifact {path} is incomplete: {name} is missing")
        if sha256(file) != digest:
            raise UserError(f"artifact {path} is corrupted: {name} does not match its checksum")
    module_name = f"bngraph_artifact_{meta['sha256'][CODE_FILE][:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path / CODE_FILE)
    code = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = code  # so that tracing and pickling can find the class
    carried = path / CARRIED_DIR
    names = {name.split("/")[0].removesuffix(".py") for name in python_files(carried)} if carried.is_dir() else set()
    # Run and built with torch's generator seeded to 0, as bngraph builds a model from its file
    # (`bngraph.load.load_model`): a random buffer no state dict holds is drawn the same each load.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            with importing_beside(carried) if names else contextlib.nullcontext(), isolated_modules(names):
                spec.loader.exec_module(code)
        except Exception as err:  # the user's code it carries: theirs to fix, in one line
            del sys.modules[module_name]
            raise UserError(f"artifact {path}: importing its {CODE_FILE} failed: {one_line(err)}") from err
        model = getattr(code, CLASS_NAME)()
    try:
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as err:  # a checksum-valid but foreign file: still the user's to fix
        raise UserError(f"artifact {path}: cannot load {WEIGHTS_FILE}: {one_line(err)}") from err
    return model.train(), meta


def history_entry(command: str, results: dict) -> dict:
    """One step of an artifact's history: the command and each pass's result summary."""
    return {"command": command, "passes": {name: r.summary() for name, r in results.items()}}
