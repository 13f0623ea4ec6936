"""`bngraph fold` on a PyTorch model: each BatchNorm merged into a neighbouring linear map.

    folded, report = fold(model, example_inputs)   # a GraphModule in eval mode, and the report
    folded, report = fold_artifact(loaded, "out/")   # what the command runs: folded and saved

Paper, Algorithm 2 step 3: in eval mode a BN is a fixed affine map per channel, so it folds
into the conv or linear that feeds it, else into the one it feeds where that is exact, else it
becomes one multiply-add. The passes run on a traced copy in eval mode; the model handed in is
left as it is. BatchNorms that are not fixed maps are left, each with its reason. An ONNX file
is folded by `bngraph.onnx_fold`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import torch
from torch import fx, nn

from bngraph.artifact_code import edited_base, edited_source, fallback_source, user_code, user_files
from bngraph.artifacts import history_entry, save
from bngraph.compare import fold_tolerance
from bngraph.equivalence import Reference
from bngraph.library_call import library_call
from bngraph.load import LoadedModel
from bngraph.passes.base import PassResult, run_passes
from bngraph.passes.cancel_inverse_permutes import cancel_inverse_permutes
from bngraph.passes.fold_bn_into_following_layer import fold_bn_into_following_layer
from bngraph.passes.fold_bn_into_producer_module import fold_bn_into_producer_module
from bngraph.passes.fold_bn_into_preceding_layer import fold_bn_into_preceding_layer
from bngraph.errors import CheckFailed, UserError, one_line, running_user_model
from bngraph.fold_reach import fold_inside_hooked_modules, fold_inside_kept_whole, opaque_batch_norms, unused_batch_norms
from bngraph.fold_untraced import FALLBACK, ROW_ONLY, fold_untraced, probed_notes, source_edits
from bngraph.passes._bn_affine import PRECISION_LOSS_GAIN, rounding_gain
from bngraph.runners import buffers_kept, eval_mode, fresh_inputs
from bngraph.passes._fx_batchnorm import is_batch_norm, read_batch_norm
from bngraph.passes._op_kinds import op_label
from bngraph.passes.remove_dead_code import remove_dead_code
from bngraph.passes.remove_eval_identities import remove_eval_identities
from bngraph.passes.replace_bn_with_multiply_add import replace_bn_with_multiply_add
from bngraph.report import Report
from bngraph.partial_trace import kept_whole_modules, trace_for_insert
from bngraph.trace import (
    TraceFailed, check_faithful_trace, check_model, copy_module, keep_what_its_data_means, left_out_of_the_graph,
    materialize_lazy, trace, trace_and_run,
)

# In order: the layer before a BN is the first choice (no constraint on padding), the layer
# after it the second, a multiply-add the last. Identities go first, as they can stand between
# a layer and its BN.
FOLD_PASSES = (remove_eval_identities, fold_bn_into_preceding_layer, fold_bn_into_following_layer,
               replace_bn_with_multiply_add)
TIDY_PASSES = (cancel_inverse_permutes, remove_dead_code)
_BN_PASSES = (fold_bn_into_preceding_layer.__name__, fold_bn_into_following_layer.__name__,
              replace_bn_with_multiply_add.__name__, fold_bn_into_producer_module.__name__)


# What a BN no layer can take becomes: one multiply-add (the default: exact, and no BN kernel is
# left), or kept as it is, for `bngraph export`, whose ONNX passes pick the form per target
# (`bngraph.onnx_fold.STANDALONE_BN_FORMS`) and may still fold it (moved before a max pool).
STANDALONE_BN_FORMS = ("multiply-add", "keep")
KEPT_REASON = "kept as BatchNorm (standalone_bn='keep'): no layer can take it exactly"


@library_call
def fold(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], *, standalone_bn: str = "multiply-add",
    inside_hooked_modules: bool = True,
) -> tuple[fx.GraphModule, Report]:
    """`module` in eval mode with its BatchNorms folded, and the report.

    `standalone_bn` (one of STANDALONE_BN_FORMS) is what a BN with no exact fold becomes; a BN
    kept that way is a fixed map listed under `kept`, not `remaining`. `inside_hooked_modules`
    False leaves the BNs inside a module with hooks as they are (`fold_artifact`: an artifact's
    model.py rebuilds such a module from the user's code, which holds no fold).

    Checked twice against `module` in eval mode (`bngraph.equivalence`, on the example input and
    a batch of another size): the trace must compute what the model computes (else
    `TraceUnfaithful`, a UserError), and so must the folded graph (else `CheckFailed`), within
    verify's tolerance widened only where a fold is flagged for precision (`fold_tolerance`).
    Where torch.fx stops inside a submodule, the graph is insert's partial trace around it, and
    the BNs inside the submodule kept whole are folded module by module
    (`fold_bn_into_producer_module`); where it stops in the model's own forward, every BN is
    (`fold_untraced`).
    `report.passes` keeps each pass's `PassResult`, for an artifact's history. The checks run the
    model; a buffer its forward writes (a counter) is as it was, in `module` and in the result.
    """
    check_model(module, "fold", example_inputs)
    if standalone_bn not in STANDALONE_BN_FORMS:  # export's and the ONNX fold's names are for a file's nodes
        raise UserError(f"standalone_bn is one of {', '.join(STANDALONE_BN_FORMS)} for a PyTorch model (export's "
                        f"'mul-add' and 'batchnorm' name the ONNX forms), not {standalone_bn!r}")
    with buffers_kept(module) as moved:
        folded, report = _fold(module, example_inputs, standalone_bn, inside_hooked_modules)
    # What the model's forward writes (a counter), the checks moved in the result's copy too: as
    # it was. Only those: a buffer the forward reads (a fixed filter) may hold a folded weight now.
    bns = {p for p, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    written = {name: value for name, value in moved.items() if name.rpartition(".")[0] not in bns}
    with torch.no_grad():
        for name, buffer in folded.named_buffers():
            if name in written and buffer.shape == written[name].shape and buffer.dtype == written[name].dtype:
                buffer.copy_(written[name])
    keep_what_its_data_means(module, folded)
    return folded, report


def _fold(module: nn.Module, example_inputs: Sequence[torch.Tensor], standalone_bn: str,
          inside_hooked_modules: bool) -> tuple[fx.GraphModule, Report]:
    opaque_notes, trace_failure, kept_whole = [], None, []
    if training := batch_norms_training_in_eval(module, example_inputs):
        # A graph module's eval() sets every submodule's mode, past the model's own train() (a
        # test-time adaptation model keeps its BNs training) and what its forward sets: only the
        # model itself, copied, does in eval mode what it does for its user.
        return fold_untraced(module, example_inputs, f"the model keeps {', '.join(training)} in training mode "
                             "when it is in eval mode, which a traced graph would not")
    try:
        # An eval-mode copy (`module` is never changed), and its output from the run that recorded the
        # shapes, which the faithfulness check takes instead of running the graph again.
        gm, traced_output = trace_and_run(module, example_inputs, training=False)
        reference = Reference(module, example_inputs)  # the model's outputs, for every check below
        check_faithful_trace(module, gm, example_inputs, reference=reference, output=traced_output)
    except TraceFailed as err:
        # Where a submodule stops torch.fx (HF ViT's embeddings, kept opaque by insert), the graph
        # insert traces around it, checked as faithful there; where none is, module by module.
        trace_failure = str(err)
        try:
            gm, kept_whole = trace_for_insert(module, example_inputs)
        except TraceFailed:  # what insert's module-level fallback writes, among others
            return fold_untraced(module, example_inputs, f"torch.fx could not trace the model ({err})")
        gm.eval()
        reference = Reference(module, example_inputs)
        opaque_notes = [f"traced partially, {len(kept_whole)} submodule(s) kept whole: "
                        f"{', '.join(o.module for o in kept_whole)}"] if kept_whole else []
    before, batch_norms = _op_counts(gm), len(_batch_norm_names(gm))
    unused = unused_batch_norms(module, gm)
    left_out = left_out_of_the_graph(module, gm, said=unused, in_eval=True)
    inside = opaque_batch_norms(gm)
    inner_rows, inner_left, done = fold_inside_hooked_modules(gm, example_inputs, fold) if inside_hooked_modules else ([], [], set())
    opaque = [*inner_left, *(row for row in inside if not row["node"].startswith(tuple(f"{t}." for t in done)))]
    gain = _largest_rounding_gain(gm)
    unfolded = _values_near_flagged(gm, example_inputs) if gain > PRECISION_LOSS_GAIN else {}
    passes = FOLD_PASSES if standalone_bn == "multiply-add" else FOLD_PASSES[:-1]
    gm, results = run_passes(gm, passes)
    errors = _measure_flagged(module, gm, results, example_inputs, unfolded)
    gm, tidied = run_passes(gm, TIDY_PASSES)
    results.update(tidied)
    leaves = kept_whole_modules(kept_whole)
    if leaves and any(row["node"].startswith(tuple(f"{p}." for p in leaves)) for row in opaque):
        gm, inside_results, inside_gain, opaque = fold_inside_kept_whole(gm, example_inputs, leaves, opaque)
        results.update(inside_results)
        gain = max(gain, inside_gain)
    tolerance = fold_tolerance(gain)
    reference.check(gm, what="the folded model", atol=tolerance, rtol=tolerance)
    report = fold_report(before, _op_counts(gm), batch_norms, _batch_norm_names(gm), results, errors, opaque,
                         kept=_fixed_batch_norm_names(gm) if standalone_bn == "keep" else ())
    report.sections["folded"][:0] = inner_rows
    report.notes += opaque_notes + reference.notes
    if unused:
        report.notes.append(f"{len(unused)} BatchNorm(s) the model holds are never called by its forward, so the "
                            f"folded model does not have them: {', '.join(unused)}")
    if left_out:
        report.notes.append(left_out)
    # Those folded inside hooked modules and inside the submodules kept whole count too.
    report.facts["batchnorms_before"] += len(inside) - len(opaque)
    if report.facts["batchnorms_before"]:
        report.notes = [n for n in report.notes if not n.startswith("nothing to fold")]
    report.passes = results
    if trace_failure is not None and report.facts["batchnorms_after"]:
        # Where BNs are left, folding the whole model module by module may reach more of them
        # (one whose layer is in the graph and whose BN is inside a submodule kept whole): the
        # result that leaves fewer.
        try:
            untraced, untraced_report = fold_untraced(module, example_inputs, f"torch.fx could not trace the model "
                                                      f"({trace_failure})", reference=reference)
        except CheckFailed:
            return gm, report
        if untraced_report.facts["batchnorms_after"] < report.facts["batchnorms_after"]:
            return untraced, untraced_report
    return gm, report


def batch_norms_training_in_eval(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """The BatchNorms of `module` that are in training mode when it is called in eval mode, as its
    user puts it there (`model.eval()`, through any train() override): run once, on a copy."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return []
    materialize_lazy(module, example_inputs)  # on the model itself, as tracing does: a copy's lazy layers stay lazy
    copy = copy_module(module)
    training: list[str] = []
    handles = [bn.register_forward_pre_hook(lambda m, args, path=path: training.append(path) if m.training else None)
               for path, bn in copy.named_modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad(), running_user_model():
            copy.eval()(*fresh_inputs(example_inputs))
    except (UserError, CheckFailed):
        raise
    except Exception as err:  # raised where no user code runs: an nn.Sequential, or the call itself (two inputs for one)
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        raise UserError(f"the model failed on its example input {shapes}: {one_line(err)}") from err
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(training))


def _largest_rounding_gain(gm: fx.GraphModule) -> float:
    modules, gains = dict(gm.named_modules()), [0.0]
    for node in gm.graph.nodes:
        try:
            site = read_batch_norm(node, gm, modules)
        except UserError:  # broken statistics: the passes say so, naming themselves
            continue
        if site is not None and site.stats is not None:
            gains.append(rounding_gain(site.stats))
    return max(gains)


def _fixed_batch_norm_names(gm: fx.GraphModule) -> set[str]:
    """The BNs of `gm` that are fixed affine maps (eval mode, constant statistics, no hooks)."""
    modules = dict(gm.named_modules())
    return {n.name for n in gm.graph.nodes if (site := read_batch_norm(n, gm, modules)) is not None and site.stats is not None}


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


# How far past a flagged BN the value a probe reads can be (its own, its layer's, the layer after it
# reached through a reshape or permute): kept from the unfolded graph before the passes run.
_PROBE_DEPTH = 3


def _values_near_flagged(gm: fx.GraphModule, example_inputs) -> dict[str, torch.Tensor]:
    """The unfolded graph's values on the example input at and just past each BN the passes
    will flag for precision (`PRECISION_LOSS_GAIN`): what `_measure_flagged` compares the
    folded graph with, without tracing the model again."""
    modules, names, frontier = dict(gm.named_modules()), set(), []
    for node in gm.graph.nodes:
        try:
            site = read_batch_norm(node, gm, modules)
        except UserError:
            continue
        if site is not None and site.stats is not None and rounding_gain(site.stats) > PRECISION_LOSS_GAIN:
            frontier.append(node)
    for _ in range(_PROBE_DEPTH + 1):
        names.update(n.name for n in frontier)
        frontier = [user for n in frontier for user in n.users if user.name not in names]
    capture = _Capture(gm, names)
    with torch.no_grad(), eval_mode(gm):
        capture.run(*(x.clone() for x in example_inputs))
    return capture.values


def _measure_flagged(
    model, gm, results: dict[str, PassResult], example_inputs, unfolded: dict[str, torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """For each fold flagged for precision, the largest abs and relative error it made on the
    example input, measured where its output is: the unfolded model's value (from `unfolded`,
    `_values_near_flagged`'s, else from the model traced again) vs the folded one's."""
    probes = {site: probe for r in results.values() for site, probe in r.probes.items()}
    if not probes:
        return {}
    with torch.no_grad():
        want = unfolded
        if not all(p.reference in unfolded for p in probes.values()):
            reference = trace(model, training=False)  # the same node names as the graph the passes started from
            capture = _Capture(reference, {p.reference for p in probes.values()})
            capture.run(*fresh_inputs(example_inputs))
            want = capture.values
        got = _Capture(gm, {p.folded for p in probes.values()})
        got.run(*fresh_inputs(example_inputs))
    errors = {}
    for bn, probe in probes.items():
        expected, actual = want[probe.reference].double(), got.values[probe.folded].double()
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
    opaque: Sequence[dict] = (),
    kept: Collection[str] = (),
) -> Report:
    """The report of a fold, from the op counts, the BatchNorms before and left, and the passes' results.

    A BN of `left` named in `kept` is a fixed map left on purpose (see `fold`'s `standalone_bn`):
    listed under `kept` with why no layer took it; `remaining` holds the others."""
    reasons: dict[str, dict[str, str]] = {}  # BN node -> pass -> why it left the BN alone
    ran = [name for name in _BN_PASSES if name in results]
    for name in ran:
        for skip in results[name].skipped:
            reasons.setdefault(skip.site, {})[name] = skip.reason
    folded, notes = [], []
    for name in ran:
        for row in results[name].details:
            row = {k: v for k, v in row.items() if k not in ROW_ONLY}  # the report's copy; edits go to model.py
            if row["how"] == "multiply-add":
                why = reasons.get(row["node"], {})
                row["note"] = "; ".join(f"{where}: {why[p]}" for where, p in
                                        (("before", _BN_PASSES[0]), ("after", _BN_PASSES[1])) if p in why)
            if row["node"] in errors:
                row["max_abs_error"], row["max_rel_error"] = errors[row["node"]]
                notes.append(f"{row['node']}: its variance is so small that folding magnifies float32 rounding "
                             f"{row['rounding_gain']:.3g}x; on the example input the result differs from the unfolded "
                             f"model's by up to {row['max_abs_error']:.3g} ({row['max_rel_error']:.3g} relative)")
            folded.append(row)
    # A BN left by the last pass was left by all of them; the last one's reason is the one that counts.
    remaining = [{"node": n, "reason": list(reasons.get(n, {"": "no pass matched it"}).values())[-1]}
                 for n in left if n not in kept]
    kept_rows = [{"node": n, "form": "BatchNorm", "reason": KEPT_REASON,
                  "note": "; ".join(f"{where}: {reasons.get(n, {})[p]}" for where, p in
                                    (("before", _BN_PASSES[0]), ("after", _BN_PASSES[1])) if p in reasons.get(n, {}))}
                 for n in left if n in kept]
    remaining += list(opaque)  # inside a module called as a whole: no pass saw them
    ops = [{"op": op, "before": before[op], "after": after[op]} for op in sorted(before.keys() | after.keys())]
    passes = [{"pass": name, "changed": len(r.changed), "skipped": len(r.skipped)} for name, r in results.items()]
    notes += probed_notes([row for name in ran for row in results[name].details])
    if not batch_norms and not opaque:
        notes.append("nothing to fold: the model has no BatchNorm")
    facts = {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "batchnorms_before": batch_norms + len(opaque),
        "batchnorms_after": len(left) + len(opaque),
        "batchnorms_kept": len(kept_rows),  # always there, as in the ONNX fold's: a script reads it
    }
    sections = {"folded": folded, "kept": kept_rows, "remaining": remaining, "ops": ops, "passes": passes}
    return Report("bngraph fold", sections=sections, facts=facts, notes=notes)


def fold_artifact(loaded: LoadedModel, output: str | None, *, force: bool = False) -> tuple[fx.GraphModule, Report]:
    """`bngraph fold`: `fold` on a loaded model spec, written as an artifact at `output` (None:
    only reported), its history extended by this fold and its report."""
    example_inputs = loaded.example_inputs()
    folded, report = fold(loaded.module, example_inputs, inside_hooked_modules=output is None)
    report.title = f"bngraph fold {loaded.spec.text}"
    if output is None:
        return folded, report
    history = [*loaded.history, {**history_entry("fold", report.passes), "report": report.to_json()}]
    code, base = None, user_code(loaded)
    if report.facts.get("tracing") == FALLBACK:  # no graph to write code from: the source plus edits
        code = edited_source(*fallback_source(loaded), source_edits(report), "fold")
    elif (edits := source_edits(report)) and base is not None:  # folds inside submodules kept whole
        base = edited_base(base, edits, "fold")
    save(folded, output, example_inputs=example_inputs, history=history, source=loaded.spec.text, force=force, code=code,
         base=base, carry=user_files(loaded))
    report.facts["output"] = output
    return folded, report


__all__ = ["FOLD_PASSES", "STANDALONE_BN_FORMS", "TIDY_PASSES", "fold", "fold_artifact", "fold_report"]
