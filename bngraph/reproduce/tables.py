"""What both experiments' summaries share: the step a curve first reaches a target, a table cell."""

from __future__ import annotations

from collections.abc import Sequence


def first_step_reaching(steps: Sequence[int], curve: Sequence[float], target: float) -> int | None:
    hits = [s for s, a in zip(steps, curve) if a >= target - 1e-12]
    return hits[0] if hits else None


def cell(value, spec=".2f") -> str:
    """A markdown table cell: `value` formatted, or "-" for a value that does not exist."""
    return "-" if value is None else format(value, spec)
