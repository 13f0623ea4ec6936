"""Arguments and steps that several commands share."""

from __future__ import annotations

import argparse
import sys

from bngraph.load import LoadedModel, load_model
from bngraph.report import Report


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="zoo:NAME, file.py[:Symbol], or an artifact folder")
    parser.add_argument("--weights", metavar="FILE", help="load this state dict first")
    parser.add_argument(
        "--input-shape",
        metavar="SHAPE",
        help="example input, batch first: 2,3,32,32 (several inputs: 2,8;2,4); "
        "default: what the model declares",
    )


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    return load_model(args.model, weights=args.weights, input_shape=args.input_shape)


def emit(report: Report, args: argparse.Namespace) -> None:
    """The table on stdout, or JSON on stdout and the table on stderr."""
    if getattr(args, "json", False):
        report.print_json(sys.stdout)
        report.print_table(sys.stderr)
    else:
        report.print_table(sys.stdout)
