"""List the model zoo: names, parameter counts and example input shapes.

Any name works as a model spec: `bngraph insert zoo:inception -o out`.
"""

from __future__ import annotations

import argparse

from bngraph.commands.common import add_report_arguments, emit
from bngraph.report import Report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="glob over names (default: all)")
    add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from bngraph.zoo import CATALOG, create_model, get_entry, list_models

    rows = []
    for name in list_models(args.pattern):
        if name in CATALOG:  # listed without torch (its numbers are checked against the models)
            shape, params, description = CATALOG[name].input_shape, CATALOG[name].parameters, CATALOG[name].description
        else:  # registered by other code: build it to count
            entry = get_entry(name)
            shape, description = entry.input_shape, entry.description
            params = sum(p.numel() for p in create_model(name).parameters())
        rows.append(
            {"name": name, "parameters": params, "input_shape": list(shape), "description": description}
        )
    emit(Report("bngraph zoo", sections={"models": rows}), args)
    return 0
