"""Draw a model's graph, with the BatchNorms bngraph inserted, folded or left highlighted.

The output's suffix picks the format: .svg or .png (matplotlib) or .dot (Graphviz text).
Boxes carry the module paths of the model (`b1.conv1`). Marks come from the artifact's history:
green for BatchNorms that `insert` added, blue for layers that `fold` merged a BatchNorm into
(naming it), orange for BatchNorms turned into a multiply-add, red for BatchNorms still in the
graph; the legend counts them as the reports did. SVG and PNG are laid out by Graphviz `dot`
where it is installed, else by bngraph's own layered layout (skip connections in their own lane,
deep graphs wrapped into columns).

Example:
  bngraph graph out/ -o graph.svg
"""

from __future__ import annotations

import argparse

from bngraph.atomic import PICTURE
from bngraph.commands import args as shared


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="graph.svg, graph.png or graph.dot")
    shared.add_force_argument(parser, "picture (it carries bngraph's mark)")
    shared.add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    shared.check_output_first(args, PICTURE)
    from bngraph.draw import draw_model  # torch: only once the command runs

    _, report = draw_model(shared.load_from_args(args), args.output, force=args.force)
    shared.emit(report, args)
    return 0
