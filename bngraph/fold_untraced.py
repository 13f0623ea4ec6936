"""`bngraph fold` for models torch.fx cannot trace: BatchNorms folded module by module.

What the module-level fallback of `insert` writes (the user's code with `Sequential(bn, act)`
wraps) cannot be traced either, so `fold` folds it without a graph
(`fold_bn_into_producer_module`), on an eval-mode copy, and checks the result against the model
it was given (`bngraph.equivalence`) before returning it, within the traced fold's tolerance
(`bngraph.compare.fold_tolerance`: verify's, widened only where a BN's tiny variance magnifies
float32 rounding). The report has the sections of the
traced fold's report, and each fold lists the edits that `bngraph fold -o` appends to the
model's source (`bngraph.artifact_code.edited_source`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from bngraph.equivalence import Reference
from bngraph.compare import fold_tolerance
from bngraph.passes.base import run_passes
from bngraph.passes._bn_affine import PRECISION_LOSS_GAIN, BatchNormStats, rounding_gain
from bngraph.passes.fold_bn_into_producer_module import TRAINING_IN_EVAL, fold_bn_into_producer_module
from bngraph.report import Report
from bngraph.trace import copy_module

FALLBACK = "module-level fallback"


def _batch_norms(module: nn.Module) -> list[str]:
    return [p for p, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def rounding_gains(module: nn.Module) -> dict[str, float]:
    """Each BN with running statistics: how much folding it magnifies float32 rounding."""
    return {
        path: rounding_gain(BatchNormStats(m.running_mean, m.running_var, m.weight, m.bias, m.eps))
        for path, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None
    }


def fold_untraced(module: nn.Module, example_inputs: Sequence[torch.Tensor], why: str, *,
                  reference: Reference | None = None) -> tuple[nn.Module, Report]:
    """An eval-mode copy of `module` with each BatchNorm folded where that is exact without a
    graph, and the report; raises CheckFailed if the copy computes something else. `why`: why
    there is no graph, for the report's note ("torch.fx could not trace the model (...)").
    `reference`: the model's outputs a caller already has (`bngraph.fold` after its partial
    trace), so that the model is not run again for them."""
    copy = copy_module(module).eval()
    before = _batch_norms(copy)
    gains = rounding_gains(copy)
    copy, results = run_passes(copy, [partial(fold_bn_into_producer_module, example_inputs=example_inputs)])
    result = results[fold_bn_into_producer_module.__name__]
    # Only the BNs folded away can magnify rounding: one left computes as it did.
    gain = max((gains.get(p, 0.0) for p in result.changed), default=0.0)
    tolerance = fold_tolerance(gain)
    reference = reference or Reference(module, example_inputs)
    noted = len(reference.notes)  # a caller's reference holds its own checks' notes
    reference.check(copy, what="the folded model", atol=tolerance, rtol=tolerance)
    left = _batch_norms(copy)
    reasons = {s.site: s.reason for s in result.skipped}
    folded = [{k: v for k, v in row.items() if k not in ROW_ONLY} for row in result.details]
    remaining = [{"node": p, "reason": reasons.get(p, "no pass matched it")} for p in left]
    # `export` may fold in ONNX what is left here, but not a BN that normalizes with its batch.
    foldable_in_onnx = [row["node"] for row in remaining if TRAINING_IN_EVAL not in row["reason"]]
    notes = [f"{why}: BatchNorms were folded module by module"
             + (f", and `bngraph export` may still fold {', '.join(foldable_in_onnx)} in ONNX" if foldable_in_onnx else "")]
    if not before:
        notes.append("nothing to fold: the model has no BatchNorm")
    notes += reference.notes[noted:]
    notes += probed_notes(result.details)
    for row in folded:
        if (row_gain := gains.get(row["node"], 0.0)) > PRECISION_LOSS_GAIN:
            row["rounding_gain"] = row_gain
            notes.append(f"{row['node']}: its variance is so small that folding magnifies float32 rounding "
                         f"{row_gain:.3g}x; the check against the model used atol = rtol = {fold_tolerance(row_gain):.3g}")
    report = Report(
        "bngraph fold",
        sections={"folded": folded, "remaining": remaining,
                  "passes": [{"pass": fold_bn_into_producer_module.__name__, "changed": len(result.changed), "skipped": len(result.skipped)}]},
        facts={"tracing": FALLBACK, "batchnorms_before": len(before), "batchnorms_after": len(left)},
        notes=notes,
        passes=results,
    )
    return copy, report


# Keys of the pass's rows that are not the report's columns: the source edits (model.py) and the
# inputs a fold was probed on (a note).
ROW_ONLY = ("edits", "probed_on")


def probed_notes(rows: Sequence[dict]) -> list[str]:
    """What a fold without a graph rests on, for the report: the runs it was decided by."""
    probed = [row for row in rows if row.get("probed_on")]
    if not probed:
        return []
    return [f"{len(probed)} BatchNorm(s) folded without a graph ({', '.join(r['node'] for r in probed)}): "
            f"each layer and BN ran once, the BN alone reading the layer's output, on "
            f"{', '.join(probed[0]['probed_on'])}; the fold is proven on those inputs only, not on every input "
            "(a forward that branches on its data may take another path)"]


def source_edits(report: Report) -> list[tuple]:
    """The edits of an untraced fold, in order, for `bngraph.artifact_code.edited_source`."""
    result = report.passes.get(fold_bn_into_producer_module.__name__)
    return [tuple(e) for row in (result.details if result else []) for e in row["edits"]]


__all__ = ["ROW_ONLY", "fold_untraced", "probed_notes", "rounding_gains", "source_edits"]
