"""The user's own Python files beside their model: imported as `python model.py` would import
them, and carried into artifacts so that an artifact loads anywhere.

    with importing_beside(folder): ...     # `from blocks import Block` finds folder/blocks.py
    forget_stale_siblings(folder)          # another folder's blocks.py, or one edited since: imported anew
    local_modules(folder)                  # {"blocks.py": Path(...)}: what the model imported from there
    with isolated_modules({"blocks"}): ... # an artifact's carried blocks.py, not the user's current one
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import site
import sys
import sysconfig
from pathlib import Path

from bngraph.errors import UserError


@contextlib.contextmanager
def importing_beside(folder: Path):
    """`folder` leads sys.path while the code inside runs (the user's file's own imports), as a
    script's folder does; then it goes last, so that imports made later (inside a forward) still
    find its modules while the packages bngraph imports later are not shadowed by a user's
    onnx.py."""
    entry = os.path.abspath(folder)  # a relative entry would find other files once the working folder changes
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)
        if entry not in sys.path:
            sys.path.append(entry)


@contextlib.contextmanager
def working_folder_restored():
    """The working folder, as it was before the code inside ran, once it has run. Research code
    changes it (`os.chdir(os.path.dirname(__file__))` at the top of a model file, so that its
    constructor finds its files); the paths the user gave bngraph (`-o`, the model's own file) are
    relative to where the command started, and an output went into the model's folder instead."""
    before = os.getcwd()
    try:
        yield
    finally:
        if os.getcwd() != before:
            os.chdir(before)


def python_files(folder: Path) -> dict[str, Path]:
    """Every .py file under `folder` (none from __pycache__), by path relative to it, sorted."""
    files = {py.relative_to(folder).as_posix(): py for py in folder.rglob("*.py") if "__pycache__" not in py.parts}
    return dict(sorted(files.items()))


def local_modules(folder: Path) -> dict[str, Path]:
    """The modules this process imported from `folder` itself (a sibling blocks.py, a package
    layers/ with every .py file in it, as its modules may import each other later): path
    relative to `folder` -> file. A module counts when its top-level name is a file or package
    directly in `folder`, so a virtual environment inside the folder brings nothing along."""
    folder = folder.resolve()
    found: dict[str, Path] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or name.startswith(("bngraph_user_", "bngraph_artifact_")) or name.partition(".")[0] == "bngraph":
            continue  # the user's file itself, artifacts' code, and bngraph (a model beside its checkout)
        top, file = name.partition(".")[0], Path(file).resolve()
        if file == folder / f"{top}.py":
            found[f"{top}.py"] = file
        elif (folder / top).is_dir() and file.is_relative_to(folder / top):
            found.update({f"{top}/{name}": py for name, py in python_files(folder / top).items()})
    return dict(sorted(found.items()))


@contextlib.contextmanager
def isolated_modules(names: set[str]):
    """Top-level modules `names` (and their submodules) imported afresh inside, and the process's
    own modules of those names back after: an artifact's carried blocks.py is the one its code
    runs, not the user's current blocks.py imported earlier in this process (nor the other way
    round). The artifact's code keeps the modules it imported; sys.modules forgets them."""

    def ours(name: str) -> bool:
        return name.partition(".")[0] in names

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


# The contents' digest of each file of the user's modules as bngraph's import of a model file read it.
_IMPORTED_AS: dict[str, str] = {}


def forget_stale_siblings(folder: Path) -> dict[str, object]:
    """Before a model file in `folder` is imported: forget (sys.modules) the modules of the names
    `folder` holds where one comes from elsewhere (another model's blocks.py: `verify a/model.py
    b/model.py` compared the first with itself), and all of them where one changed since bngraph
    imported it (a notebook loading again after an edit; blocks.py keeps what it took from an
    edited helpers.py), so that `from blocks import Block` gets this folder's files as they are
    now, as `python model.py` would. Modules still as they were are reused, and the modules stay
    imported, as a script's do: a forward's `import blocks` and pickling find them. A name an
    installed package holds (a json.py beside the model) stays the package's. Returns the
    caller's own modules forgotten (their script's utils.py), for `put_back` after the import."""
    folder = folder.resolve()
    found: dict[str, list[str]] = {}
    for name in _top_level_names(folder):
        module = sys.modules.get(name)
        if module is not None and name != "bngraph" and not _installed(module):
            found[name] = [n for n in sys.modules if n == name or n.startswith(f"{name}.")]
    files = {name: [Path(f).resolve() for n in names if (f := getattr(sys.modules[n], "__file__", None))]
             for name, names in found.items()}
    elsewhere = {name for name, paths in files.items() if not paths or not all(p.is_relative_to(folder) for p in paths)}
    changed = any(_IMPORTED_AS.get(str(p)) not in (None, _digest(p)) for paths in files.values() for p in paths)
    forgotten: dict[str, object] = {}
    for name in found if changed else elsewhere:
        for n in found[name]:
            module = sys.modules.pop(n)
            if not any(str(Path(f).resolve()) in _IMPORTED_AS for f in [getattr(module, "__file__", None)] if f):
                forgotten[n] = module  # not one bngraph imported: the caller's own
    return forgotten


def put_back(forgotten: dict[str, object]) -> None:
    """The caller's own modules that `forget_stale_siblings` forgot, theirs again in sys.modules
    (the model keeps the modules it imported from its folder)."""
    sys.modules.update(forgotten)


def remember_siblings(folder: Path) -> None:
    """Record the files of the modules imported from `folder` as they are now (`forget_stale_siblings`)."""
    for file in local_modules(folder).values():
        _IMPORTED_AS[str(file)] = _digest(file)


def _digest(file: Path) -> str | None:
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError:
        return None


def imports_in_forward(sources: dict[str, bytes], names: set[str]) -> list[tuple[str, int, str]]:
    """(file, line, module) for each import of one of the modules `names` made as a model runs:
    in a `forward` of `sources` (file name -> text), a `__call__`, a property, a function used as
    a value, or a function one of those calls by name (`scale(x)`, `self.scale(x)`), as a
    statement or through importlib.import_module("name") or __import__("name"). Run then, it
    takes whichever module of that name the process holds."""
    trees = {}
    for file, text in sources.items():
        try:
            trees[file] = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
    functions = [(file, f) for file, tree in trees.items() for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    by_name: dict[str, list] = {}
    for file, f in functions:
        by_name.setdefault(f.name, []).append((file, f))
    # Where a model runs: its forward, a callable object's __call__, a property (read as it runs),
    # and a function handed around as a value (`self.post = _scaled`), then what those call by name.
    called = {id(n.func) for tree in trees.values() for n in ast.walk(tree) if isinstance(n, ast.Call)}
    values = {n.id for tree in trees.values() for n in ast.walk(tree)
              if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in called}
    reached, todo = set(), [(file, f) for file, f in functions if f.name in ("forward", "__call__") or f.name in values
                            or any(isinstance(d, ast.Name) and d.id in ("property", "cached_property") for d in f.decorator_list)]
    while todo:
        file, f = todo.pop()
        if id(f) in reached:
            continue
        reached.add(id(f))
        for call in (n for n in ast.walk(f) if isinstance(n, ast.Call)):
            called = call.func.id if isinstance(call.func, ast.Name) else \
                call.func.attr if isinstance(call.func, ast.Attribute) else None
            todo += by_name.get(called, []) if called != "__init__" else []
    found = []
    for file, f in functions:
        if id(f) not in reached:
            continue
        for node in ast.walk(f):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module] if node.level == 0 and node.module else []
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) and (
                    isinstance(node.func, ast.Name) and node.func.id == "__import__"
                    or isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"):
                imported = [node.args[0].value]
            else:
                continue
            found += [(file, node.lineno, m) for m in imported if m.partition(".")[0] in names]
    return found


# Top-level module name -> the folder whose model's forward imports it as it runs.
_IMPORTED_IN_FORWARD: dict[str, Path] = {}


def refuse_ambiguous_imports_in_forward(model_file: Path, forgotten: dict[str, object]) -> None:
    """UserError where a forward imports a module of the model's folder as it runs (`import
    settings` in forward) and this process holds, or will hold, another module of that name: the
    caller's own (`forgotten`), or another model folder's, whose forward imports it so too or
    which a model beside it will import. Run later, such a forward took the other module and
    computed something else without a word (`verify a/model.py b/model.py` passed)."""
    folder = model_file.parent.resolve()
    # A name the standard library or an installed package holds is theirs (a signal.py beside the model is not imported).
    names = {n for n in _top_level_names(folder) if n not in sys.stdlib_module_names and not _installed(sys.modules.get(n))}
    local = local_modules(folder)
    files = {model_file, *local.values()}
    found = imports_in_forward({str(f): _read(f) for f in files}, names)
    imported = {path.split("/")[0].removesuffix(".py") for path in local}
    def refuse_where_another_forward_imports(top: str, here: str) -> None:
        other = _IMPORTED_IN_FORWARD.get(top)
        if other is not None and other != folder:
            raise UserError(f"the forward of the model in {other} imports {top} as it runs, and {here}: in one process "
                            "one model would run the other's; use separate processes, or import it at the top of each "
                            "model file")

    for top in imported:  # this folder's modules, now in sys.modules, replace those another forward imports as it runs
        refuse_where_another_forward_imports(top, f"{folder} holds another {top}")
    for file, line, module in found:
        top = module.partition(".")[0]
        refuse_where_another_forward_imports(top, f"so does the one in {folder}, from another {top}")
        if top in forgotten:
            raise UserError(f"{Path(file).name}:{line} imports {module} inside forward, and this process already "
                            f"holds its own {top!r}, which that import would take instead of the one beside the model: "
                            "import it at the top of the model file")
        _IMPORTED_IN_FORWARD[top] = folder


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError:
        return b""


def _top_level_names(folder: Path) -> set[str]:
    """The modules `import NAME` finds in `folder`: its .py files and its folders (packages)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return set()
    return {p.stem for p in entries if p.suffix == ".py"} | {p.name for p in entries if p.is_dir() and p.name.isidentifier()}


def _installed(module) -> bool:
    """Whether `module` (from sys.modules, or None) comes with Python or an installed package:
    built in, or a file under the standard library or a site-packages folder."""
    if module is None:
        return False
    file = getattr(module, "__file__", None)
    if not file:  # built in or frozen; else made in memory, as a notebook may
        return getattr(getattr(module, "__spec__", None), "origin", None) in ("built-in", "frozen")
    places = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    places |= {*site.getsitepackages(), site.getusersitepackages(), sys.prefix, sys.base_prefix}
    resolved = Path(file).resolve()
    return any(resolved.is_relative_to(Path(place).resolve()) for place in places if place)
