"""Where each box of `bngraph graph`'s picture goes: a layered (Sugiyama-style) layout.

Layers by longest path from the inputs; an edge that spans several layers gets a dummy point
per layer, so a skip connection runs in its own lane beside the chain instead of behind it;
orders by barycenters, sweeping down and up; coordinates pulled towards the neighbours' mean. A
deep graph wraps into side-by-side columns, kept near a page's aspect.

    layout = layered_layout(graph)   # graph: `bngraph.draw.graph_of`'s networkx graph
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import networkx as nx

ROW_IN = 0.55  # inches per layer: two lines of 6 pt text and an edge


@dataclass
class Layout:
    """Where everything goes: `points[n]` is (x, y) for each node and dummy point (y grows
    downwards, one unit per layer); `paths[(u, v)]` the points an edge passes through, its
    end points included; `column[n]` which wrapped column a point is in, `spans[c]` the x range
    of column c and `rows` the layers in the tallest column."""

    points: dict[str, tuple[float, float]]
    paths: dict[tuple[str, str], list[str]]
    column: dict[str, int]
    spans: list[tuple[float, float]]
    rows: int
    lane_in: float  # inches per lane: the widest label fits


def layers(graph: nx.DiGraph) -> dict[str, int]:
    layer = {}
    for n in nx.topological_sort(graph):
        layer[n] = max((layer[p] + 1 for p in graph.predecessors(n)), default=0)
    return layer


def _order(rows: list[list[str]], up: dict[str, list[str]], down: dict[str, list[str]], sweeps: int = 4) -> None:
    """Barycenter ordering, in place: each row sorted by its neighbours' mean position in the
    row above (sweeping down), then in the row below (sweeping up)."""
    for _ in range(sweeps):
        for i, neighbours, beside in [*((i, up, i - 1) for i in range(1, len(rows))),
                                      *((i, down, i + 1) for i in range(len(rows) - 2, -1, -1))]:
            rank = {n: k for k, n in enumerate(rows[beside])}
            here = {n: k for k, n in enumerate(rows[i])}
            rows[i].sort(key=lambda n: _mean([rank[m] for m in neighbours[n] if m in rank], here[n]))


def _mean(values: list[float], default: float) -> float:
    return sum(values) / len(values) if values else default


def _place(graph: nx.DiGraph, rows: list[list[str]], up: dict[str, list[str]], down: dict[str, list[str]],
           sweeps: int = 4) -> dict[str, float]:
    """x per point: the row's order kept, one unit apart at least, each pulled towards the mean
    x of its neighbours so that a chain runs straight."""
    x = {n: k - (len(row) - 1) / 2 for row in rows for k, n in enumerate(row)}
    real = set(graph)

    def pulled_by(n: str, downward: bool) -> list[str]:
        # An op lines up with the ops next to it, not with a skip lane passing by: the chain
        # stays straight and the lane runs beside it.
        neighbours = up[n] if downward else down[n]
        ops = [m for m in neighbours if m in real]
        return ops if n in real and ops else neighbours

    for sweep in range(sweeps * 2):
        downward = sweep % 2 == 0
        for row in rows if downward else rows[::-1]:
            want = [_mean([x[m] for m in pulled_by(n, downward)], x[n]) for n in row]
            placed = []
            for w in want:
                placed.append(w if not placed else max(w, placed[-1] + 1))
            # Centre the row on its ops' wishes (on the lanes' where it has no op).
            pairs = [(w, p) for n, w, p in zip(row, want, placed) if n in real] or list(zip(want, placed))
            shift = sum(w - p for w, p in pairs) / len(pairs)
            for n, p in zip(row, placed):
                x[n] = p + shift
    return x


def _lane_in(graph: nx.DiGraph) -> float:
    """Inches per lane: the longest label line at 6 pt, and a margin."""
    longest = max((len(line) for _, d in graph.nodes(data=True) for line in d["label"].splitlines()), default=8)
    return max(1.0, 0.048 * longest + 0.3)


def layered_layout(graph: nx.DiGraph, aspect: float = 1.4) -> Layout:
    """The layered layout of `graph`, wrapped into columns so that the picture's height/width
    is near `aspect`; columns break where the fewest edges cross."""
    layer = layers(graph)
    up: dict[str, list[str]] = defaultdict(list)
    down: dict[str, list[str]] = defaultdict(list)
    paths = {}
    for u, v in graph.edges:
        chain = [u, *(f"{u}->{v}#{k}" for k in range(layer[u] + 1, layer[v])), v]
        for k, point in enumerate(chain[1:-1], start=layer[u] + 1):
            layer[point] = k
        for a, b in zip(chain, chain[1:]):
            down[a].append(b)
            up[b].append(a)
        paths[(u, v)] = chain
    depth = max(layer.values(), default=-1) + 1
    rows: list[list[str]] = [[] for _ in range(depth)]
    for n in [*nx.topological_sort(graph), *(p for path in paths.values() for p in path[1:-1])]:
        rows[layer[n]].append(n)
    _order(rows, up, down)
    x = _place(graph, rows, up, down)
    lane_in = _lane_in(graph)
    starts = _column_starts(rows, x, aspect, lane_in)
    first_row = [max(s for s in starts if s <= i) for i in range(depth)]
    column = {n: starts.index(first_row[layer[n]]) for n in layer}
    points, spans, left = {}, [], 0.0
    for c in range(len(starts)):
        members = [n for n in layer if column[n] == c]
        low, high = min(x[n] for n in members), max(x[n] for n in members)
        for n in members:
            points[n] = (left + x[n] - low, float(layer[n] - starts[c]))
        spans.append((left, left + high - low))
        left += high - low + 2.0  # a gap of two lanes: the wrapped edges climb through it
    tallest = max(b - a for a, b in zip(starts, [*starts[1:], depth])) if depth else 1
    return Layout(points, paths, column, spans, tallest, lane_in)


def _column_starts(rows: list[list[str]], x: dict[str, float], aspect: float, lane_in: float) -> list[int]:
    """The first layer of each column: as many columns as bring height/width nearest `aspect`,
    each break moved (by up to a quarter column) to where the fewest edges cross it."""
    depth = len(rows)
    if depth == 0:
        return [0]
    lanes = max(x.values()) - min(x.values()) + 1
    count, best_error = 1, math.inf
    for columns in range(1, depth + 1):
        height = math.ceil(depth / columns) * ROW_IN
        if height < 12 * ROW_IN and columns > 1:
            break
        error = abs(math.log(height / (columns * (lanes + 2) * lane_in) / aspect))
        if error < best_error:
            count, best_error = columns, error
    per_column = math.ceil(depth / count)
    starts = [0]
    for k in range(1, count):
        target = k * per_column
        window = range(max(starts[-1] + 1, target - per_column // 4), min(depth - 1, target + per_column // 4) + 1)
        if window:
            starts.append(min(window, key=lambda i: (len(rows[i]), abs(i - target))))  # a narrow row
    return starts
