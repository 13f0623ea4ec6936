"""Draw a traced model's graph so that one look shows where each BatchNorm went.

Each op is a box labelled with the module path the user wrote (`b1.conv1  Conv2d`), coloured by
what bngraph did there: a BatchNorm it inserted, a layer a BatchNorm was folded into (the box
names the BatchNorms it absorbed), a BatchNorm turned into a multiply-add, a BatchNorm left.
The legend's counts are the report's: they come from the artifact's history (`insert` and the
last `fold`), not from re-counting the picture.

Layout: Graphviz `dot` renders SVG and PNG where it is installed, for graphs up to 40 layers deep
(it cannot wrap a deeper one, which would come out as a strip). Otherwise bngraph's own layered
layout (`bngraph.layout`), drawn with matplotlib.

    graph, report = draw_model(loaded, "graph.svg")   # what `bngraph graph` runs
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from torch import fx

from bngraph.atomic import PICTURE, write_atomically
from bngraph.errors import UserError
from bngraph.layout import ROW_IN, layered_layout, layers
from bngraph.load import LoadedModel
from bngraph.passes._fx_batchnorm import is_batch_norm
from bngraph.passes._fx_effects import is_guard
from bngraph.passes._op_kinds import op_label
from bngraph.report import Report
from bngraph.trace import faithful_trace

# What each mark means, and its colour in every format.
MARKS = {
    "inserted": ("#2ca02c", "BatchNorm inserted by bngraph"),
    "folded": ("#1f77b4", "layer a BatchNorm was folded into"),
    "multiply_add": ("#ff7f0e", "BatchNorm turned into a multiply-add"),
    "left": ("#d62728", "BatchNorm still in the graph"),
    "io": ("#ffffff", "model input or output"),
    None: ("#e6e6e6", "other op"),
}
_LONGEST_LABEL = 30  # characters of a module path shown; the tail is the specific part
_GRAPHVIZ_MAX_LAYERS = 40  # deeper graphs get the built-in layout, which wraps into columns
_SCALE_SUFFIX = "_scale"  # replace_bn_with_multiply_add names its buffers f"{bn}_scale"


@dataclass
class Marks:
    """What the history says bngraph did: the BatchNorms `insert` added (module paths), the BNs
    the last `fold` merged into each layer, and the BNs it turned into multiply-adds."""

    inserted: set[str] = field(default_factory=set)
    folded_into: dict[str, list[str]] = field(default_factory=dict)  # layer -> BN node names
    multiply_add: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The report's numbers, as the legend and the command's report show them."""
        return {
            "inserted": len(self.inserted),
            "folded": sum(len(bns) for bns in self.folded_into.values()),
            "folded_into_layers": len(self.folded_into),
            "multiply_add": len(self.multiply_add),
        }


def marks_from_history(history: list[dict]) -> Marks:
    """The marks an artifact's history gives: the BatchNorms every insert put in (`bngraph insert`,
    or a `train --recipe` that inserts), the last fold's rows."""
    marks = Marks()
    folds = [entry for entry in history if entry.get("command") == "fold"]
    for entry in history:
        inserted = {"insert": entry.get("report", {}), "recipe": entry.get("insert") or {}}.get(entry.get("command"), {})
        marks.inserted |= {row["bn"] for row in inserted.get("inserted", []) if "bn" in row}
    if folds:
        for row in folds[-1].get("report", {}).get("folded", []):
            if row.get("how") == "multiply-add":
                marks.multiply_add.append(str(row["node"]))
            elif row.get("into") is not None:
                marks.folded_into.setdefault(str(row["into"]), []).append(str(row["node"]))
    return marks


def _short(path: str) -> str:
    """A long module path without its leading parts: `….mixed_3a.branch3x3.0.conv`."""
    parts = path.split(".")
    while len(".".join(parts)) > _LONGEST_LABEL - 2 and len(parts) > 1:
        parts = parts[1:]
    short = path if len(parts) == len(path.split(".")) else "…" + ".".join(parts)
    return short if len(short) <= _LONGEST_LABEL else "…" + short[-(_LONGEST_LABEL - 1) :]


def _multiply_add_of(node: fx.Node) -> str | None:
    """The BatchNorm a `torch.addcmul(shift, x, scale)` stands for, when a fold made it."""
    if node.op != "call_function" or node.target is not torch.addcmul or len(node.args) != 3:
        return None
    scale = node.args[2]
    if isinstance(scale, fx.Node) and scale.op == "get_attr" and str(scale.target).endswith(_SCALE_SUFFIX):
        return str(scale.target)[: -len(_SCALE_SUFFIX)]
    return None


def graph_of(gm: fx.GraphModule, marks: Marks | None = None) -> nx.DiGraph:
    """The data-flow graph of `gm`: one node per op (constants left out), with its label, mark
    and the module path a user would recognise. `graph.graph["counts"]` holds the marks' counts:
    the history's for what bngraph did, the graph's own for the BatchNorms still in it."""
    marks = marks or Marks()
    graph = nx.DiGraph()
    modules = dict(gm.named_modules())
    left = left_inserted = 0  # every BatchNorm the graph still holds; those of them bngraph inserted
    for node in gm.graph.nodes:
        if node.op == "get_attr" or is_guard(node):
            continue  # weights, the multiply-adds' constants and dtype checks: not data flow
        op = op_label(gm, node)
        name = str(node.target) if node.op == "call_module" else node.name
        detail = op
        if node.op in ("placeholder", "output"):
            mark, name, detail = "io", ("input " + node.name if node.op == "placeholder" else "output"), ""
        elif node.op == "call_module" and node.target in marks.inserted:
            mark, left, left_inserted = "inserted", left + 1, left_inserted + 1
        elif is_batch_norm(node, modules):
            mark, left = "left", left + 1
        elif (bn := _multiply_add_of(node)) is not None:
            mark, name, detail = "multiply_add", bn, "multiply-add (was BatchNorm)"
        elif name in marks.folded_into or node.name in marks.folded_into:
            mark = "folded"
            absorbed = marks.folded_into.get(name) or marks.folded_into[node.name]
            names = ", ".join(absorbed)
            # Which BN went where, where the name fits; the count where it does not.
            many = f"{len(absorbed)} BatchNorms" if len(absorbed) > 1 else "BatchNorm"
            detail = f"{op} + {names if len(op) + len(names) + 3 <= _LONGEST_LABEL else many}"
        else:
            mark = None
        said = not detail or re.sub(r"_\d+$", "", name) == detail.strip(".()")  # `add_1` is an add
        label = _short(name) if said else f"{_short(name)}\n{_short(detail)}"
        graph.add_node(node.name, label=label, mark=mark, module=name)
        for source in node.all_input_nodes:
            if source.op != "get_attr":
                graph.add_edge(source.name, node.name)
    graph.graph["counts"] = {**marks.counts(), "left": left, "left_inserted": left_inserted}
    return graph


def _draw(graph: nx.DiGraph, path: Path) -> None:
    # Imported here: choosing matplotlib's backend is a side effect that importing bngraph.draw
    # must not have on a notebook's plots.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Patch

    matplotlib.rcParams["svg.fonttype"] = "none"  # labels stay text in an SVG: searchable, small
    layout = layered_layout(graph)
    entries = legend_entries(graph)
    xs = [p[0] for p in layout.points.values()] or [0.0]
    legend_in = 0.15 + 0.17 * len(entries)  # the legend sits above the graph
    width_in = max((max(xs) - min(xs) + 1) * layout.lane_in, 4.5)
    graph_in = max((layout.rows + 0.6) * ROW_IN, 1.0)
    fig = plt.figure(figsize=(width_in, graph_in + legend_in))
    ax = fig.add_axes((0, 0, 1, graph_in / (graph_in + legend_in)))
    middle, half = (min(xs) + max(xs)) / 2, width_in / layout.lane_in / 2
    ax.set_xlim(middle - half, middle + half)
    top, bottom = -0.6, layout.rows - 0.3
    ax.set_ylim(bottom + 0.2, top - 0.2)  # inputs at the top
    ax.set_axis_off()
    for (u, v), chain in layout.paths.items():
        skip = len(chain) > 2  # spans several layers: a skip connection or a long branch
        style = dict(color="#7b4fa0" if skip else "#808080", lw=0.9 if skip else 0.6)
        for a, b in zip(chain, chain[1:]):
            (xa, ya), (xb, yb) = layout.points[a], layout.points[b]
            head = "-|>" if b == v else "-"
            if layout.column[a] != layout.column[b]:
                # Wrapped: down out of this column, up through the gap, into the next one's head.
                gap = layout.spans[layout.column[b]][0] - 1.0
                ax.plot([xa, xa, gap, gap, xb], [ya, bottom, bottom, top, top], ls=(0, (3, 2)), zorder=1, **style)
                xa, ya = xb, top
            ax.add_patch(FancyArrowPatch((xa, ya), (xb, yb), arrowstyle=head, mutation_scale=6, zorder=1,
                                         shrinkA=9 if a in graph and ya != top else 0,
                                         shrinkB=9 if b == v else 0, **style))
    for n, data in graph.nodes(data=True):
        px, py = layout.points[n]
        ax.text(px, py, data["label"], ha="center", va="center", fontsize=6, zorder=2, linespacing=1.1,
                bbox=dict(boxstyle="round,pad=0.3", fc=MARKS[data["mark"]][0], ec="#333333", lw=0.4))
    handles = [Patch(facecolor=MARKS[mark][0], edgecolor="#333333", label=text) for mark, text in entries]
    fig.legend(handles=handles, loc="upper left", fontsize=7, frameon=False, borderaxespad=0.3)
    fig.savefig(path, format=path.suffix[1:], dpi=150)
    plt.close(fig)


def legend_entries(graph: nx.DiGraph) -> list[tuple[str | None, str]]:
    """(mark, text) per legend line, with the report's counts; marks absent from both the
    history and the picture are left out."""
    counts = graph.graph.get("counts", {})
    present = {d["mark"] for _, d in graph.nodes(data=True)}
    entries = []
    if counts.get("inserted") or "inserted" in present:
        entries.append(("inserted", f"{MARKS['inserted'][1]}: {counts.get('inserted', 0)}"))
    if counts.get("folded") or "folded" in present:
        layers = counts.get("folded_into_layers", 0)
        entries.append(("folded", f"{MARKS['folded'][1]}: {counts.get('folded', 0)} BatchNorms into {layers} layers"))
    if counts.get("multiply_add") or "multiply_add" in present:
        entries.append(("multiply_add", f"{MARKS['multiply_add'][1]}: {counts.get('multiply_add', 0)}"))
    inserted_left = counts.get("left_inserted", 0)
    of_them = f" ({inserted_left} of them inserted, in green)" if inserted_left else ""
    entries.append(("left", f"{MARKS['left'][1]}: {counts.get('left', 0)}{of_them}"))
    entries.append((None, MARKS[None][1]))
    return entries


# --- DOT, and Graphviz where it is installed ---------------------------------------------------


def _dot(graph: nx.DiGraph) -> str:
    lines = [
        "digraph bngraph {",
        '  graph [rankdir=TB, nodesep=0.25, ranksep=0.3, fontname="Helvetica"];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9];',
        '  edge [color="#808080", arrowsize=0.5];',
    ]
    for name, data in graph.nodes(data=True):
        label = data["label"].replace('"', "'").replace("\n", "\\n")
        lines.append(f'  "{name}" [label="{label}", fillcolor="{MARKS[data["mark"]][0]}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges]
    rows = "".join(
        f'<TR><TD BGCOLOR="{MARKS[mark][0]}" WIDTH="14"> </TD><TD ALIGN="LEFT">{_html(text)}</TD></TR>'
        for mark, text in legend_entries(graph)
    )
    lines.append(f'  bngraph__legend [shape=plaintext, style="", label=<<TABLE BORDER="0" CELLSPACING="2">{rows}</TABLE>>];')
    return "\n".join([*lines, "}"]) + "\n"


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _graphviz(graph: nx.DiGraph, path: Path) -> bool:
    """Render with Graphviz `dot` when it is installed; False when it is not."""
    dot = shutil.which("dot")
    if dot is None:
        return False
    done = subprocess.run([dot, f"-T{path.suffix[1:]}", "-o", str(path)], input=_dot(graph), text=True,
                          capture_output=True, timeout=300)
    if done.returncode != 0:
        raise UserError(f"Graphviz dot could not draw the graph: {done.stderr.strip().splitlines()[-1:]}")
    return True


def draw_graph(graph: nx.DiGraph, path: str | Path, *, force: bool = False, graphviz: bool = True) -> Path:
    """Write `graph` to `path`; the suffix (.svg, .png, .dot) picks the format. SVG and PNG come
    from Graphviz `dot` where it is installed (and `graphviz`) and the graph is at most
    _GRAPHVIZ_MAX_LAYERS deep, else from the built-in layout.

    The picture carries bngraph's mark (bngraph.atomic): `force` replaces only a marked one."""
    path = Path(path)
    if path.suffix not in (".svg", ".png", ".dot"):
        raise UserError(f"cannot draw to {path}: use a .svg, .png or .dot file name")
    if path.suffix == ".dot":
        return write_atomically(path, lambda tmp: tmp.write_text(_dot(graph), encoding="utf-8"), kind=PICTURE, force=force)

    # dot draws one long column, so a deep graph (Inception) would be a strip: ours wraps it.
    graphviz = graphviz and max(layers(graph).values(), default=0) < _GRAPHVIZ_MAX_LAYERS

    def write(tmp: Path) -> None:
        if not (graphviz and _graphviz(graph, tmp)):
            _draw(graph, tmp)

    return write_atomically(path, write, kind=PICTURE, force=force)


def draw_model(loaded: LoadedModel, output: str | Path, *, force: bool = False) -> tuple[nx.DiGraph, Report]:
    """`bngraph graph`: the loaded model traced, marked from its artifact history, drawn to
    `output`; the report carries the legend's counts, so the report and the picture agree."""
    gm = faithful_trace(loaded.module, loaded.example_inputs() if loaded.input_shapes else None)
    graph = graph_of(gm, marks_from_history(loaded.history))
    draw_graph(graph, output, force=force)
    facts = {"output": str(output), "nodes": graph.number_of_nodes(), **graph.graph["counts"]}
    return graph, Report(f"bngraph graph {loaded.spec.text}", facts=facts)
