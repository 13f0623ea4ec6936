"""The Python API behind `bngraph fold`: each BatchNorm merged into a neighbouring linear map.

    folded, report = fold(model, example_inputs)   # a GraphModule in eval mode, and the report

Paper, Algorithm 2 step 3: in eval mode a BN is a fixed affine map per channel, so it folds
into the conv or linear that feeds it, else into the one it feeds where that is exact, else it
becomes one multiply-add. The passes run on a traced copy in eval mode; the model handed in is
left as it is. BatchNorms that are not fixed maps are left, each with its reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import torch
from torch import fx, nn

from bngraph.passes.base import PassResult, run_passes
from bngraph.passes.cancel_inverse_permutes import cancel_inverse_permutes
from bngraph.passes.fold_bn_into_following_layer import fold_bn_into_following_layer
from bngraph.passes.fold_bn_into_preceding_layer import fold_bn_into_preceding_layer
from bngraph.passes.fx_batchnorm import is_batch_norm
from bngraph.passes.op_kinds import op_label
from bngraph.passes.remove_dead_code import remove_dead_code
from bngraph.passes.remove_eval_identities import remove_eval_identities
from bngraph.passes.replace_bn_with_multiply_add import replace_bn_with_multiply_add
from bngraph.report import Report
from bngraph.trace import trace

# In order: the layer before a BN is the first choice (no constraint on padding), the layer
# after it the second, a multiply-add the last. Identities go first, as they can stand between
# a layer and its BN.
FOLD_PASSES = (remove_eval_identities, fold_bn_into_preceding_layer, fold_bn_into_following_layer,
               replace_bn_with_multiply_add)  # fmt: skip
TIDY_PASSES = (cancel_inverse_permutes, remove_dead_code)
_BN_PASSES = (fold_bn_into_preceding_layer.__name__, fold_bn_into_following_layer.__name__,
              replace_bn_with_multiply_add.__name__)  # fmt: skip


def fold(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[fx.GraphModule, Report]:
    """`module` in eval mode with its BatchNorms folded, and the report.

    `report.passes` keeps each pass's `PassResult`, for an artifact's history.
    """
    gm = trace(module, example_inputs, training=False)  # an eval-mode copy: `module` is never changed
    before, batch_norms = _op_counts(gm), len(_batch_norm_names(gm))
    gm, results = run_passes(gm, FOLD_PASSES)
    errors = _measure_flagged(module, gm, results, example_inputs)
    gm, tidied = run_passes(gm, TIDY_PASSES)
    results.update(tidied)
    report = fold_report(before, _op_counts(gm), batch_norms, _batch_norm_names(gm), results, errors)
    report.passes = results
    return gm, report


def _op_counts(gm: fx.GraphModule) -> Counter:
    return Counter(op_label(gm, n) for n in gm.graph.nodes if n.op.startswith("call_"))


def _batch_norm_names(gm: fx.GraphModule) -> list[str]:
    modules = dict(gm.named_modules())
    return [n.name for n in gm.graph.nodes if is_batch_norm(n, modules)]


class _Capture(fx.Interpreter):
    """Runs a graph and keeps the values of the nodes named in `names`."""

    def __init__(self, gm: fx.GraphModule, names: Collection[str]):
        super().__init__(gm)
        self.names, self.values = set(names), {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node.name in self.names:
            self.values[node.name] = value
        return value


def _measure_flagged(model, gm, results: dict[str, PassResult], example_inputs) -> dict[str, tuple[float, float]]:
    """For each fold flagged for precision, the largest abs and relative error it made on the
    example input, measured where its output is: the unfolded model's value vs the folded one's."""
    probes = {row["node"]: row["probe"] for r in results.values() for row in r.details if "probe" in row}
    if not probes:
        return {}
    reference = trace(model, training=False)  # the same node names as the graph the passes started from
    with torch.no_grad():
        want, got = _Capture(reference, {p[0] for p in probes.values()}), _Capture(gm, {p[1] for p in probes.values()})
        want.run(*example_inputs)
        got.run(*example_inputs)
    errors = {}
    for bn, (ref, new) in probes.items():
        expected, actual = want.values[ref].double(), got.values[new].double()
        error = float((expected - actual).abs().max())
        errors[bn] = (error, error / max(float(expected.abs().max()), 1e-30))
    return errors


def fold_report(
    before: Counter,
    after: Counter,
    batch_norms: int,
    left: list[str],
    results: dict[str, PassResult],
    errors: dict[str, tuple[float, float]],
) -> Report:
    """The report of a fold, from the op counts, the BatchNorms before and left, and the passes' results."""
    reasons: dict[str, dict[str, str]] = {}  # BN node -> pass -> why it left the BN alone
    for name in _BN_PASSES:
        for skip in results[name].skipped:
            reasons.setdefault(skip.site, {})[name] = skip.reason
    folded, notes = [], []
    for name in _BN_PASSES:
        for row in results[name].details:
            row = {k: v for k, v in row.items() if k != "probe"}
            if row["how"] == "multiply-add":
                why = reasons.get(row["node"], {})
                row["note"] = "; ".join(f"{where}: {why[p]}" for where, p in
                                        (("before", _BN_PASSES[0]), ("after", _BN_PASSES[1])) if p in why)  # fmt: skip
            if row["node"] in errors:
                row["max_abs_error"], row["max_rel_error"] = errors[row["node"]]
                notes.append(f"{row['node']}: its variance is so small that folding magnifies float32 rounding "
                             f"{row['rounding_gain']:.3g}x; on the example input the result differs from the unfolded "
                             f"model's by up to {row['max_abs_error']:.3g} ({row['max_rel_error']:.3g} relative)")  # fmt: skip
            folded.append(row)
    # A BN left by the last pass was left by all of them; the last one's reason is the one that counts.
    remaining = [{"node": n, "reason": list(reasons.get(n, {"": "no pass matched it"}).values())[-1]} for n in left]
    ops = [{"op": op, "before": before[op], "after": after[op]} for op in sorted(before.keys() | after.keys())]
    passes = [{"pass": name, "changed": len(r.changed), "skipped": len(r.skipped)} for name, r in results.items()]
    if not batch_norms:
        notes.append("nothing to fold: the model has no BatchNorm")
    facts = {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "batchnorms_before": batch_norms,
        "batchnorms_after": len(left),
    }
    sections = {"folded": folded, "remaining": remaining, "ops": ops, "passes": passes}
    return Report("bngraph fold", sections=sections, facts=facts, notes=notes)


__all__ = ["FOLD_PASSES", "TIDY_PASSES", "fold", "fold_report"]
