"""The README's table of real ONNX files: BatchNormalization left and max error, per tool.

    .venv/bin/python benchmarks/real_onnx.py [--json]

The files are those of tests/real/onnx_files.py, shipped inside PyPI packages (the `real` extra;
a file whose package is missing gets a row saying so). Each goes through bngraph (default:
BNs with no exact fold kept for onnxruntime; and `mul-add`) and every other tool installed (the
`bench` extra). Error: the largest |difference| over every output divided by the largest
|output|, onnxruntime at ORT_DISABLE_ALL, on text-like images at batches 1 and 2. A cell is
"BNs left / error", or the tool's one-line error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/real/onnx_files.py

from timing import one_line  # noqa: E402  (benchmarks/timing.py)


def main(argv: list[str] | None = None) -> int:
    import onnx

    from bngraph.report import Report
    from tests.real.onnx_files import FILES, TOOLS, available, compare, count_bn, fold_with, locate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    tools = [t for t in TOOLS if available(t)]
    rows = []
    for entry in FILES:
        path = locate(entry)
        row = {"file": entry.path.rsplit("/", 1)[-1], "package": entry.package}
        if path is None:
            rows.append({**row, "BN before": f"not installed ({entry.package})"})
            continue
        model = onnx.load(str(path))
        row["BN before"] = count_bn(model)
        for tool in tools:
            print(f"{row['file']}: {tool} ...", file=sys.stderr, flush=True)
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # onnxsim and onnxslim print tables
                    result = fold_with(tool, model)
                _, rel = compare(model, result, entry.shapes)
                row[tool] = f"{count_bn(result)} / {rel:.1e}"
            except Exception as err:
                row[tool] = f"error: {one_line(err)}"
        rows.append(row)
    facts = {"error": "max |difference| / max |output|, onnxruntime ORT_DISABLE_ALL, batches 1 and 2"}
    report = Report("real ONNX files: BatchNormalization left / max relative error", sections={"files": rows}, facts=facts)
    report.print_json() if args.json else report.print_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
