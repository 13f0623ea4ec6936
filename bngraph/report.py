"""One report, two renderings: a table for people, JSON for CI. Renderers compute nothing."""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bngraph.errors import printable


@dataclass
class Report:
    """One command's result: a title, tables (`sections`), scalar facts and notes, rendered as a
    table (`print_table`) or JSON (`to_json`, `print_json`) from the same data."""

    title: str
    sections: dict[str, list[dict]] = field(default_factory=dict)  # e.g. "inserted", "skipped"
    facts: dict[str, Any] = field(default_factory=dict)  # scalars: counts, paths, verdicts
    notes: list[str] = field(default_factory=list)  # sentences for people, also kept in JSON
    # Each pass's PassResult by name, for an artifact's history; not rendered.
    passes: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        """The facts, sections and notes as JSON values: numbers stay numbers, floats keep the
        digits they mean (see `json_value`), and a float that is not finite becomes null."""
        # One namespace in JSON: a section named as a fact replaced it (a recipe run's JSON lost
        # which recipe ran under the list of what it changed).
        assert not self.facts.keys() & self.sections.keys(), f"bngraph bug: {self.facts.keys() & self.sections.keys()}"
        return json_value({**self.facts, **self.sections, "notes": list(self.notes)})

    def print_json(self, stream: TextIO | None = None) -> None:
        stream = stream or sys.stdout
        json.dump(self.to_json(), stream, indent=2, allow_nan=False)
        stream.write("\n")
        stream.flush()  # whole before the table that may follow on stderr

    def print_table(self, stream: TextIO | None = None) -> None:
        stream = stream or sys.stdout
        # Wide enough for node paths when piped to a file or CI log; the terminal's own width otherwise.
        console = Console(file=stream, width=None if stream.isatty() else 160, highlight=False)
        console.print(f"[bold]{self.title}[/bold]")
        for key, value in self.facts.items():
            console.print(f"  {key}: {_text(_cell(value))}")
        for name, rows in self.sections.items():
            if not rows:
                console.print(f"  {name}: none")
                continue
            table = Table(title=f"{name} ({len(rows)})", title_justify="left", box=None, pad_edge=False)
            columns = list(dict.fromkeys(k for row in rows for k in row))
            for column in columns:
                table.add_column(column, overflow="fold")  # a narrow terminal wraps a number, never cuts it to "…"
            for row in rows:
                table.add_row(*(_text(_cell(row.get(c, ""))) for c in columns))
            console.print(table)
        for note in self.notes:
            console.print(f"  note: {_text(str(note))}")


def _text(text: str) -> str:
    """`text` as one printed line: `[...]` in a reason is text, not rich markup, and a control
    character (a newline in a class folder's name) is written as its escape."""
    return escape(printable(text))


# Differences and errors mean their order of magnitude and a few digits; anything else (a loss,
# an accuracy, a learning rate) keeps 6, which drops float32 noise such as 0.11349999904632568.
_ERROR_KEY = re.compile(r"(^|_)(abs|rel|err|error|errors|diff|change|ratio|excess)(_|$)")
ERROR_DIGITS, FLOAT_DIGITS = 4, 6


def json_value(value: Any, key: str = "") -> Any:
    """`value` made JSON: dicts, lists and tuples recursively; numpy and 0-d torch numbers as
    Python numbers; floats to ERROR_DIGITS significant digits under an error-like key, else
    FLOAT_DIGITS; NaN and infinities as null; paths and anything else as their text."""
    if isinstance(value, dict):
        return {str(k): json_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v, key) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", getattr(value, "dim", lambda: 1)) in (0, ()):
        value = value.item()  # numpy scalar or 0-d tensor
    elif hasattr(value, "tolist") and not isinstance(value, (int, float)):
        return json_value(value.tolist(), key)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        digits = ERROR_DIGITS if _ERROR_KEY.search(key) else FLOAT_DIGITS
        return float(f"{value:.{digits}g}")
    return str(value)


def _cell(value: Any) -> str:
    if value is None:  # JSON's null; Python's word means nothing to a reader
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return ",".join(map(str, value))  # a shape, as --input-shape writes it
    return str(value)
