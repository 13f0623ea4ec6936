"""One report, two renderings: a table for people, JSON for CI. Renderers compute nothing."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table


@dataclass
class Report:
    title: str
    sections: dict[str, list[dict]] = field(default_factory=dict)  # e.g. "inserted", "skipped"
    facts: dict[str, Any] = field(default_factory=dict)  # scalars: counts, paths, verdicts
    notes: list[str] = field(default_factory=list)  # sentences for people, also kept in JSON
    # Each pass's PassResult by name, for an artifact's history; not rendered.
    passes: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {**self.facts, **self.sections, "notes": list(self.notes)}

    def print_json(self, stream: TextIO | None = None) -> None:
        json.dump(self.to_json(), stream or sys.stdout, indent=2, default=str)
        (stream or sys.stdout).write("\n")

    def print_table(self, stream: TextIO | None = None) -> None:
        stream = stream or sys.stdout
        # Wide enough for node paths when piped to a file or CI log; the terminal's own width otherwise.
        console = Console(file=stream, width=None if stream.isatty() else 160, highlight=False)
        console.print(f"[bold]{self.title}[/bold]")
        for key, value in self.facts.items():
            console.print(f"  {key}: {value}")
        for name, rows in self.sections.items():
            if not rows:
                console.print(f"  {name}: none")
                continue
            table = Table(title=f"{name} ({len(rows)})", title_justify="left", box=None, pad_edge=False)
            columns = list(dict.fromkeys(k for row in rows for k in row))
            for column in columns:
                table.add_column(column)
            for row in rows:
                table.add_row(*(_cell(row.get(c, "")) for c in columns))
            console.print(table)
        for note in self.notes:
            console.print(f"  note: {note}")


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
