"""Write docs/api.md: every public function and class of bngraph, with its signature and the
first paragraph of its docstring. tests/test_packaging.py fails when the file is stale or a
public name has no docstring, so after changing the API run:

    .venv/bin/python scripts/api_docs.py
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

# Module -> its public names: `__all__` where it has one; the names the README points to otherwise.
MODULES = {
    "bngraph": None,
    "bngraph.training": ["train", "TrainConfig", "TrainRun", "TensorData", "pick_device", "evaluate", "read_metrics"],
    "bngraph.reproduce.mnist": ["reproduce_mnist", "MnistConfig", "write_mnist"],
    "bngraph.reproduce.inception": ["reproduce_inception", "InceptionConfig", "write_inception"],
    "bngraph.passes": None,
    "bngraph.zoo": None,
}


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names = MODULES[module_name] or list(module.__all__)
    return [n for n in names if inspect.isfunction(getattr(module, n)) or inspect.isclass(getattr(module, n))]


def docstring(obj) -> str | None:
    """The object's own docstring (a dataclass's generated `Name(field, ...)` does not count)."""
    doc = obj.__doc__
    if not doc or (dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}(")):
        return None
    return inspect.cleandoc(doc)


def first_paragraph(doc: str) -> str:
    return " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())


def signature(name: str, obj) -> str:
    try:
        text = f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):  # exception classes: their signature is Exception's
        return f"class {name}({', '.join(b.__name__ for b in obj.__bases__)})"
    # Postponed annotations are strings: show them as written, without quotes.
    return re.sub(r"(: |-> )'([^']*)'", r"\1\2", text)


def render() -> str:
    parts = [
        "# API reference\n",
        "Generated from the docstrings by `scripts/api_docs.py` (a test fails when this file is stale:",
        "regenerate it with `.venv/bin/python scripts/api_docs.py`). Each command of the CLI runs the",
        "function of the same name; `bngraph COMMAND --help` describes the command line.\n",
    ]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        parts.append(f"## `{module_name}`\n")
        parts.append(first_paragraph(inspect.cleandoc(module.__doc__ or "")) + "\n")
        for name in public_names(module_name):
            obj = getattr(module, name)
            kind = "class" if inspect.isclass(obj) else "function"
            if isinstance(getattr(obj, "in_place", None), bool):  # a pass: its declared contract
                kind += ", in place" if obj.in_place else ", returns a new graph"
            parts.append(f"### `{module_name}.{name}` ({kind})\n")
            parts.append(f"```python\n{signature(name, obj)}\n```\n")
            doc = docstring(obj)
            parts.append((first_paragraph(doc) if doc else "(no docstring)") + "\n")
    return "\n".join(parts)


def missing_docstrings() -> list[str]:
    return [f"{m}.{n}" for m in MODULES for n in public_names(m) if not docstring(getattr(importlib.import_module(m), n))]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}; without a docstring: {', '.join(missing_docstrings()) or 'none'}")
