"""Draw a model's graph, with the BatchNorms bngraph inserted, folded or left highlighted.

The output's suffix picks the format: .svg or .png (matplotlib) or .dot (Graphviz text).
Marks come from the artifact's history: green for BatchNorms that `insert` added, blue for layers
that `fold` merged a BatchNorm into, red for BatchNorms still in the graph.

Example:
  bngraph graph out/ -o graph.svg
"""

from __future__ import annotations

import argparse

from bngraph.atomic import check_writable
from bngraph.commands.common import add_model_arguments, add_report_arguments, emit, load_from_args
from bngraph.draw import MARKS, draw_graph, graph_of, marks_from_history
from bngraph.report import Report
from bngraph.trace import trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="graph.svg, graph.png or graph.dot")
    add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_writable(args.output)
    loaded = load_from_args(args)
    gm = trace(loaded.module, loaded.example_inputs() if loaded.input_shapes else None)
    inserted, folded = marks_from_history(loaded.history)
    graph = graph_of(gm, inserted, folded)
    draw_graph(graph, args.output)
    counts = {mark: sum(1 for _, d in graph.nodes(data=True) if d["mark"] == mark) for mark in MARKS if mark}
    emit(Report(f"bngraph graph {args.model}", facts={"output": args.output, "nodes": graph.number_of_nodes(), **counts}), args)
    return 0
