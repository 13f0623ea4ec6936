"""`bngraph insert`: a BatchNorm before every nonlinearity (paper, Algorithm 1).

    bn_model, report = bngraph.insert(model, example_inputs)       # the Python API
    bn_model, report = insert_artifact(loaded, "out/", preserve=True)   # what the command runs

`insert` edits a copy in memory; `insert_artifact` runs it on a loaded model spec and writes the
artifact folder, with the code that rebuilds models torch.fx could only partly trace.
"""

from __future__ import annotations

from functools import partial
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bngraph.artifact_code import edited_base, fallback_source, user_code, user_files, wrap_edits, wrapped_source
from bngraph.artifacts import history_entry, save
from bngraph.data import model_images
from bngraph.equivalence import Reference
from bngraph.errors import CheckFailed, ModelNotAFunction, UserError, one_line
from bngraph.library_call import library_call
from bngraph.load import LoadedModel
from bngraph.partial_trace import Opaque, kept_whole_modules, nonlinearities_not_handled, trace_for_insert
from bngraph.passes.base import PassResult, pass_name, run_passes
from bngraph.passes.calibrate_bn_as_identity import CalibrateBnAsIdentity
from bngraph.passes.drop_bias_before_bn import drop_bias_before_bn
from bngraph.passes.insert_bn_before_activation import insert_bn_before_activation
from bngraph.passes.wrap_activation_modules import wrap_activation_modules
from bngraph.report import Report
from bngraph.runners import batch_axes_of, buffers_kept, random_tensor
from bngraph.trace import (TraceFailed, assert_argument_is_none, check_model, copy_module, keep_what_its_data_means,
                           left_out_of_the_graph, materialize_lazy)

FALLBACK = "module-level fallback"


def calibration_batches(example_inputs: Sequence[torch.Tensor], count: int = 4, batch: int = 16, seed: int = 0):
    """Random batches like the example input: its dtypes (floats N(0, 1) as the example itself,
    integers 0 or 1), the batch grown to `batch` only on inputs with a batch axis."""
    gen = torch.Generator().manual_seed(seed)
    axes = batch_axes_of(example_inputs)
    size = max([batch] + [x.shape[0] for x, axis in zip(example_inputs, axes) if axis == 0])
    shapes = [(size, *x.shape[1:]) if axis == 0 else tuple(x.shape) for x, axis in zip(example_inputs, axes)]
    return [
        tuple(random_tensor(shape, x.dtype, gen) for shape, x in zip(shapes, example_inputs)) for _ in range(count)
    ]


@library_call(refuse_inference_mode=True)
def insert(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    preserve: bool = False,
    calibration_data: Iterable[Sequence[torch.Tensor]] | None = None,
    fallback: bool = True,
) -> tuple[nn.Module, Report]:
    """A copy of `model` with a BatchNorm before every nonlinearity, and the report.

    `preserve=True` calibrates the new BatchNorms (on `calibration_data`, or random batches like
    the example input) so that the eval-mode model computes what `model` computed, which is
    checked (`bngraph.equivalence`; CheckFailed otherwise). Models that
    torch.fx cannot trace get the module-level fallback unless `fallback=False`, which also
    leaves the activation modules inside submodules a partial trace keeps whole (`not_handled`).
    """
    check_model(model, "insert", example_inputs, allow_none=True)
    # Every run of the model and its copies here is bngraph's: a counter its forward keeps (a
    # hook bound to the model writes the model's even from a copy) stays where the model had it.
    with buffers_kept(model):
        try:
            graph, report = _insert_into_a_copy(model, example_inputs, preserve, calibration_data, fallback)
        except _BiasesStillRead as err:
            graph, report = _insert_into_a_copy(model, example_inputs, preserve, calibration_data, fallback,
                                                drop_biases=False)
            report.notes.append(f"the biases before the new BatchNorms are kept: with them dropped, {err}")
    _keep_the_models_buffers(graph, model)
    keep_what_its_data_means(model, graph)
    return graph, report


class _BiasesStillRead(Exception):
    """Dropping the biases changed what the model computes: the model reads one elsewhere, where
    no graph shows it (a submodule kept whole that calls the layer through a list)."""


def _check_at_the_initial_state(model: nn.Module, inserted: nn.Module, bn_paths: Sequence[str],
                                example_inputs: Sequence[torch.Tensor]) -> str | None:
    """Raise CheckFailed unless `inserted` computes what `model` computes in eval mode, each new
    BatchNorm as insert made it with eps 0: then it is the identity (a dropped bias is carried in
    its running mean), so any difference is a change insert made that no BatchNorm explains. A
    note where the model cannot be checked (it computes something else at each call)."""
    exact = copy_module(inserted)
    for path in bn_paths:
        exact.get_submodule(path).eps = 0.0
    try:
        reference = Reference(model, example_inputs)
    except ModelNotAFunction:
        return "not checked against the model: it computes something else each time it runs on the same input"
    reference.check(exact, what="the model with BatchNorms inserted, each at its initial state")
    return None


def _insert_into_a_copy(model: nn.Module, example_inputs: Sequence[torch.Tensor], preserve: bool,
                        calibration_data, fallback: bool, drop_biases: bool = True) -> tuple[nn.Module, Report]:
    trace_failure, opaque = None, []
    materialize_lazy(model, example_inputs)  # on the model itself: see bngraph.trace.materialize_lazy
    left_out = None
    try:
        graph, opaque = trace_for_insert(model, example_inputs)
        insert_pass = insert_bn_before_activation
        left_out = left_out_of_the_graph(model, graph)
    except TraceFailed as err:
        if not fallback:
            raise
        graph, trace_failure = copy_module(model), str(err)
        insert_pass = partial(wrap_activation_modules, example_inputs=example_inputs)

    graph, results = run_passes(graph, [insert_pass])
    traced_bns = [row["bn"] for row in results[pass_name(insert_pass)].details]
    leaves = kept_whole_modules(opaque)
    if leaves and fallback:
        # The activation modules inside the submodules kept opaque run there, not in the graph:
        # they are wrapped by running the model, as the fallback wraps a whole model's.
        wrap_inside = partial(wrap_activation_modules, example_inputs=example_inputs, within=leaves)
        graph, inner = run_passes(graph, [wrap_inside])
        results.update(inner)
    bn_paths = [row["bn"] for result in results.values() for row in result.details]
    passes = []
    if preserve and bn_paths:
        batches = calibration_batches(example_inputs) if calibration_data is None else \
            _checked_batches(calibration_data, len(example_inputs))
        passes.append(CalibrateBnAsIdentity(bn_paths, batches))
    if trace_failure is None and traced_bns and drop_biases:  # the biases in front of wrapped ones are kept: no graph proves them redundant
        passes.append(partial(drop_bias_before_bn, only=traced_bns))
    graph, more = run_passes(graph, passes)
    results.update(more)
    # The passes ran the copy in train mode (shapes, feature axes): a buffer its forward moves
    # there (spectral_norm's power iteration) would make the check compare two states of the model.
    _keep_the_models_buffers(graph, model)
    checked = []
    if preserve:  # the promise of --preserve, checked before anything is returned or written
        reference = Reference(model, example_inputs)
        reference.check(graph, what="the model with BatchNorms inserted (--preserve)")
        checked = reference.notes
    elif bn_paths:  # checked too: a BatchNorm at its start is the identity but for its eps
        dropped = results.get(drop_bias_before_bn.__name__)
        try:
            note = _check_at_the_initial_state(model, graph, bn_paths, example_inputs)
        except Exception as err:  # a difference, or a model that raised without the bias it reads
            if dropped is None or not dropped.changed:
                raise
            raise _BiasesStillRead(one_line(err) if not isinstance(err, CheckFailed) else str(err)) from None
        checked = [note] if note else []
    not_handled = []
    if trace_failure is None:
        not_handled = _left_inside(nonlinearities_not_handled(graph, example_inputs, opaque),
                                   results.get(wrap_activation_modules.__name__))
    report = insert_report(results, trace_failure, opaque=opaque, not_handled=not_handled)
    report.notes += checked + ([left_out] if left_out else [])
    return graph, report


def _keep_the_models_buffers(inserted: nn.Module, model: nn.Module) -> None:
    """Each buffer the result shares with the model holds the model's value: bngraph's runs of its
    copies (the trace, the passes, the checks) moved a counter its forward keeps, in a submodule
    kept whole. insert adds BatchNorms; it never changes a buffer the model had."""
    own = {name: b for name, b in model.named_buffers() if not isinstance(b, nn.parameter.UninitializedBuffer)}
    with torch.no_grad():
        for name, buffer in inserted.named_buffers():
            if (mine := own.get(name)) is not None and buffer is not mine and buffer.shape == mine.shape \
                    and buffer.dtype == mine.dtype:
                buffer.copy_(mine)


def _left_inside(not_handled: list[dict], wrapped: PassResult | None) -> list[dict]:
    """The nonlinearities inside leaves less those `wrapped` (the pass that wrapped activation
    modules inside opaque submodules), each with the reason that pass gave for leaving it."""
    if wrapped is None:
        return not_handled
    acts = [f"{path}.act" for path in wrapped.changed]  # Sequential(bn=..., act=<the module>)
    left = []
    for row in not_handled:
        if any(row["module"] == act or row["module"].startswith(f"{act}.") for act in acts):
            continue
        why = [s.reason for s in wrapped.skipped if s.site == row["module"] or s.site.startswith(f"{row['module']}:")]
        left.append({**row, "reason": "; ".join([*why[:1], row["reason"]])})
    return left


def _checked_batches(calibration_data, inputs: int) -> Iterator[Sequence[torch.Tensor]]:
    """`calibration_data`'s batches, each checked as it comes (a DataLoader's are read once): a
    list of the forward's `inputs` tensors. A DataLoader's (x, y) pairs reached the forward as
    two inputs, a single tensor raised "Boolean value of Tensor ... is ambiguous", numpy batches
    a conv2d signature dump, and no batch at all calibrated nothing without a word."""
    if isinstance(calibration_data, (torch.Tensor, np.ndarray)):
        raise UserError("calibration_data is one tensor: give a list of batches, each a list of the forward's inputs: "
                        "[[x1], [x2]]")

    def checked():
        count = 0
        for count, batch in enumerate(calibration_data, 1):
            if not isinstance(batch, (list, tuple)):
                raise UserError(f"calibration batch {count - 1} is a {type(batch).__name__}: give each batch as a list "
                                "of the forward's input tensors, [x]")
            if not all(isinstance(t, torch.Tensor) for t in batch):
                wrong = next(t for t in batch if not isinstance(t, torch.Tensor))
                raise UserError(f"calibration batch {count - 1} holds a {type(wrong).__name__}: give each batch as a "
                                "list of the forward's input tensors, [x]")
            if len(batch) != inputs:
                pairs = " (a DataLoader's (x, y) pairs: give [x] batches, [[x] for x, _ in loader])" if len(batch) == 2 else ""
                raise UserError(f"calibration batch {count - 1} holds {len(batch)} tensors; the forward takes {inputs}{pairs}")
            yield batch
        if count == 0:
            raise UserError("calibration_data holds no batch: give at least one, or leave it out for random batches")

    return checked()


def insert_report(
    results: dict[str, PassResult],
    trace_failure: str | None = None,
    *,
    opaque: Sequence[Opaque] = (),
    not_handled: Sequence[dict] = (),
) -> Report:
    """`opaque`: submodules partial tracing kept as one call; `not_handled`: nonlinearities the
    model runs that no BatchNorm was considered for (inside leaves), each with its reason."""
    first = next(iter(results.values()))
    # After a partial trace, what was wrapped inside opaque submodules; what it left is in `not_handled`.
    inside = results.get(wrap_activation_modules.__name__) if trace_failure is None else None
    dropped = results.get(drop_bias_before_bn.__name__)
    dropped_at = set(dropped.changed) if dropped else set()
    inserted = [
        {
            "node": row["node"],
            "activation": row["activation"],
            "norm": row["norm"],
            "features": row["features"],
            "axes": row.get("axis", ""),
            "bias_removed": row["bn"] in dropped_at,
            "bn": row["bn"],
        }
        for row in [*first.details, *(inside.details if inside else ())]
    ]
    skipped = [{"node": s.site, "reason": s.reason} for s in first.skipped]
    for name, result in results.items():
        if result is not first and result is not inside:
            skipped += [{"node": s.site, "reason": f"{name}: {s.reason}"} for s in result.skipped]
    notes = []
    if opaque:
        notes.append(f"traced partially: {len(opaque)} submodule(s) kept opaque (see 'opaque')")
    if trace_failure is None and (fixed := _fixed_in_the_graph(first.graph)):
        shown = ", ".join(fixed[:6]) + (f" and {len(fixed) - 6} more" if len(fixed) > 6 else "")
        notes.append(f"the traced forward takes {shown} only at these values, as the example's call left them: "
                     "another value raises")
    already = [s for s in skipped if s["reason"].startswith("input already normalized")]
    already_inside = [r for r in not_handled if r.get("input_normalized") is True]
    left_inside = len(not_handled) - len(already_inside)
    if not inserted and not left_inside:
        if len(already) < len(skipped):  # some got none for another reason: not "nothing needed"
            notes.append(f"nothing changed: {len(skipped) - len(already)} nonlinearities got no BatchNorm (see 'skipped' for why)")
        else:
            notes.append("nothing changed: no nonlinearity needs a BatchNorm"
                         + (" (already inserted?)" if already or already_inside else ""))
    elif left_inside:
        notes.append(f"{left_inside} nonlinearities run inside submodules kept whole, on an input no norm made, and got "
                     "no BatchNorm (see 'not_handled' for why)")
    if inside and inside.changed:
        notes.append(f"{len(inside.changed)} activation module(s) inside submodules kept opaque got a BatchNorm by "
                     "running the model (the module-level fallback); the biases before them are kept")
    for row in first.details:
        if row.get("unnormalized_readers"):
            readers = ", ".join(row["unnormalized_readers"])
            notes.append(
                f"{row['node']}: its input also reaches {readers} unnormalized, in the same forward: counted as "
                f"{row['activation']} and arithmetic (a skip, or x * sigmoid(x) written inline); to put one BN in "
                "front of all of it, write it as a function or an activation module"
            )
    if trace_failure is not None:
        notes.append(f"used the {FALLBACK} ({trace_failure}); biases before the new BatchNorms are kept")
    return Report(
        "bngraph insert",
        sections={
            "inserted": inserted,
            "skipped": skipped,
            "opaque": [{"module": o.module, "type": o.type, "reason": o.reason} for o in opaque],
            "not_handled": list(not_handled),
        },
        facts={"tracing": "torch.fx" if trace_failure is None else FALLBACK, "changed": bool(inserted)},
        notes=notes,
        passes=results,
    )


def _fixed_in_the_graph(gm) -> list[str]:
    """The forward's arguments past the example inputs, which the trace fixed at their defaults
    (`mask=None`, `temperature=1.0`; a graph's guard refuses another value): `name=value` each."""
    if not isinstance(gm, torch.fx.GraphModule):
        return []

    def guarded(node) -> bool:  # fx's guard of a fixed argument: an assert on it, not a computation
        return any(user.target is assert_argument_is_none or any(u.target is torch._assert for u in user.users)
                   for user in node.users)

    return [f"{node.target}={node.args[0]!r}" for node in gm.graph.nodes
            if node.op == "placeholder" and node.args and guarded(node)]


def data_calibration_batches(path: str, example_inputs: Sequence[torch.Tensor], count: int = 8, batch: int = 64):
    """`count` batches of `batch` random training images of any data `bngraph train` reads (an
    image folder decoded to the model's channels and size), for --preserve --data."""
    gen = torch.Generator().manual_seed(0)
    shapes = [x.shape for x in example_inputs]
    dtype = example_inputs[0].dtype
    images = model_images(path, shapes, "train", lambda n: torch.randperm(n, generator=gen)[: count * batch], dtype)
    images = images.to(dtype)
    return [(images[i : i + batch],) for i in range(0, len(images), batch)]


def insert_artifact(
    loaded: LoadedModel,
    output: str | None,
    *,
    preserve: bool = False,
    data: str | None = None,
    fallback: bool = True,
    force: bool = False,
) -> tuple[nn.Module, Report]:
    """`bngraph insert`: `insert` on a loaded model spec, written as an artifact at `output`
    (None: only reported). `data` (any data `bngraph train` reads) calibrates --preserve's BNs."""
    if data and not preserve:
        raise UserError("--data is the calibration data of --preserve; add --preserve")
    example_inputs = loaded.example_inputs()
    calibration = data_calibration_batches(data, example_inputs) if data else None
    model, report = insert(
        loaded.module, example_inputs, preserve=preserve, calibration_data=calibration, fallback=fallback
    )
    report.title = f"bngraph insert {loaded.spec.text}"
    if output is None:
        return model, report
    code, base = None, user_code(loaded)
    wrapped = report.passes.get(wrap_activation_modules.__name__)
    if report.facts["tracing"] == FALLBACK:
        code = wrapped_source(*fallback_source(loaded), wrapped.details)
    elif wrapped and wrapped.details and base is not None:  # inside submodules kept opaque, from the user's code
        base = edited_base(base, wrap_edits(wrapped.details), "insert")
    entry = {**history_entry("insert", report.passes), "preserve": preserve, "data": data, "report": report.to_json()}
    history = [*loaded.history, entry]
    # Layers kept opaque, and the user's own functions and classes, come from the user's code.
    save(model, output, example_inputs=example_inputs, history=history, source=loaded.spec.text, code=code,
         base=base, carry=user_files(loaded), force=force)
    report.facts["output"] = output
    return model, report


__all__ = ["calibration_batches", "insert", "insert_artifact", "insert_report"]
