"""Arguments and steps that several commands share."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI builds its parser without torch: heavy imports wait for run()
    from bngraph.load import LoadedModel
    from bngraph.report import Report


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="zoo:NAME, file.py[:Symbol], or an artifact folder")
    parser.add_argument("--weights", metavar="FILE", help="load this state dict first")
    add_input_arguments(parser)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """--input-shape, --input-dtype, --static-input: the example inputs (see `bngraph.spec`)."""
    parser.add_argument(
        "--input-shape",
        metavar="SHAPE",
        help="example input, batch first: 2,3,32,32 (several inputs: 2,8;2,4); "
        "default: what the model declares",
    )
    parser.add_argument(
        "--input-dtype",
        metavar="DTYPES",
        help="one dtype per input, as the shapes: float32;int64 (default float32; random integers "
        "are 0 or 1, valid token ids for any vocabulary)",
    )
    parser.add_argument(
        "--static-input",
        metavar="INDEX",
        type=int,
        action="append",
        default=[],
        help="input INDEX (0-based) has no batch axis (a mask, a per-feature table): checks at "
        "other batch sizes keep its shape; repeatable",
    )


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    from bngraph.load import load_model

    return load_model(
        args.model,
        weights=args.weights,
        input_shape=args.input_shape,
        input_dtype=getattr(args, "input_dtype", None),
        static_inputs=getattr(args, "static_input", None) or (),
    )


def emit(report: Report, args: argparse.Namespace) -> None:
    """The table on stdout, or JSON on stdout and the table on stderr."""
    if getattr(args, "json", False):
        report.print_json(sys.stdout)
        report.print_table(sys.stderr)
    else:
        report.print_table(sys.stdout)


def add_force_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--force", action="store_true",
        help=f"replace an existing {what} at -o that bngraph wrote (nothing else is ever replaced)",
    )  # fmt: skip


def input_paths(args: argparse.Namespace) -> list:
    """What a command reads (model file or folder, weights, data): its -o may not be, hold or sit
    inside one of them."""
    from bngraph.spec import parse_model_spec

    model = getattr(args, "model", None)
    # A wrong model spec is said first: it is the first thing wrong with the command line.
    path = parse_model_spec(model).path if model else None
    return [p for p in (path, getattr(args, "weights", None), getattr(args, "data", None)) if p]
