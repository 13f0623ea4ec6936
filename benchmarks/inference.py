"""Inference latency: a model with BN, folded, and built without BN, in PyTorch and onnxruntime.

    .venv/bin/python benchmarks/inference.py [--models mnist-mlp,resnet] [--rounds 11]
        [--threads 1] [--sample-ms 50] [--batch inception=2] [--json]

For each model (zoo:mnist-mlp, zoo:inception-small, zoo:inception and RESNET below) the same
architecture three ways:
  BN      the eval BN model: zoo models through `bngraph.insert`, then random BN statistics
          (a fresh BN is almost the identity); the ResNet as written, with BatchNorm2d
  folded  `bngraph.fold.fold` of it
  no-BN   the architecture without BN: the zoo model itself; the ResNet with norm_layer=None
          (no norm module, each conv keeps its bias), the floor that folding can reach
PyTorch eager (torch.inference_mode) times BN as a GraphModule (the insert output; the ResNet
traced), the folded GraphModule, the folded model saved with `bngraph.save` and loaded back with
`bngraph.load` (a plain nn.Module with a generated forward: what a user deploys, and free of the
GraphModule's call overhead, which alone is 5-7% on the MLP), and no-BN as the plain module.
onnxruntime (CPU EP, ORT_ENABLE_ALL) times the BN model exported as is
(torch.onnx.export(dynamo=True, optimize=False): onnxruntime then fuses BN into Conv itself),
`bngraph.export.export` (the default path: FX fold, export, ONNX fold, verified), the BN model
exported with the exporter's own optimizer (optimize=True), and no-BN exported as is.

Targets: folded / no-BN <= 1.01 in both runtimes; ours / exporter-optimized <= 1.0 ('!' marks
a miss). The parent process builds every model and file into a temporary folder; one child
process then times PyTorch and another onnxruntime (benchmarks/timing.py), one after the other,
each with --threads threads (default 1: on a small shared machine a second thread mostly
measures the neighbours). Each round runs every contender once, in a rotating order; a ratio is
the median over rounds of the per-round ratio. Default sizes finish in about 2 minutes on 2 cores,
most of it building and exporting the two Inceptions: --models without them takes about 25 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.util.randomize_bn

from timing import interleave, median_ratio, run_child  # noqa: E402  (benchmarks/timing.py)

# Batch per model: MLP at the paper's 60, small convnets at 32, the full Inception at 4.
BATCHES = {"mnist-mlp": 60, "inception-small": 32, "inception": 4, "resnet": 32}
TORCH_CONTENDERS = ("bn", "folded_gm", "folded", "no_bn")
ORT_CONTENDERS = ("bn", "ours", "exporter", "no_bn")
FOLDED_TARGET, EXPORTER_TARGET = 1.01, 1.0
TIMING = Path(__file__).with_name("timing.py")


# ---- RESNET: a few conv-BN-ReLU residual blocks, written with BN --------------------------------


def conv_norm(cin: int, cout: int, kernel: int, stride: int = 1, norm_layer=nn.BatchNorm2d) -> nn.Sequential:
    """A conv and its norm layer; without one the conv keeps its bias (a BN's shift replaces it)."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=norm_layer is None)]
    if norm_layer is not None:
        layers.append(norm_layer(cout))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """He et al. (2016): conv-norm-ReLU, conv-norm, plus the shortcut (projected when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer):
        super().__init__()
        self.conv1 = conv_norm(cin, cout, 3, stride, norm_layer)
        self.conv2 = conv_norm(cout, cout, 3, 1, norm_layer)
        projected = stride != 1 or cin != cout
        self.shortcut = conv_norm(cin, cout, 1, stride, norm_layer) if projected else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-sized ResNet: a stem, three stages of `depth` blocks, global pool, classifier."""

    example_input_shape = (2, 3, 32, 32)

    def __init__(self, norm_layer=nn.BatchNorm2d, widths=(16, 32, 64), depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = conv_norm(3, widths[0], 3, norm_layer=norm_layer)
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(depth):
                blocks.append(BasicBlock(cin, width, 2 if i and not j else 1, norm_layer))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- the parent: build every contender into a folder ---------------------------------------------


def bn_and_plain(name: str, x: torch.Tensor) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(BN model as a GraphModule, the same BN model as handed to fold/export, the no-BN model)."""
    from bngraph.trace import trace
    from tests.util import randomize_bn

    if name == "resnet":
        torch.manual_seed(0)
        with_bn = randomize_bn(ResNet())
        torch.manual_seed(0)
        return trace(with_bn), with_bn, ResNet(norm_layer=None).eval()
    import bngraph
    from bngraph.zoo import create_model

    plain = create_model(name).eval()
    with_bn, _ = bngraph.insert(plain, [x])
    with_bn = randomize_bn(with_bn)
    return with_bn, with_bn, plain


def picklable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` without string type annotations, which GraphModule's pickling cannot import: the zoo's
    `from __future__ import annotations` turns `x: torch.Tensor` into the string 'torch.Tensor'.
    Annotations do not change what forward computes or how fast."""
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    gm.recompile()
    return gm


def build(name: str, batch: int, folder: Path) -> list[str]:
    """Write the model's torch contenders and ONNX files into `folder`; return notes on bngraph."""
    import onnx_ir as ir

    import bngraph
    from bngraph.errors import UserError
    from bngraph.export import export, to_onnx
    from bngraph.fold import fold
    from bngraph.zoo import get_entry

    shape = ResNet.example_input_shape if name == "resnet" else get_entry(name).input_shape
    x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(0))
    bn_graph, with_bn, plain = bn_and_plain(name, x)
    notes = []
    folded, report = fold(with_bn, [x])
    if report.facts["batchnorms_after"]:
        notes.append(
            f"{name}: bngraph.fold left {report.facts['batchnorms_after']} BatchNorm: {report.sections['remaining']}"
        )
    with torch.no_grad():
        error = float((folded(x) - with_bn(x)).abs().max())
    notes.append(f"{name}: folded vs BN in torch, max abs difference {error:.2g} at batch {batch}")
    bngraph.save(folded, folder / "folded", example_inputs=[x])
    torch.save({"bn": picklable(bn_graph), "folded_gm": picklable(folded), "no_bn": plain, "x": x}, folder / "torch.pt")

    ir.save(to_onnx(with_bn, [x]), folder / "bn.onnx")
    ir.save(to_onnx(with_bn, [x], exporter_optimize=True), folder / "exporter.onnx")
    ir.save(to_onnx(plain, [x]), folder / "no_bn.onnx")
    try:
        result = export(with_bn, [x], folder / "ours.onnx")
    except UserError as err:  # a BN it could not fold, say: the ORT timings show the missing file
        notes.append(f"{name}: bngraph.export refused: {err}")
        return notes
    if not result:
        notes.append(f"{name}: bngraph.export failed verification: {result.verification.worst.line()}")
    return notes


# ---- the torch child -------------------------------------------------------------------------


def time_torch(folders: dict[str, Path], threads: int, rounds: int, sample_s: float) -> dict:
    import bngraph

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    results = {}
    for name, folder in folders.items():
        saved = torch.load(folder / "torch.pt", weights_only=False)  # our own file, written just now
        saved["folded"] = bngraph.load(folder / "folded")
        with torch.inference_mode():
            runs = {c: partial(saved[c].eval(), saved["x"]) for c in TORCH_CONTENDERS}
            results[name] = interleave(runs, rounds, sample_s)
    return results


# ---- the report ------------------------------------------------------------------------------


def median_ms(samples, contender: str) -> str:
    value = samples[contender]
    return value if isinstance(value, str) else f"{statistics.median(value) * 1e3:.3f}"


def ratio_cell(samples, a: str, b: str, target: float | None = None) -> str:
    value = median_ratio(samples, a, b)
    if isinstance(value, str):
        return value
    return f"{value:.3f}" + (" !" if target is not None and value > target else "")


def build_report(models: dict[str, int], torch_times: dict, ort_times: dict, args, notes: list[str]):
    from bngraph.report import Report

    torch_rows, ort_rows = [], []
    for name, batch in models.items():
        t, o = torch_times[name], ort_times[name]
        torch_rows.append({
            "model": name, "batch": batch,
            **{f"{c} ms": median_ms(t, c) for c in TORCH_CONTENDERS},
            "folded / no-BN": ratio_cell(t, "folded", "no_bn", FOLDED_TARGET),
            "folded GM / no-BN": ratio_cell(t, "folded_gm", "no_bn", FOLDED_TARGET),
            "BN / folded GM": ratio_cell(t, "bn", "folded_gm"),
        })
        ort_rows.append({
            "model": name, "batch": batch,
            **{f"{c} ms": median_ms(o, c) for c in ORT_CONTENDERS},
            "ours / no-BN": ratio_cell(o, "ours", "no_bn", FOLDED_TARGET),
            "BN / ours": ratio_cell(o, "bn", "ours"),
            "ours / exporter": ratio_cell(o, "ours", "exporter", EXPORTER_TARGET),
        })
    import onnxruntime

    facts = {
        "torch_setup": f"{torch.__version__}, eager, inference_mode, {args.threads} intra-op thread(s), 1 inter-op",
        "onnxruntime_setup": f"{onnxruntime.__version__}, CPUExecutionProvider, ORT_ENABLE_ALL, "
        f"{args.threads} intra-op thread(s), 1 inter-op, sequential",
        "rounds": args.rounds,
        "sample_ms": args.sample_ms,
    }
    legend = [
        "ms: median time per call; ratios: median over rounds of the per-round ratio; '!': over the target "
        f"({FOLDED_TARGET} for folded / no-BN, {EXPORTER_TARGET} for ours / exporter)",
        "torch: bn = BN model as a GraphModule, folded_gm = bngraph.fold.fold's GraphModule, "
        "folded = that saved with bngraph.save and loaded back with bngraph.load, no_bn = the plain model without BN",
        "onnxruntime: bn = the BN model exported with optimize=False, ours = bngraph.export.export (default path), "
        "exporter = the BN model exported with optimize=True, no_bn = the model without BN exported with optimize=False",
    ]
    return Report(
        "inference latency: BN vs folded vs no BN",
        sections={"PyTorch eager": torch_rows, "onnxruntime": ort_rows},
        facts=facts,
        notes=legend + notes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BATCHES), help=f"comma-separated, from {', '.join(BATCHES)}")
    parser.add_argument("--batch", action="append", default=[], metavar="MODEL=N", help="override a batch size")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds per model and runtime")
    parser.add_argument("--sample-ms", type=float, default=50, help="each sample repeats a call for about this long")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads in both runtimes")
    parser.add_argument("--keep", type=Path, help="build into this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--torch-child", type=Path, help=argparse.SUPPRESS)  # the spec of a torch timing child
    args = parser.parse_args(argv)

    if args.torch_child:
        spec = json.loads(args.torch_child.read_text())
        times = time_torch(
            {n: Path(p) for n, p in spec["folders"].items()}, args.threads, args.rounds, args.sample_ms / 1e3
        )
        Path(spec["out"]).write_text(json.dumps(times))
        return 0

    batches = {**BATCHES, **{k: int(v) for k, v in (b.split("=") for b in args.batch)}}
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in BATCHES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(BATCHES)}")
    models = {m: batches[m] for m in names}

    with tempfile.TemporaryDirectory(prefix="bngraph-inference-") as tmp:
        root = args.keep or Path(tmp)
        folders, notes = {}, []
        for name, batch in models.items():
            print(f"building {name} (batch {batch}) ...", file=sys.stderr, flush=True)
            folders[name] = root / name
            folders[name].mkdir(parents=True, exist_ok=True)
            notes += build(name, batch, folders[name])

        common = ["--threads", str(args.threads), "--rounds", str(args.rounds), "--sample-ms", str(args.sample_ms)]
        env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        torch_spec = root / "torch-spec.json"
        torch_spec.write_text(
            json.dumps({"folders": {n: str(f) for n, f in folders.items()}, "out": str(root / "torch-times.json")})
        )
        print("timing PyTorch ...", file=sys.stderr, flush=True)
        run_child([__file__, "--torch-child", str(torch_spec), *common], env=env)
        ort_spec = {
            "threads": args.threads, "level": "ORT_ENABLE_ALL", "rounds": args.rounds, "sample_s": args.sample_ms / 1e3,
            "groups": {n: {"batch": models[n], "contenders": {c: str(f / f"{c}.onnx") for c in ORT_CONTENDERS}}
                       for n, f in folders.items()},
        }
        (root / "ort-spec.json").write_text(json.dumps(ort_spec))
        print("timing onnxruntime ...", file=sys.stderr, flush=True)
        run_child([str(TIMING), str(root / "ort-spec.json"), str(root / "ort-times.json")], env=env)
        torch_times = json.loads((root / "torch-times.json").read_text())
        ort_times = json.loads((root / "ort-times.json").read_text())

    result = build_report(models, torch_times, ort_times, args, notes)
    result.print_json() if args.json else result.print_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
