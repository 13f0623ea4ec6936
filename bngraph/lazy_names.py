"""Public names answered from their defining modules on first use, for `bngraph` and `bngraph.passes`.

`bngraph.fold` names a function and also the module that defines it, and importing that module
sets the package's attribute to the module. A package made lazy here answers its public names
first, so they always give the function, and `import bngraph` starts neither torch nor onnx.
"""

import importlib
import random
import sys
import types


def answer_names_lazily(package_name: str, api: dict[str, str]) -> None:
    """Make `package_name` answer each name in `api` (name -> defining module) from that module."""

    class _LazyPackage(types.ModuleType):
        def __getattribute__(self, name: str):
            where = api.get(name)
            if where is None:
                return super().__getattribute__(name)
            if where in sys.modules:
                return getattr(sys.modules[where], name)
            # The caller's Python random state kept: rich, imported on the way, draws from it.
            state = random.getstate()
            try:
                return getattr(importlib.import_module(where), name)
            finally:
                random.setstate(state)

        def __dir__(self):
            return sorted({*super().__dir__(), *api})

    sys.modules[package_name].__class__ = _LazyPackage
