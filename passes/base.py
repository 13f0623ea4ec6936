"""The pass contract, shared by FX and ONNX passes.

A pass is a function (or a callable object, when it takes options) from a graph to a
`PassResult`: the graph it produced, the sites it changed, and the sites it looked at and left
alone, each with the reason. Having nothing to do is not a skip. Passes never open files and
never pick exit codes; `run_passes` names the failing pass, so errors point at the right place.

Each pass declares whether it works in place, as onnx-ir's passes do (`in_place`): an in-place
pass changes the graph it is given and returns that graph; any other returns a new graph and
leaves the one it was given as it was. A function declares it with `@graph_pass(in_place=...)`,
a class with an `in_place` attribute, and `run_passes` checks it after each pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from bngraph.errors import ModelRaised, UserError, add_note


@dataclass(frozen=True)
class Skip:
    """A site a pass left alone, and why (one sentence about the user's model)."""

    site: str  # node name as the user sees it in the traced graph
    reason: str  # one sentence about the user's model, not about our code


@dataclass(frozen=True)
class Probe:
    """Where to measure what a fold flagged for precision did: the node that held the BN's result
    in the graph the pass was given (`reference`), and the node that holds it now (`folded`)."""

    reference: str
    folded: str


@dataclass
class PassResult:
    """What a pass did: the graph it returns, the sites it changed, those it skipped and why."""

    graph: Any  # torch.fx.GraphModule or onnx_ir.Model
    changed: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    # One row of facts per changed site (features, layer names...), for the report's table.
    details: list[dict] = field(default_factory=list)
    # Changed site -> where its error is measured, for the folds that may magnify rounding
    # (`_bn_affine.PRECISION_LOSS_GAIN`): the pipeline measures, the report shows the error.
    probes: dict[str, Probe] = field(default_factory=dict)

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
PassFunction = TypeVar("PassFunction", bound=Callable[..., PassResult])


def graph_pass(*, in_place: bool) -> Callable[[PassFunction], PassFunction]:
    """Declare a pass function's contract: `in_place=True` when it changes the graph it is given
    and returns it, False when it returns a new graph and leaves the given one unchanged."""

    def declare(function: PassFunction) -> PassFunction:
        function.in_place = in_place
        return function

    return declare


def pass_name(p: Pass) -> str:
    """A pass's name: its `name`, its function's name (also through functools.partial)."""
    p = getattr(p, "func", p)
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def works_in_place(p: Pass) -> bool:
    """A pass's declared `in_place` (also through functools.partial)."""
    declared = getattr(getattr(p, "func", p), "in_place", None)
    if not isinstance(declared, bool):
        raise TypeError(
            f"pass {pass_name(p)!r} does not declare whether it works in place: "
            "decorate it with @graph_pass(in_place=...) or give its class an in_place attribute"
        )
    return declared


def _holdings(graph: Any) -> list[tuple]:
    """What a pass could change in `graph`, read cheaply (no tensor values): the objects it holds,
    and each tensor's version counter, which every in-place write moves."""
    if hasattr(graph, "named_modules"):  # torch.nn.Module, torch.fx.GraphModule
        tensors = [*graph.named_parameters(remove_duplicate=False), *graph.named_buffers(remove_duplicate=False)]
        nodes = getattr(getattr(graph, "graph", None), "nodes", ())  # fx.Node.args and .kwargs are replaced, never edited
        return [
            *graph.named_modules(remove_duplicate=False),
            *((name, t, t._version) for name, t in tensors),
            *((n, n.op, n.target, n.args, n.kwargs) for n in nodes),
        ]
    if hasattr(getattr(graph, "graph", None), "initializers"):  # onnx_ir.Model
        nodes = [(n, n.op_type, *n.inputs, *n.outputs, *n.attributes.values()) for n in graph.graph]
        initializers = [(name, v, v.const_value) for name, v in graph.graph.initializers.items()]
        return [*nodes, *initializers, tuple(graph.graph.inputs), tuple(graph.graph.outputs)]
    raise TypeError(f"cannot tell whether a pass changed a {type(graph).__name__}")


def _unchanged(before: list[tuple], after: list[tuple]) -> bool:
    # The same objects, names and counters: `is` for objects (a tensor's == is elementwise).
    return len(before) == len(after) and all(
        len(a) == len(b) and all(x is y or (isinstance(x, (str, int)) and x == y) for x, y in zip(a, b))
        for a, b in zip(before, after)
    )


def _check_contract(name: str, in_place: bool, given: Any, returned: Any, before: list[tuple] | None) -> None:
    """A pass that breaks its declaration is a bug in the pass: say which, and how."""
    if in_place and returned is not given:
        raise RuntimeError(f"pass {name!r} is declared in place but returned another graph than it was given")
    if not in_place and returned is given:
        raise RuntimeError(f"pass {name!r} is declared not in place but returned the graph it was given")
    if not in_place and not _unchanged(before, _holdings(given)):
        raise RuntimeError(f"pass {name!r} is declared not in place but changed the graph it was given")


def run_passes(graph: Any, passes: Sequence[Pass]) -> tuple[Any, dict[str, PassResult]]:
    """Run `passes` in order, each on the previous one's graph; keep each result by name. Each
    pass's declared `in_place` is checked (see the module docstring)."""
    results: dict[str, PassResult] = {}
    runs: Counter[str] = Counter()
    for p in passes:
        name, in_place = pass_name(p), works_in_place(p)
        runs[name] += 1
        if runs[name] > 1:  # a pass run again (onnx_simplify, before and after the folds) keeps both results
            name = f"{name} ({runs[name]})"
        before = None if in_place else _holdings(graph)
        try:
            result = p(graph)
        except ModelRaised:  # the user's forward raised where a pass ran it: not this pass's doing
            raise
        except UserError as err:
            raise UserError(f"{name}: {err}") from err
        except Exception as err:  # a bug: keep the traceback, but say which pass it was in
            add_note(err, f"bngraph: raised in pass {name!r} (after {list(results) or 'none'})")
            raise
        _check_contract(name, in_place, graph, result.graph, before)
        results[name] = result
        graph = result.graph
    return graph, results
