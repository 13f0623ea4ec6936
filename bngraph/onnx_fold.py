"""Fold the BatchNormalization nodes of any ONNX model, and write the result only once it verifies.

    model, report = fold_onnx(onnx.load("in.onnx"))      # the passes and their report
    result, report = fold_onnx_verified("in.onnx", "out.onnx")   # `bngraph fold in.onnx -o out.onnx`

Files from any exporter go through the same passes, in this order (each in passes/):
initializers listed as graph inputs made constants (IR version 3 files list them all),
constants folded (the exporters hide biases and weights behind Expand/Transpose), a bias
written as an Add moved into its layer, a BN with scales >= 0 moved from after a max pool to
before it, weights shared with another layer copied, each BN folded into the layer before it,
then into the layer after it, and the model checked.

A BN that no layer can take (after a max pool, before a zero-padded conv, on a conv output that
another op reads) has no exact fold; it stays a fixed affine map in the form fastest for the
target (STANDALONE_BN_FORMS). For onnxruntime that is the BatchNormalization itself: onnxruntime
runs it as a depthwise NCHWc conv inside its layout, where a Mul + Add costs 2-11% more
(benchmarks/onnx_fold.py), and it is the same node the exporter's optimizer and onnxruntime's
offline optimizer leave there. Such a BN is listed under `kept`, not `remaining`: `remaining`
holds only the BNs that are not a fixed map (training mode, statistics fed at run time). A
runtime without a BatchNormalization kernel asks for "mul-add" (`--strict` fails on either).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from bngraph.atomic import ONNX, check_output
from bngraph.errors import UserError, one_line
from bngraph.onnx_io import initializer_bytes, load_onnx, write_verified
from bngraph.passes.base import run_passes
from bngraph.passes.onnx_replace_bn_with_multiply_add import onnx_replace_bn_with_multiply_add
from bngraph.passes.onnx_check import onnx_check
from bngraph.passes._onnx_common import NESTED_REASON, batchnorms, mark_nested_graphs, op_counts, site, skip_reason
from bngraph.passes.onnx_copy_shared_weights import onnx_copy_shared_weights
from bngraph.passes.onnx_fold_bn_into_preceding_layer import onnx_fold_bn_into_preceding_layer
from bngraph.passes.onnx_fold_bn_into_following_layer import onnx_fold_bn_into_following_layer
from bngraph.passes.onnx_fold_constants import onnx_fold_constants
from bngraph.passes.onnx_fuse_bias_add_into_layer import onnx_fuse_bias_add_into_layer
from bngraph.passes.onnx_initializer_inputs_to_constants import onnx_initializer_inputs_to_constants
from bngraph.passes.onnx_move_bn_before_max_pool import onnx_move_bn_before_max_pool
from bngraph.passes.onnx_simplify import onnx_simplify
from bngraph.report import Report
from bngraph.runners import BATCH_SIZES, onnx_inputs, random_batches, unbatched_note, unbatched_sizes
from bngraph.compare import VerifyResult
from bngraph.verify import verify

ONNX_PASSES = [
    onnx_initializer_inputs_to_constants,
    onnx_fold_constants,
    onnx_simplify,  # first too: a Transpose pair between a layer and its BN (tf2onnx's NHWC) cancelled
    onnx_fuse_bias_add_into_layer,
    onnx_move_bn_before_max_pool,
    onnx_copy_shared_weights,
    onnx_fold_bn_into_preceding_layer,
    onnx_fold_bn_into_following_layer,
    onnx_replace_bn_with_multiply_add,
    onnx_simplify,
    onnx_check,
]
# What a BN with no exact fold becomes, per target: the pass that rewrites it, or None to keep it.
STANDALONE_BN_FORMS = {
    "batchnorm": None,  # onnxruntime, TensorRT, OpenVINO...: a BN kernel, fused into their layouts
    "mul-add": onnx_replace_bn_with_multiply_add,  # a runtime with no BatchNormalization kernel
}
KEPT_REASON = "kept as BatchNormalization: the fastest exact form in onnxruntime (measured: benchmarks/onnx_fold.py)"


def fold_onnx(
    model: onnx.ModelProto | ir.Model, *, standalone_bn: str = "batchnorm", keep_initializer_inputs: bool = False
) -> tuple[ir.Model, Report]:
    """Run ONNX_PASSES on a copy of `model`; the report says where each BN went, or why it stayed.

    `standalone_bn` (a key of STANDALONE_BN_FORMS) is the form of a BN no layer can take;
    `keep_initializer_inputs` leaves initializers listed as graph inputs overridable (a BN
    reading one then stays, reported)."""
    if standalone_bn not in STANDALONE_BN_FORMS:
        raise UserError(f"unknown form {standalone_bn!r} for a BN with no exact fold: {', '.join(STANDALONE_BN_FORMS)}")
    if isinstance(model, onnx.ModelProto):
        try:
            model = ir.serde.deserialize_model(shapes_from_the_inputs(model))
        except ir.serde.SerdeError as err:  # a type onnx-ir cannot hold yet (sklearn-onnx's ZipMap maps)
            cause = err
            while cause.__cause__ is not None:  # the innermost says what: "Map types are not supported yet"
                cause = cause.__cause__
            raise UserError(f"cannot fold this model: onnx-ir, which bngraph's passes run on, cannot read it "
                            f"({one_line(cause)})") from err
    else:
        model = ir.serde.deserialize_model(ir.serde.serialize_model(model))  # never the caller's
    if training := sorted({n.op_type for n in model.graph.all_nodes() if n.domain == "ai.onnx.preview.training"}):
        # No inference runtime runs them, and the passes lose their outputs' types.
        raise UserError(f"the model computes its own training ({', '.join(training)} of ai.onnx.preview.training): "
                        "bngraph folds models for inference")
    nested = [site(bn) for bn in mark_nested_graphs(model)]  # left as they are, and said so
    before, batch_norms, size_before = op_counts(model), len(batchnorms(model)), initializer_bytes(model)
    chosen = STANDALONE_BN_FORMS[standalone_bn]
    passes = [p for p in ONNX_PASSES if p not in STANDALONE_BN_FORMS.values() or p is chosen]
    if keep_initializer_inputs:
        passes.remove(onnx_initializer_inputs_to_constants)
    model, results = run_passes(model, passes)
    after = op_counts(model)
    # Kept on purpose: an eval-mode BN of constants, left because this target runs it fastest.
    left = [(site(bn), chosen is None and skip_reason(bn) is None) for bn in batchnorms(model)]
    report = fold_report(before, after, batch_norms, left, results, size_before, initializer_bytes(model), nested)
    lifted = results.get("onnx_initializer_inputs_to_constants")
    if lifted and lifted.changed:
        report.notes.append(
            f"{len(lifted.changed)} initializers listed as graph inputs (IR version {lifted.details[0]['ir_version']}) "
            "were read as constants; keep them overridable with --keep-initializer-inputs"
        )
    if tidy_left := next((s for name, r in results.items() if name.startswith("onnx_simplify") for s in r.skipped), None):
        report.notes.append(f"{tidy_left.site} not applied: {tidy_left.reason}")
    return model, report


def shapes_from_the_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each declared shape that its inputs contradict replaced by the inferred one:
    exporters write the example's batch into an output whose input takes any batch, onnxruntime
    runs it at any, and the rewrite rules that trust a declared shape (Flatten to Reshape) then
    fixed the batch at the example's. A declared size that inference infers as varying with an
    input, or as another size, is contradicted; any other declared shape stays (dynamo's symbolic
    sizes tell more than onnx's inference), and all of them where inference fails."""
    cleared = onnx.ModelProto()
    cleared.CopyFrom(model)
    cleared.graph.ClearField("value_info")
    for output in cleared.graph.output:
        output.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(cleared, data_prop=True)
    except Exception:  # noqa: BLE001 - onnx's checker errors and more: the passes meet the file as it is
        return model
    shapes = {v.name: v.type.tensor_type.shape for v in [*inferred.graph.value_info, *inferred.graph.output]
              if v.type.tensor_type.HasField("shape")}
    # Where an input's sizes past the batch vary (an image of any H, W), a size declared fixed that
    # inference cannot tell is the example's, not the file's: a Reshape's [N, 4, 64] became a
    # constant, and the folded file computed something else at 16 x 12.
    varying = any(d.HasField("dim_param") for i in model.graph.input for d in i.type.tensor_type.shape.dim[1:])
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in [*fixed.graph.value_info, *fixed.graph.output]:
        declared = value.type.tensor_type
        if declared.HasField("shape") and value.name in shapes and _contradicts(shapes[value.name], declared.shape, varying):
            declared.shape.CopyFrom(shapes[value.name])
    return fixed


def _contradicts(inferred, declared, varying: bool) -> bool:
    """Whether a declared size is another in `inferred`, or a size named by an input (`N`), or,
    where the inputs' sizes past the batch vary, one inference cannot tell (onnx names such sizes
    `unk__0`, ...)."""
    if len(inferred.dim) != len(declared.dim):
        return True
    return any(d.HasField("dim_value") and ((i.HasField("dim_param") and (varying or not i.dim_param.startswith("unk__")))
                                            or (i.HasField("dim_value") and i.dim_value != d.dim_value))
               for i, d in zip(inferred.dim, declared.dim))


# The passes that move a BN somewhere, in the order they try; their rows read like the FX fold's.
_BN_PASSES = ("onnx_fold_bn_into_preceding_layer", "onnx_fold_bn_into_following_layer", "onnx_replace_bn_with_multiply_add")


def fold_report(
    before, after, batch_norms: int, left: list[tuple[str, bool]], results, size_before: int, size_after: int,
    nested: Sequence[str] = (),
) -> Report:
    """The same sections and facts as `bngraph.fold.fold_report`, so that both folds read alike.

    `left` is each BN still in the graph with whether it is a fixed map kept on purpose;
    `nested`, those inside subgraphs and functions, which no pass touches."""
    ran = [name for name in _BN_PASSES if name in results]
    reasons: dict[str, dict[str, str]] = {}  # BN node -> pass -> why it left the BN alone
    for name in ran:
        for skip in results[name].skipped:
            reasons.setdefault(skip.site, {})[name] = skip.reason
    folded = []
    for name in ran:
        for row in results[name].details:
            why = reasons.get(row["node"], {})
            note = "; ".join(f"{where}: {why[p]}" for where, p in zip(("before", "after"), _BN_PASSES) if p in why)
            folded.append({**row, "note": note})
    # A BN left by the last pass was left by all of them; the last one's reason is the one that counts.
    remaining = [
        {"node": n, "reason": list(reasons.get(n, {"": "no pass matched it"}).values())[-1]} for n, kept in left if not kept
    ] + [{"node": n, "reason": NESTED_REASON} for n in nested]
    kept = []
    for n, is_kept in left:
        if is_kept:
            why = reasons.get(n, {})
            no_fold = "; ".join(f"{where}: {why[p]}" for where, p in zip(("before", "after"), _BN_PASSES) if p in why)
            kept.append({"node": n, "form": "BatchNormalization", "reason": KEPT_REASON, "note": no_fold})
    facts = {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "batchnorms_before": batch_norms + len(nested),
        "batchnorms_after": len(left) + len(nested),  # every BatchNormalization node in the result, kept ones too
        "batchnorms_kept": len(kept),
    }
    sections = {
        "folded": folded,
        "kept": kept,
        "remaining": remaining,
        "ops": op_table(before, after, size_before, size_after),
        "passes": [{"pass": name, "changed": len(r.changed), "skipped": len(r.skipped)} for name, r in results.items()],
    }
    notes = [] if batch_norms or nested else ["nothing to fold: the model has no BatchNormalization"]
    return Report("bngraph fold (ONNX)", sections=sections, facts=facts, notes=notes)


def op_table(before, after, size_before: int, size_after: int) -> list[dict]:
    """onnxsim's before/after table: each op's count, then the weights' size."""
    rows = [{"op": op, "before": before[op], "after": after[op]} for op in sorted(set(before) | set(after))]
    rows.append({"op": "(weights, KiB)", "before": round(size_before / 1024, 1), "after": round(size_after / 1024, 1)})
    return rows


def fold_onnx_verified(
    in_path: str | Path,
    out_path: str | Path | None = None,
    *,
    standalone_bn: str = "batchnorm",
    keep_initializer_inputs: bool = False,
    input_shapes: list[tuple[int, ...]] | None = None,
    static_inputs: Sequence[int] = (),
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
) -> tuple[VerifyResult, Report]:
    """Fold the ONNX file `in_path`, verify the result against it in onnxruntime, and write it to
    `out_path` only if it passes (`out_path` None: verified, not saved).

    `input_shapes` and `static_inputs` are `bngraph.runners.onnx_inputs`'s; a file that fixes its
    batch is verified at that batch only. The report's `output` fact says whether the file was
    written; `remaining` lists the BNs that are not a fixed map."""
    in_path = Path(in_path)
    if out_path is not None and Path(out_path).suffix != ".onnx":
        raise UserError(f"the output {out_path} of an ONNX fold must be a .onnx file")
    if out_path is not None:  # before the work, not after it
        check_output(out_path, ONNX, force=force, inputs=[in_path])
    original = load_onnx(in_path)
    spec = onnx_inputs(in_path, input_shapes, static_inputs)
    model, report = fold_onnx(original, standalone_bn=standalone_bn, keep_initializer_inputs=keep_initializer_inputs)
    report.title = f"bngraph fold {in_path}"
    unbatched = None if spec.fixed_batch is not None else unbatched_sizes(spec.shapes, spec.batch_axes)
    sizes = (spec.fixed_batch,) * 2 if spec.fixed_batch is not None else unbatched or BATCH_SIZES
    if spec.fixed_batch is not None:
        report.notes.append(f"{in_path} fixes the batch at {spec.fixed_batch}: verified at that batch only")
    elif unbatched:  # [1, 1, 1, 7] said the batch was varied where no input has one
        report.notes.append(unbatched_note(unbatched))
    batches = random_batches(spec.shapes, sizes, spec.dtypes, batch_axes=spec.batch_axes)
    if out_path is None:
        folded = ir.serde.serialize_model(model).SerializeToString()
        result = verify(in_path, folded, batches, atol, rtol, batch_sizes=sizes, dtypes_must_match=True)
    else:  # a fold never changes an output's dtype: a float16 output would pass at float16's tolerance
        result, written = write_verified(model, out_path, in_path, batches, atol, rtol, batch_sizes=sizes, force=force,
                                         dtypes_must_match=True)
        report.facts["output"] = str(out_path) if written else "(not written: the folded model differs from the input)"
    report.facts.update(result.facts())
    report.sections["verification"] = [d.row() for d in result.diffs]
    return result, report
