"""The README's table of real models: insert, train one step, fold, export, verify on each.

    python benchmarks/real_models.py [NAME ...]     (needs the `real` extra: make test-real)

For each model of tests/real/real_models.py (small configs, random weights): how insert traced
it, the nonlinearities that running the model shows and how many of those already have a
normalized input (counted independently of insert's report), the BatchNorms insert added, and
each later step's outcome or its one-line refusal. Below the table: each fold that passed its
check by the model's own float32 rounding (`bngraph.equivalence`), with the report's figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.real.real_models import MODELS, installed, run_chain  # noqa: E402

COLUMNS = ("model", "traced by", "nonlinearities", "already normalized", "BNs inserted", "fold", "export + verify")


def main(names: list[str]) -> int:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    by_rounding = []
    for name in names or list(MODELS):
        if not installed(name):
            print(f"| {name} | ({MODELS[name].package} not installed) |" + " |" * (len(COLUMNS) - 2))
            continue
        row = run_chain(name)
        # A refusal's first clause: the exporter's log it names is a temporary file of this run.
        export = f"ok, {row.verify}" if row.export == "ok" else row.export.split(" (the exporter's full log")[0]
        cells = (name, row.tracing, row.nonlinearities, row.normalized, row.inserted, row.fold, export)
        print("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |", flush=True)
        by_rounding += [f"{name}: {note}" for note in row.fold_notes if "float32 rounding" in note]
    for line in by_rounding:
        print(f"\n{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
