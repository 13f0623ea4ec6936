"""BN folding in ONNX files: bngraph against the other ONNX tools, pattern by pattern, side by side.

    .venv/bin/python benchmarks/onnx_fold.py [--patterns conv2d_bias,linear_2d] [--tools bngraph,onnxsim]
        [--rounds 11] [--batch 8] [--threads 1] [--ort-level ORT_ENABLE_ALL] [--json]

Each pattern is a small torch model with BatchNorm (BN statistics randomized, eval mode), exported
with torch.onnx.export(dynamo=True, optimize=False) and a dynamic batch axis, then run through:
  bngraph              bngraph.onnx_fold.fold_onnx (what `bngraph fold in.onnx -o out.onnx` writes):
                       a BN with no exact fold stays a BatchNormalization (the onnxruntime target)
  bngraph.mul-add      the same, such a BN as Mul + Add (`--standalone-bn mul-add`: no BN kernel)
  bngraph.dw-conv      the same, such a BN as a depthwise 1x1 Conv (group = C): a candidate form,
                       measured, not shipped
  onnxoptimizer        onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
  onnxsim              onnxsim.simplify(model)
  onnxslim             onnxslim.slim(model)
  onnxscript.rewrite   onnxscript.rewriter.rewrite(model), its default rule set
  onnxscript.optimize  onnxscript.optimizer.optimize(model)
  exporter             the same torch model exported with optimize=True
  ort.offline          onnxruntime's offline optimizer: SessionOptions.optimized_model_filepath at
                       ORT_ENABLE_EXTENDED
  ort.offline-all      the same at ORT_ENABLE_ALL (layout-specific NCHWc kernels for this CPU)
and measured for: BatchNormalization nodes left; the largest abs difference from the original
file, both run in onnxruntime at ORT_DISABLE_ALL (the graph as written) on random inputs at
batches 1 and 5; and onnxruntime latency at --ort-level as a ratio to the original's (interleaved
rounds, median of per-round ratios, in a child process: benchmarks/timing.py). Each tool runs in
a child process of its own, so a tool that crashes, even in C++, gets 'error: <one line>' in its
cells and the rest goes on.

Model definitions that the tests already have are imported from there (tests/passes/...); the
rest are here. `true fold` says whether an exact fold into a layer exists; where it does not, a
BN stays a fixed affine map in some form; the three bngraph rows compare those forms (for the
three standalone patterns alone: --patterns bn_before_conv_pad1,bn_after_max_pool,conv_output_shared).
Default sizes take a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/: model definitions, randomize_bn

from timing import median_ratio, one_line, run_child  # noqa: E402  (benchmarks/timing.py)

TIMING = Path(__file__).with_name("timing.py")
ERROR_BATCHES = (1, 5)


# ---- the patterns ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    name: str
    make: Callable  # () -> nn.Module; export_all seeds it and randomizes its BN statistics
    input_shape: tuple[int, ...]  # the example for the export; the batch axis stays dynamic
    true_fold: bool  # an exact fold into a neighbouring layer exists


def patterns() -> list[Pattern]:
    from torch import nn

    from tests.passes.test_onnx_copy_shared_weights import ConvAppliedTwice
    from tests.onnx_models import ConvOutputShared
    from tests.passes.test_onnx_fold_bn_into_preceding_layer import LinearOnSequence

    def seq(*layers):  # built when called: export_all seeds the weights first
        return lambda: nn.Sequential(*(make() for make in layers))

    conv_in = (2, 16, 24, 24)
    # fmt: off
    return [
        Pattern("conv2d_bias", seq(lambda: nn.Conv2d(16, 32, 3), lambda: nn.BatchNorm2d(32)), conv_in, True),
        Pattern("conv2d_no_bias", seq(lambda: nn.Conv2d(16, 32, 3, bias=False), lambda: nn.BatchNorm2d(32)), conv_in, True),
        Pattern("conv2d_eps_0.1", seq(lambda: nn.Conv2d(16, 32, 3, bias=False), lambda: nn.BatchNorm2d(32, eps=0.1)), conv_in, True),
        Pattern("grouped_conv", seq(lambda: nn.Conv2d(16, 32, 3, groups=4), lambda: nn.BatchNorm2d(32)), conv_in, True),
        Pattern("depthwise_conv", seq(lambda: nn.Conv2d(16, 16, 3, groups=16, bias=False), lambda: nn.BatchNorm2d(16)), conv_in, True),
        Pattern("conv1d", seq(lambda: nn.Conv1d(16, 32, 3), lambda: nn.BatchNorm1d(32)), (2, 16, 256), True),
        Pattern("conv3d", seq(lambda: nn.Conv3d(8, 16, 3), lambda: nn.BatchNorm3d(16)), (2, 8, 12, 12, 12), True),
        Pattern("conv_transpose", seq(lambda: nn.ConvTranspose2d(16, 32, 3), lambda: nn.BatchNorm2d(32)), (2, 16, 16, 16), True),
        Pattern("conv_transpose_groups_2", seq(lambda: nn.ConvTranspose2d(16, 32, 3, groups=2, bias=False), lambda: nn.BatchNorm2d(32)),
                (2, 16, 16, 16), True),
        Pattern("linear_2d", seq(lambda: nn.Linear(256, 256), lambda: nn.BatchNorm1d(256)), (2, 256), True),
        Pattern("linear_on_sequence", LinearOnSequence, (2, 256, 6), True),
        Pattern("bn_before_conv_pad0", seq(lambda: nn.BatchNorm2d(16), lambda: nn.Conv2d(16, 32, 3)), conv_in, True),
        # The padded border is 0 after the BN and would be 0 before it once folded: not exact.
        Pattern("bn_before_conv_pad1", seq(lambda: nn.BatchNorm2d(16), lambda: nn.Conv2d(16, 32, 3, padding=1)), conv_in, False),
        # max(s * x) = s * max(x) only for s > 0, and random BN scales have both signs.
        Pattern("bn_after_max_pool", seq(lambda: nn.Conv2d(16, 32, 3), lambda: nn.MaxPool2d(2), lambda: nn.BatchNorm2d(32)), conv_in, False),
        Pattern("conv_output_shared", lambda: ConvOutputShared(16, 32), conv_in, False),
        Pattern("conv_weight_shared", ConvAppliedTwice, (2, 4, 32, 32), True),
    ]
    # fmt: on


# ---- the tools: each reads in.onnx and writes out.onnx, in a child process -----------------------


def run_bngraph(src: Path, dst: Path, form: str = "batchnorm") -> dict:
    import onnx
    import onnx_ir as ir

    from bngraph.onnx_fold import fold_onnx

    model, report = fold_onnx(onnx.load(str(src)), standalone_bn="batchnorm" if form == "dw-conv" else form)
    if form == "dw-conv":
        to_depthwise_conv(model)
    ir.save(model, dst)
    kept = [f"{row['node']} kept" for row in report.sections["kept"]]
    return {"how": [row["how"] for row in report.sections["folded"]] + kept, "remaining": report.sections["remaining"]}


def to_depthwise_conv(model) -> None:
    """Each BN left on an (N, C, D...) input as Conv(x, scale as (C, 1, 1...), shift, group=C)."""
    import onnx_ir as ir

    from bngraph.passes._onnx_common import batchnorms, bn_scale_shift, fresh_name, rank, skip_reason

    graph = model.graph
    for bn in batchnorms(model):
        x, out = bn.inputs[0], bn.outputs[0]
        if skip_reason(bn) or (rank(x) or 0) < 3:
            continue
        scale, shift = bn_scale_shift(bn)
        if scale.ndim != 1:
            continue  # spatial=0: per position, no conv kernel holds it
        channels, ones = scale.shape[0], [1] * (rank(x) - 2)
        arrays = {"w": scale.reshape(channels, 1, *ones), "b": shift}
        values = []
        for suffix, array in arrays.items():
            value = ir.Value(name=fresh_name(graph, f"{bn.name}_{suffix}"), const_value=ir.tensor(array.numpy()))
            graph.register_initializer(value)
            values.append(value)
        attributes = [ir.AttrInt64("group", channels), ir.AttrInt64s("kernel_shape", ones)]
        conv = ir.Node("", "Conv", [x, *values], attributes, name=f"{bn.name}_dwconv")
        graph.insert_before(bn, conv)
        if out.is_graph_output():
            graph.outputs[graph.outputs.index(out)] = conv.outputs[0]
            conv.outputs[0].name, out.name = out.name, f"{out.name}_unused"
        out.replace_all_uses_with(conv.outputs[0])
        graph.remove(bn, safe=True)


def run_onnxoptimizer(src: Path, dst: Path) -> dict:
    import onnx
    import onnxoptimizer

    onnx.save(onnxoptimizer.optimize(onnx.load(str(src)), ["fuse_bn_into_conv"]), str(dst))
    return {}


def run_onnxsim(src: Path, dst: Path) -> dict:
    import onnx
    import onnxsim

    model, check_ok = onnxsim.simplify(onnx.load(str(src)))
    onnx.save(model, str(dst))
    return {"check_ok": check_ok}


def run_onnxslim(src: Path, dst: Path) -> dict:
    import onnx
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))
    return {}


def run_onnxscript_rewrite(src: Path, dst: Path) -> dict:
    import onnx
    import onnxscript.rewriter

    onnx.save(onnxscript.rewriter.rewrite(onnx.load(str(src))), str(dst))
    return {}


def run_onnxscript_optimize(src: Path, dst: Path) -> dict:
    import onnx
    import onnxscript.optimizer

    onnx.save(onnxscript.optimizer.optimize(onnx.load(str(src))), str(dst))
    return {}


def run_ort_offline(src: Path, dst: Path, level: str = "ORT_ENABLE_EXTENDED") -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return {}


EXPORTER = "exporter"  # exported by the parent, which has the torch models
TOOLS: dict[str, Callable[[Path, Path], dict] | None] = {
    "bngraph": run_bngraph,
    "bngraph.mul-add": lambda src, dst: run_bngraph(src, dst, "mul-add"),
    "bngraph.dw-conv": lambda src, dst: run_bngraph(src, dst, "dw-conv"),
    "onnxoptimizer": run_onnxoptimizer,
    "onnxsim": run_onnxsim,
    "onnxslim": run_onnxslim,
    "onnxscript.rewrite": run_onnxscript_rewrite,
    "onnxscript.optimize": run_onnxscript_optimize,
    EXPORTER: None,
    "ort.offline": run_ort_offline,
    "ort.offline-all": lambda src, dst: run_ort_offline(src, dst, "ORT_ENABLE_ALL"),
}


def tool_child(tool: str, root: Path, names: list[str]) -> None:
    """Run one tool on each pattern in turn; each leaves TOOL.onnx and TOOL.json, or TOOL.error."""
    import contextlib
    import io
    import warnings

    warnings.simplefilter("ignore")
    for name in names:
        folder = root / name
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # onnxslim and onnxsim print their own tables
                extra = TOOLS[tool](folder / "original.onnx", folder / f"{tool}.onnx")
            (folder / f"{tool}.json").write_text(json.dumps(extra))
        except Exception as err:
            (folder / f"{tool}.error").write_text(f"error: {one_line(err)}")


def run_tool(tool: str, root: Path, names: list[str], timeout_s: float) -> None:
    """Children until every pattern has an outcome: a crash marks the pattern it was on and a
    fresh child goes on with the rest."""
    while names:
        args = [sys.executable, __file__, "--tool-child", tool, "--dir", str(root), "--patterns", ",".join(names)]
        try:
            child = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
            last = (child.stderr.strip().splitlines() or ["no message"])[-1]
            code = child.returncode
            why = f"crashed ({signal.Signals(-code).name}): {last}" if code < 0 else f"exited {code}: {last}"
        except subprocess.TimeoutExpired:
            why = f"did not finish in {timeout_s:.0f} s"
        done = [n for n in names if any((root / n / f"{tool}.{ext}").exists() for ext in ("json", "error"))]
        names = names[len(done) :]
        if names:  # the child stopped on names[0]
            (root / names[0] / f"{tool}.error").write_text(f"error: {why}"[:200])
            names = names[1:]


# ---- the parent: export, run the tools, measure ---------------------------------------------------


def export_all(chosen: list[Pattern], root: Path, with_exporter: bool) -> None:
    import torch

    from tests.onnx_util import export_onnx
    from tests.util import randomize_bn

    for p in chosen:
        folder = root / p.name
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = randomize_bn(p.make())  # random statistics: a fresh BN is almost the identity
        (folder / "original.onnx").write_bytes(export_onnx(model, p.input_shape, "dynamo").SerializeToString())
        if with_exporter:
            try:
                proto = export_onnx(model, p.input_shape, "dynamo_optimize")
                (folder / f"{EXPORTER}.onnx").write_bytes(proto.SerializeToString())
                (folder / f"{EXPORTER}.json").write_text("{}")
            except Exception as err:
                (folder / f"{EXPORTER}.error").write_text(f"error: {one_line(err)}")


def outcome(folder: Path, tool: str) -> Path | str:
    """The tool's file, or its error."""
    error = folder / f"{tool}.error"
    return error.read_text().strip() if error.exists() else folder / f"{tool}.onnx"


def count_bn(path: Path) -> int:
    import onnx

    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def max_error(original: Path, candidate: Path, seed: int = 0) -> float:
    """Largest abs difference over every output, at each batch in ERROR_BATCHES, ORT_DISABLE_ALL."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    reference, tested = (
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in (original, candidate)
    )
    rng, worst = np.random.default_rng(seed), 0.0
    for batch in ERROR_BATCHES:
        feed = {
            i.name: rng.standard_normal([d if isinstance(d, int) else batch for d in i.shape]).astype(np.float32)
            for i in reference.get_inputs()
        }
        for want, got in zip(reference.run(None, feed), tested.run(None, feed), strict=True):
            worst = max(worst, float(np.abs(want.astype(np.float64) - got).max()))
    return worst


def measure(chosen: list[Pattern], tools: list[str], root: Path) -> tuple[dict, dict, dict]:
    """Per pattern and tool: BN left, max error (numbers, or the error that prevented them), bngraph's extras."""
    left, errors, extras = {}, {}, {}
    for p in chosen:
        folder = root / p.name
        left[p.name], errors[p.name] = {"original": count_bn(folder / "original.onnx")}, {}
        for tool in tools:
            result = outcome(folder, tool)
            if isinstance(result, str):
                left[p.name][tool] = errors[p.name][tool] = result
                continue
            extras[(p.name, tool)] = json.loads((folder / f"{tool}.json").read_text())
            try:
                left[p.name][tool] = count_bn(result)
                errors[p.name][tool] = max_error(folder / "original.onnx", result)
            except Exception as err:
                errors[p.name][tool] = f"error: {one_line(err)}"
                left[p.name].setdefault(tool, errors[p.name][tool])
    return left, errors, extras


# ---- the report ------------------------------------------------------------------------------


def cell(value, fmt: str = "{}", width: int = 34) -> str:
    if isinstance(value, str):
        return value if len(value) <= width else value[: width - 3] + "..."
    return fmt.format(value)


def summarize(tool: str, chosen: list[Pattern], left, errors, latency) -> dict:
    names = [p.name for p in chosen]
    counts = [left[n][tool] for n in names]
    numbers = [errors[n][tool] for n in names if not isinstance(errors[n][tool], str)]
    ratios = [median_ratio(latency[n], tool, "original") for n in names if tool in latency.get(n, {})]
    ratios = [r for r in ratios if not isinstance(r, str)]
    return {
        "tool": tool,
        "patterns with BN left": f"{sum(isinstance(c, int) and c > 0 for c in counts)} of {len(names)}",
        "BN left": sum(c for c in counts if isinstance(c, int)),
        "failed": sum(isinstance(c, str) for c in counts),
        "max abs error": f"{max(numbers):.1e}" if numbers else "-",
        "latency / original (geomean)": f"{math.exp(statistics.fmean(math.log(r) for r in ratios)):.3f}"
        if ratios
        else "-",
    }


def bngraph_rows(chosen: list[Pattern], extras) -> tuple[list[dict], str]:
    rows, exact, possible = [], 0, 0
    for p in chosen:
        extra = extras.get((p.name, "bngraph"))
        how = (
            ", ".join(extra["how"]) + "".join(f"; left: {r['node']}: {r['reason']}" for r in extra["remaining"])
            if extra
            else "(failed)"
        )
        is_exact = bool(extra) and bool(extra["how"]) and all(h.startswith("into the layer") for h in extra["how"])
        possible += p.true_fold
        exact += p.true_fold and is_exact
        rows.append({"pattern": p.name, "true fold exists": p.true_fold, "where bngraph put each BN": how})
    return rows, f"bngraph: true folds in {exact} of the {possible} patterns where one exists"


def collect(args, chosen: list[Pattern], tools: list[str], root: Path):
    """Export, run each tool in its children, check every output, time them: (left, errors, extras, latency)."""
    print(f"exporting {len(chosen)} patterns ...", file=sys.stderr, flush=True)
    export_all(chosen, root, EXPORTER in tools)
    for tool in tools:
        if TOOLS[tool] is not None:
            print(f"running {tool} ...", file=sys.stderr, flush=True)
            run_tool(tool, root, [p.name for p in chosen], args.tool_timeout)
    print("checking outputs ...", file=sys.stderr, flush=True)
    left, errors, extras = measure(chosen, tools, root)
    if not args.rounds:
        return left, errors, extras, {}
    print("timing onnxruntime ...", file=sys.stderr, flush=True)
    groups = {}
    for p in chosen:
        files = {"original": root / p.name / "original.onnx"}
        files.update({t: outcome(root / p.name, t) for t in tools if isinstance(errors[p.name][t], float)})
        groups[p.name] = {"batch": args.batch, "contenders": {t: str(f) for t, f in files.items()}}
    spec = {"threads": args.threads, "level": args.ort_level, "rounds": args.rounds,
            "sample_s": args.sample_ms / 1e3, "clock": args.clock, "groups": groups}
    (root / "ort-spec.json").write_text(json.dumps(spec))
    run_child(
        [str(TIMING), str(root / "ort-spec.json"), str(root / "ort-times.json")],
        env={"OMP_NUM_THREADS": str(args.threads)},
    )
    return left, errors, extras, json.loads((root / "ort-times.json").read_text())


def build_report(args, chosen: list[Pattern], tools: list[str], left, errors, extras, latency):
    from bngraph.report import Report

    def table(values, fmt, first=None):
        return [{"pattern": n, **({first: values[n][first]} if first else {}),
                 **{t: cell(v, fmt) for t, v in values[n].items() if t != first}} for n in values]

    sections = {
        "BatchNormalization nodes left": table(left, "{}", first="original"),
        "max abs error vs the original (onnxruntime, ORT_DISABLE_ALL)": table(errors, "{:.1e}"),
    }
    if latency:
        rows = []
        for n, samples in latency.items():
            original = samples["original"]
            us = cell(original) if isinstance(original, str) else f"{statistics.median(original) * 1e6:.1f}"
            ratios = {
                t: cell(median_ratio(samples, t, "original") if t in samples else errors[n][t], "{:.3f}") for t in tools
            }
            rows.append({"pattern": n, "original us": us, **ratios})
        sections[f"onnxruntime latency / the original's ({args.ort_level}, batch {args.batch})"] = rows
    bn_rows, true_folds = bngraph_rows(chosen, extras) if "bngraph" in tools else ([], "")
    if bn_rows:
        sections["bngraph: where each BN went"] = bn_rows
    sections["summary"] = [summarize(t, chosen, left, errors, latency) for t in tools]
    import onnxruntime

    facts = {
        "patterns": len(chosen),
        "onnxruntime": f"{onnxruntime.__version__}, CPU, {args.threads} intra-op thread(s)",
        "latency": f"median of {args.rounds} interleaved rounds of per-round ratios, {clock_name(args)} time"
        if latency
        else "skipped",
    }
    notes = [true_folds] if true_folds else []
    notes += sorted({v for row in errors.values() for v in row.values() if isinstance(v, str)})
    return Report("ONNX BN folding: bngraph and the other tools", sections=sections, facts=facts, notes=notes)


def clock_name(args) -> str:
    return "CPU" if args.clock == "cpu" and args.threads == 1 else "wall"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", help="comma-separated pattern names (default: all)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, from " + ", ".join(TOOLS))
    parser.add_argument("--rounds", type=int, default=11, help="interleaved latency rounds; 0 skips the latency table")
    parser.add_argument(
        "--sample-ms", type=float, default=10, help="each latency sample repeats a run for about this long"
    )
    parser.add_argument("--batch", type=int, default=8, help="batch size for the latency")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the latency")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: the timing thread's CPU time (one thread only; robust to a busy machine), or wall time",
    )
    parser.add_argument(
        "--ort-level",
        default="ORT_ENABLE_ALL",
        choices=["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"],
    )
    parser.add_argument("--tool-timeout", type=float, default=300, help="seconds one tool may take over all patterns")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--tool-child", help=argparse.SUPPRESS)  # run one tool, in a child
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.tool_child:
        tool_child(args.tool_child, args.dir, args.patterns.split(","))
        return 0

    every = patterns()
    wanted = args.patterns.split(",") if args.patterns else [p.name for p in every]
    chosen = [p for p in every if p.name in wanted]
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in TOOLS] + [w for w in wanted if w not in {p.name for p in every}]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (patterns: {', '.join(p.name for p in every)})")

    with tempfile.TemporaryDirectory(prefix="bngraph-onnx-fold-") as tmp:
        left, errors, extras, latency = collect(args, chosen, tools, args.keep or Path(tmp))
    report = build_report(args, chosen, tools, left, errors, extras, latency)
    report.print_json() if args.json else report.print_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
