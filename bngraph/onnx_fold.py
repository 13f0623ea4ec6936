"""Fold the BatchNormalization nodes of any ONNX model, and write the result only once it verifies.

    model, report = fold_onnx(onnx.load("in.onnx"))      # the passes and their report
    fold_onnx_file("in.onnx", "out.onnx", args)          # `bngraph fold in.onnx -o out.onnx`

Files from any exporter go through the same passes, in this order (each in passes/):
constants first (the exporters hide biases and weights behind Expand/Transpose), weights
shared with another layer copied, each BN folded into the layer before it, then into the
layer after it, what is left turned into Mul + Add, and the model checked. A training-mode BN
is the one thing left: its output depends on the batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
import onnx_ir as ir

from bngraph.atomic import write_atomically
from bngraph.errors import UserError
from bngraph.passes.base import run_passes
from bngraph.passes.onnx_bn_to_mul_add import onnx_bn_to_mul_add
from bngraph.passes.onnx_check import onnx_check
from bngraph.passes.onnx_common import batchnorms, op_counts, site
from bngraph.passes.onnx_copy_shared_weights import onnx_copy_shared_weights
from bngraph.passes.onnx_fold_bn_into_layer import onnx_fold_bn_into_layer
from bngraph.passes.onnx_fold_bn_into_next_layer import onnx_fold_bn_into_next_layer
from bngraph.passes.onnx_fold_constants import onnx_fold_constants
from bngraph.passes.onnx_simplify import onnx_simplify
from bngraph.report import Report
from bngraph.trace import one_line

ONNX_PASSES = [
    onnx_fold_constants,
    onnx_copy_shared_weights,
    onnx_fold_bn_into_layer,
    onnx_fold_bn_into_next_layer,
    onnx_bn_to_mul_add,
    onnx_simplify,
    onnx_check,
]
# protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
SINGLE_FILE_LIMIT_BYTES = 2**31 - 2**27


def fold_onnx(model: onnx.ModelProto | ir.Model) -> tuple[ir.Model, Report]:
    """Run ONNX_PASSES on a copy of `model`; the report says where each BN went, or why it stayed."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    else:
        model = ir.serde.deserialize_model(ir.serde.serialize_model(model))  # never the caller's
    before, batch_norms, size_before = op_counts(model), len(batchnorms(model)), initializer_bytes(model)
    model, results = run_passes(model, ONNX_PASSES)
    after = op_counts(model)
    left = [site(bn) for bn in batchnorms(model)]
    return model, fold_report(before, after, batch_norms, left, results, size_before, initializer_bytes(model))


# The passes that move a BN somewhere, in the order they try; their rows read like the FX fold's.
_BN_PASSES = ("onnx_fold_bn_into_layer", "onnx_fold_bn_into_next_layer", "onnx_bn_to_mul_add")


def fold_report(before, after, batch_norms: int, left: list[str], results, size_before: int, size_after: int) -> Report:
    """The same sections and facts as `bngraph.fold.fold_report`, so that both folds read alike."""
    reasons: dict[str, dict[str, str]] = {}  # BN node -> pass -> why it left the BN alone
    for name in _BN_PASSES:
        for skip in results[name].skipped:
            reasons.setdefault(skip.site, {})[name] = skip.reason
    folded = []
    for name in _BN_PASSES:
        for row in results[name].details:
            why = reasons.get(row["node"], {})
            note = "; ".join(f"{where}: {why[p]}" for where, p in zip(("before", "after"), _BN_PASSES) if p in why)
            folded.append({**row, "note": note})
    # A BN left by the last pass was left by all of them; the last one's reason is the one that counts.
    remaining = [{"node": n, "reason": list(reasons.get(n, {"": "no pass matched it"}).values())[-1]} for n in left]
    facts = {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "batchnorms_before": batch_norms,
        "batchnorms_after": len(left),
    }
    sections = {
        "folded": folded,
        "remaining": remaining,
        "ops": op_table(before, after, size_before, size_after),
        "passes": [{"pass": name, "changed": len(r.changed), "skipped": len(r.skipped)} for name, r in results.items()],
    }
    notes = [] if batch_norms else ["nothing to fold: the model has no BatchNormalization"]
    return Report("bngraph fold (ONNX)", sections=sections, facts=facts, notes=notes)


def op_table(before, after, size_before: int, size_after: int) -> list[dict]:
    """onnxsim's before/after table: each op's count, then the weights' size."""
    rows = [{"op": op, "before": before[op], "after": after[op]} for op in sorted(set(before) | set(after))]
    rows.append({"op": "(weights, KiB)", "before": round(size_before / 1024, 1), "after": round(size_after / 1024, 1)})
    return rows


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_onnx(model: ir.Model, path: Path, final: Path) -> None:
    """One self-contained file unless the weights pass protobuf's 2 GiB limit; then the weights go
    to `<final name>.data` beside it (written whole by onnx-ir before the model file appears)."""
    if initializer_bytes(model) > SINGLE_FILE_LIMIT_BYTES:
        ir.save(model, path, external_data=f"{final.name}.data")
    else:
        ir.save(model, path)


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """The model, if onnx.checker with shape inference accepts it: the fold ends with the same
    check, so a model that fails it is the input's fault, said here rather than after the work."""
    path = Path(path)
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto if proto.ByteSize() < SINGLE_FILE_LIMIT_BYTES else str(path), full_check=True)
    except Exception as err:
        raise UserError(f"{path} is not a valid ONNX model: {one_line(err)}") from err
    return proto


class Rejected(Exception):
    """Raised inside an atomic write to drop the file: the check ran and failed."""


def fold_onnx_file(in_path: str | Path, out_path: str | Path | None, args: argparse.Namespace) -> int:
    """`bngraph fold in.onnx [-o out.onnx]`: fold, verify against the input in onnxruntime, write.

    Exit 1 and no file when the outputs differ beyond tolerance (--atol/--rtol where the
    command has them); with --strict, exit 1 (the verified file still written) when a
    BatchNormalization is left. Without -o, the folded model is verified but not saved.
    """
    from bngraph.commands.common import emit
    from bngraph.spec import parse_input_shapes
    from bngraph.runners import BATCH_SIZES, onnx_inputs, random_batches
    from bngraph.verify import print_lines, verify

    in_path = Path(in_path)
    if out_path is not None and Path(out_path).suffix != ".onnx":
        raise UserError(f"the output {out_path} of an ONNX fold must be a .onnx file")
    original = load_onnx(in_path)
    shapes = getattr(args, "input_shape", None)
    spec = onnx_inputs(in_path, parse_input_shapes(shapes) if shapes else None)
    model, report = fold_onnx(original)
    report.title = f"bngraph fold {in_path}"
    sizes = BATCH_SIZES if spec.fixed_batch is None else (spec.fixed_batch,) * 2
    if spec.fixed_batch is not None:
        report.notes.append(f"{in_path} fixes the batch at {spec.fixed_batch}: verified at that batch only")
    batches = random_batches(spec.shapes, sizes, spec.dtypes)
    tolerances = getattr(args, "atol", None), getattr(args, "rtol", None)
    outcome = {}

    def write(tmp: Path) -> None:
        save_onnx(model, tmp, Path(out_path))
        outcome["result"] = verify(in_path, tmp, batches, *tolerances)
        if not outcome["result"]:
            raise Rejected

    if out_path is None:
        outcome["result"] = verify(in_path, ir.serde.serialize_model(model).SerializeToString(), batches, *tolerances)
    else:
        try:
            write_atomically(out_path, write)
            report.facts["output"] = str(out_path)
        except Rejected:
            report.facts["output"] = "(not written: the folded model differs from the input)"
    result = outcome["result"]
    report.facts.update(result.facts())
    report.sections["verification"] = [d.row() for d in result.diffs]
    emit(report, args)
    print_lines(result, args)
    left = report.facts["batchnorms_after"]
    if getattr(args, "strict", False) and left:
        print(f"bngraph: --strict: {left} BatchNormalization left (see 'remaining')", file=sys.stderr)
        return 1
    return 0 if result else 1
