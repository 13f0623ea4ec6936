"""Draw a traced model's graph with the BatchNorms that bngraph inserted, folded or left marked.

networkx holds the graph and lays it out in layers (topological generations, top to bottom);
matplotlib draws SVG or PNG, and DOT is written as text for Graphviz users.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
from torch import fx

from bngraph.atomic import write_atomically
from bngraph.errors import UserError
from bngraph.passes.fx_batchnorm import is_batch_norm
from bngraph.passes.op_kinds import op_label

# What each mark means, and its colour in every format.
MARKS = {
    "inserted": ("#2ca02c", "BatchNorm inserted by bngraph"),
    "folded": ("#1f77b4", "layer a BatchNorm was folded into"),
    "left": ("#d62728", "BatchNorm still in the graph"),
    None: ("#dddddd", "other op"),
}


def graph_of(gm: fx.GraphModule, inserted: set[str] = frozenset(), folded: set[str] = frozenset()) -> nx.DiGraph:
    """The data-flow graph of `gm`: one node per op, with its label and mark."""
    graph = nx.DiGraph()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op == "call_module" and target in inserted:
            mark = "inserted"
        elif is_batch_norm(node, modules):
            mark = "left"
        elif node.op == "call_module" and target in folded:
            mark = "folded"
        else:
            mark = None
        graph.add_node(node.name, label=f"{node.name}\n{op_label(gm, node)}", mark=mark)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    for layer, names in enumerate(nx.topological_generations(graph)):
        for name in names:
            graph.nodes[name]["layer"] = layer
    return graph


def _dot(graph: nx.DiGraph) -> str:
    lines = ["digraph bngraph {", '  node [shape=box, style=filled, fontname="Helvetica"];']
    for name, data in graph.nodes(data=True):
        label = data["label"].replace('"', "'").replace("\n", "\\n")
        lines.append(f'  "{name}" [label="{label}", fillcolor="{MARKS[data["mark"]][0]}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges]
    return "\n".join([*lines, "}"]) + "\n"


def _draw(graph: nx.DiGraph, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers = max((d["layer"] for _, d in graph.nodes(data=True)), default=0) + 1
    widest = max((sum(1 for _, d in graph.nodes(data=True) if d["layer"] == i) for i in range(layers)), default=1)
    pos = nx.multipartite_layout(graph, subset_key="layer", align="horizontal", scale=1.0)
    pos = {n: (x, -y) for n, (x, y) in pos.items()}  # inputs at the top
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * widest), max(4, 0.55 * layers)))
    colours = [MARKS[d["mark"]][0] for _, d in graph.nodes(data=True)]
    nx.draw_networkx_edges(graph, pos, ax=ax, arrows=True, arrowsize=6, edge_color="#888888", width=0.6)
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colours, node_size=120, linewidths=0.3, edgecolors="black")
    labels = {n: d["label"].split("\n")[1] for n, d in graph.nodes(data=True)}
    nx.draw_networkx_labels(graph, pos, labels, ax=ax, font_size=5)
    handles = [Patch(color=c, label=text) for c, text in MARKS.values()]
    ax.legend(handles=handles, loc="upper left", fontsize=7, frameon=False)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, format=path.suffix[1:], dpi=150)
    plt.close(fig)


def draw_graph(graph: nx.DiGraph, path: str | Path) -> Path:
    """Write `graph` to `path`; the suffix (.svg, .png, .dot) picks the format."""
    path = Path(path)
    if path.suffix not in (".svg", ".png", ".dot"):
        raise UserError(f"cannot draw to {path}: use a .svg, .png or .dot file name")
    if path.suffix == ".dot":
        return write_atomically(path, lambda tmp: tmp.write_text(_dot(graph)))
    return write_atomically(path, lambda tmp: _draw(graph, tmp))


def marks_from_history(history: list[dict]) -> tuple[set[str], set[str]]:
    """The module paths of BatchNorms inserted, and of layers that absorbed one, per the history."""
    inserted, folded = set(), set()
    for entry in history:
        report = entry.get("report", {})
        if entry.get("command") == "insert":
            inserted |= {row["bn"] for row in report.get("inserted", []) if "bn" in row}
        if entry.get("command") == "fold":
            for row in report.get("folded", []):
                folded |= {str(v) for k, v in row.items() if k in ("into", "layer", "producer", "consumer")}
    return inserted, folded
