"""List the model zoo: names, parameter counts and example input shapes.

Any name works as a model spec: `bngraph insert zoo:inception -o out`.
"""

from __future__ import annotations

import argparse

from bngraph.commands import args as shared
from bngraph.report import Report
from bngraph.zoo import describe_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="glob over names (default: all)")
    shared.add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    shared.emit(Report("bngraph zoo", sections={"models": describe_models(args.pattern)}), args)
    return 0
