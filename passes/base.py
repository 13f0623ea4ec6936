"""The pass contract, shared by FX and ONNX passes.

A pass is a function (or a callable object, when it takes options) from a graph to a
`PassResult`: the graph it produced, the sites it changed, and the sites it looked at and left
alone, each with the reason. Having nothing to do is not a skip. Passes never open files and
never pick exit codes; `run_passes` names the failing pass, so errors point at the right place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bngraph.errors import ModelRaised, UserError


@dataclass(frozen=True)
class Skip:
    """A site a pass left alone, and why (one sentence about the user's model)."""

    site: str  # node name as the user sees it in the traced graph
    reason: str  # one sentence about the user's model, not about our code


@dataclass
class PassResult:
    """What a pass did: the graph it returns, the sites it changed, those it skipped and why."""

    graph: Any  # torch.fx.GraphModule or onnx_ir.Model
    changed: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    # One row of facts per changed site (features, layer names...), for the report's table.
    details: list[dict] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.changed)

    def summary(self) -> dict:
        return {
            "changed": list(self.changed),
            "details": list(self.details),
            "skipped": [asdict(s) for s in self.skipped],
        }


Pass = Callable[[Any], PassResult]


def pass_name(p: Pass) -> str:
    """A pass's name: its `name`, its function's name (also through functools.partial)."""
    p = getattr(p, "func", p)
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def run_passes(graph: Any, passes: Sequence[Pass]) -> tuple[Any, dict[str, PassResult]]:
    """Run `passes` in order, each on the previous one's graph; keep each result by name."""
    results: dict[str, PassResult] = {}
    for p in passes:
        name = pass_name(p)
        try:
            result = p(graph)
        except ModelRaised:  # the user's forward raised where a pass ran it: not this pass's doing
            raise
        except UserError as err:
            raise UserError(f"{name}: {err}") from err
        except Exception as err:  # a bug: keep the traceback, but say which pass it was in
            err.add_note(f"bngraph: raised in pass {name!r} (after {list(results) or 'none'})")
            raise
        results[name] = result
        graph = result.graph
    return graph, results
