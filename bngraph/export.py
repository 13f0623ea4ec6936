"""nn.Module -> a verified .onnx file: FX fold, torch.onnx.export, the ONNX passes, verification.

    result = export(model, example_inputs, "model.onnx")
    if not result:                 # verification failed: no file was written
        print(result.verification.worst.line())

1. The model is folded by our FX passes (`bngraph.fold`).
2. torch.onnx.export with the torch.export-based exporter (dynamo=True), opset OPSET, a
   dynamic batch axis and the model in eval mode; the exporter's optimizer stays off unless
   asked for, so what ends up in the file is what our passes wrote.
3. The ONNX passes (`bngraph.onnx_fold`) fold whatever BN the FX fold could not reach, and
   constant-fold the exporter's leftovers. A BN that no layer can take exactly (after a max
   pool, before a zero-padded conv, on a conv output another op reads) is left alone by the FX
   fold, so that the ONNX passes write it in the form fastest for the target (`standalone_bn`,
   a key of `bngraph.onnx_fold.STANDALONE_BN_FORMS`: kept as BatchNormalization by default,
   listed under `onnx_kept`); a BN still left otherwise is in training mode: an error.
4. The file is written aside, verified against the unfolded model in onnxruntime at batch 1
   and an odd batch, and renamed into place only if it passes.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch
from torch import nn
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.printers import PythonPrinter

from bngraph.atomic import ONNX, check_output, refuse_empty_output
from bngraph.attention_math import attention_as_math
from bngraph.errors import CheckFailed, ModelNotAFunction, ModelRaised, UserError, one_line, running_user_model
from bngraph.fold import batch_norms_training_in_eval
from bngraph.fold import fold as fx_fold
from bngraph.library_call import library_call
from bngraph.onnx_fold import STANDALONE_BN_FORMS, fold_onnx
from bngraph.onnx_io import write_verified
from bngraph.passes._fx_batchnorm import batch_statistics
from bngraph.passes.fold_bn_into_producer_module import TRAINING_IN_EVAL
from bngraph.report import Report
from bngraph.trace import check_model, raise_if_model_raises
from bngraph.runners import (
    BATCH_SIZES, batch_axes_of, buffers_kept, eval_mode, example_batches, forward_parameter_names, fresh_inputs,
    named_leaves, named_tensors, unbatched_note, unbatched_sizes,
)
from bngraph.compare import VerifyResult

# The newest opset that every onnxruntime pyproject admits (>= 1.20) runs; torch's default is 20.
OPSET = 21


@dataclass
class ExportResult:
    path: Path | None  # None when verification failed and nothing was written
    verification: VerifyResult
    report: Report

    def __bool__(self) -> bool:
        return bool(self.verification)


def _as_the_forward_takes_them(module: nn.Module, shapes: tuple) -> tuple:
    """`shapes`, one per input, in the structure torch.export reads from the forward's signature:
    the inputs a `*args` takes (a user's `forward(self, *xs)`, `_TensorOutputs`) as one tuple."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return shapes
    star = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_POSITIONAL), None)
    return shapes if star is None or star >= len(shapes) else (*shapes[:star], tuple(shapes[star:]))


# verify's batches and an even one: the file claims every batch size, and a forward that branches
# on the batch's parity (`if x.shape[0] % 2 == 0`) was exported with the example's branch alone
# (the exporter turns that guard into a runtime assert, which ONNX drops), checked on odd batches.
EXPORT_BATCH_SIZES = (*BATCH_SIZES, 2)


def _refuse_unequal_batches(example_inputs: Sequence[torch.Tensor], axes: Sequence[int | None]) -> None:
    """The file gives every input with a batch axis one dynamic batch: inputs whose examples differ
    there (a query of 1 and a memory of 2) were exported tied to one size, and computed another
    shape than the model without a word (a batch of 1 is exported as 2, so torch saw two equal)."""
    batched = [(i, x.shape[0]) for i, (x, axis) in enumerate(zip(example_inputs, axes)) if axis == 0]
    if len({size for _, size in batched}) > 1:
        sizes = ", ".join(f"input {i}: {size}" for i, size in batched)
        raise UserError(f"the example inputs have different batch sizes ({sizes}); the exported file gives all "
                        "inputs with a batch axis one dynamic batch: give them one batch size, or name those "
                        "without a batch axis (--static-input INDEX)")


def to_onnx(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    exporter_optimize: bool = False,
    batch_axes: Sequence[int | None] | None = None,
    notes: list[str] | None = None,
    original: nn.Module | None = None,
):
    """torch.onnx.export (dynamo=True) with a dynamic batch axis; returns the onnx_ir.Model.

    `original` is the model as the user wrote it, which `module` (its FX fold) was made from:
    run at other batch sizes where the export fails or assumes something of the batch, since
    the fold's graph holds guards of its own (default: `module`).

    Where the exporter fails on its own decomposition of scaled_dot_product_attention, the
    export runs again with the attention written out (`bngraph.attention_math`), and a line
    saying so goes to `notes`."""
    # torch.export specializes a dimension of size 1, so a batch-1 example would fix the
    # batch at 1: repeat it to 2 (the values do not matter, only the shapes are traced).
    # Only inputs with a batch axis get the dynamic dimension (`bngraph.runners.batch_axes_of`):
    # a (T, T) mask or a 0-d input keeps its shape.
    axes = batch_axes_of(example_inputs, batch_axes)
    inputs = tuple(
        x.repeat(2, *([1] * (x.dim() - 1))) if axis == 0 and x.shape[0] == 1 else x
        for x, axis in zip(example_inputs, axes)
    )
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} if axis == 0 else None for axis in axes)
    declared = forward_parameter_names(module)
    input_names = declared[: len(inputs)] if len(declared) >= len(inputs) else None  # `_TensorOutputs` takes *inputs
    module, output_names, left_out = _with_known_outputs(module, example_inputs, declared)
    if left_out and notes is not None:  # silent, a file with one output of three passed verify
        notes.append(f"the model's output(s) {', '.join(repr(w) for w in left_out)} are numbers or strings, not "
                     "tensors: the file holds its tensors only, and verify compares those")
    dynamic_shapes = _as_the_forward_takes_them(module, dynamic_shapes)
    # The exporter prints progress, logs a warning per missing torchvision op and, when it fails,
    # dumps the graph with colour codes: none of it is our report. All of it goes to a log that
    # is kept, and named in the one error line, only when the export fails.
    def run_exporter():
        with eval_mode(module), _output_captured_in(log):
            return torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                optimize=exporter_optimize,
                opset_version=OPSET,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,  # as verify names them: 'logits', not 'linear_12'
                verbose=False,
            )

    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        try:
            try:
                program = run_exporter()
            except Exception as err:
                if not _ATTENTION_VIEW_BUG.search(_root_cause(err)):
                    raise
                with attention_as_math():
                    program = run_exporter()
                if notes is not None:
                    notes.append(f"exported with scaled_dot_product_attention written as matmuls and a softmax: the "
                                 f"exporter's own decomposition of it fails ({_root_cause(err)}; pytorch/pytorch#136543)")
        except Exception as err:
            if (stop := _interrupt_within(err)) is not None:  # the exporter wrapped Ctrl-C or SIGTERM
                raise stop from None  # as stopped: no log kept, no "could not export"
            raise_if_model_raises(module, example_inputs)
            _raise_if_batch_fixed(original or module, example_inputs, axes)
            _raise_if_branching_on_the_batch(err, example_inputs, axes)
            _refuse_unequal_batches(example_inputs, axes)  # torch's "L['kv'].size()[0] = 5 is not equal to ..."
            saved = _keep_export_log(log, err)
            scripted = next((name for name, m in module.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
            hint = ("" if scripted is None else f"; {scripted or 'the model'} is a TorchScript module, which torch.export "
                    "cannot take: export the model with its Python modules")
            raise UserError(
                f"torch.onnx.export could not export {type(module).__name__}: {_root_cause(err)}{hint} "
                f"(the exporter's full log: {saved})"
            ) from err
    _refuse_unequal_batches(example_inputs, axes)  # a batch of 1 beside another: exported as one batch of 2
    _raise_if_exported_batch_fixed(program.model, axes)
    _refuse_guards_on_the_batch(program.exported_program, original or module, example_inputs, axes)
    return program.model


def _check_exported(model) -> None:
    """One line where the exporter wrote a file that onnx's checker refuses, before the passes
    (whose own check ended in a traceback): a bfloat16 model's Conv, a type ONNX's Conv lacks."""
    import onnx  # here, as the exporter imports it
    import onnx_ir as ir

    try:
        onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        hint = (": export the model in float32 (model.float()) or float16" if "bfloat16" in str(err) else "")
        raise UserError(f"torch.onnx.export wrote a file that onnx's checker refuses ({one_line(err)}){hint}") from err
    except ValueError:  # over protobuf's 2 GiB in one message: the passes check it from a file
        pass


def _raise_if_exported_batch_fixed(model, axes: Sequence[int | None]) -> None:
    """Where the exporter wrote a number for a batch axis it was told is dynamic: the forward
    turned the batch size into a Python int (`len(x)`, `int(x.shape[0])`, a loop over it), and
    the file would take that one batch size only. Said here, not as onnxruntime's error on the
    first other batch."""
    inputs = list(model.graph.inputs)
    if len(inputs) != len(axes):
        return
    for i, (value, axis) in enumerate(zip(inputs, axes)):
        if axis == 0 and value.shape is not None and len(value.shape) and isinstance(value.shape[0], int):
            raise UserError(
                f"torch.onnx.export fixed the batch of input {value.name!r} at {value.shape[0]}: the forward reads the "
                f"batch size as a Python number (len(x), int(x.shape[0]), a loop over it), which the export made a "
                f"constant; nothing was written. To export it at its example's batch only, add --static-input {i}"
            )


# The batch sizes at which what torch.export assumed of the batch is tried: an assumption that
# holds at all of them is taken for no branch (the model is run at the size that breaks one, and
# a larger batch of a large model would take minutes and gigabytes).
_SIZES_TRIED = (*range(2, 130), 255, 256, 257)


def _refuse_guards_on_the_batch(program: torch.export.ExportedProgram, model: nn.Module, example_inputs,
                                axes: Sequence[int | None]) -> None:
    """Where torch.export kept one branch of a forward that branches on the batch size, it
    assumed the batch to be in a range (`if x.shape[0] >= 8:` at a batch of 2: at most 7), or
    recorded a runtime assertion (`if x.shape[0] % 2:`, `!= 5`). The ONNX file keeps neither: it
    takes every batch and computes that branch for all of them, right at the sizes verify tries
    and wrong at others. An assumption is a branch where `model`, the user's own, runs at a batch
    that breaks it; where it raises there, it is the model's own check (`torch._check(batch <=
    16384)`, Llama's `assert bsz <= max_batch_size`), and the file is right wherever the model runs."""
    batch_symbols = {}
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    for name, axis in zip(program.graph_signature.user_inputs, axes):
        value = placeholders[name].meta.get("val") if name in placeholders else None
        if axis == 0 and isinstance(value, torch.Tensor) and value.dim() and isinstance(value.shape[0], torch.SymInt):
            batch_symbols[value.shape[0].node.expr] = value.shape[0].node.shape_env

    def ties_sizes(expr) -> bool:  # two inputs' batches are one (`x + y`): the file's contract, not a branch
        return getattr(expr, "rel_op", None) == "==" and all(arg.is_Symbol for arg in expr.args)

    def broken_at(expr, symbol) -> int | None:
        # The first size from 2 that breaks an assertion, or None: torch.export's own premise,
        # that a dynamic size is not 0 or 1 (GPT-2's `batch != 1`), breaks at none of them, and
        # batch 1 is one that verify runs. Tried on sizes, not proven: a branch at 300 passes.
        return next((size for size in _SIZES_TRIED if expr.xreplace({symbol: sympy.Integer(size)}) is not sympy.true),
                    None)

    assumed = {}  # what torch.export assumed -> a batch size that breaks it
    for symbol, shape_env in batch_symbols.items():
        known = program.range_constraints.get(symbol)
        if known is not None and known.lower > 2:  # a dynamic size is 2 at least
            assumed[f"batch >= {known.lower}"] = int(known.lower) - 1
        if known is not None and known.upper != int_oo:
            assumed[f"batch <= {known.upper}"] = int(known.upper) + 1
        for check in (c for checks in shape_env.deferred_runtime_asserts.values() for c in checks):
            if symbol in check.expr.free_symbols and not ties_sizes(check.expr):
                if (size := broken_at(check.expr, symbol)) is not None:
                    assumed[re.sub(rf"\b{symbol}\b", "batch", PythonPrinter().doprint(check.expr))] = size
    branches = [what for what, size in assumed.items()
                if size <= _SIZES_TRIED[-1] and _runs_at_batch(model, example_inputs, axes, size)]
    if branches:
        raise _branches_on_the_batch(f"(torch.export assumed {' and '.join(branches)})", example_inputs, axes)


def _runs_at_batch(model: nn.Module, example_inputs, axes: Sequence[int | None], size: int) -> bool:
    """Whether `model` runs, in eval mode, on its example's rows repeated to batch `size`."""
    inputs = [x[torch.arange(size) % x.shape[0]] if axis == 0 else x.clone() for x, axis in zip(example_inputs, axes)]
    try:
        with torch.no_grad(), eval_mode(model):
            model(*inputs)
    except Exception:  # noqa: BLE001 (the user's model, at a size it may refuse)
        return False
    return True


def _branches_on_the_batch(where: str, example_inputs, axes: Sequence[int | None]) -> UserError:
    """The one line for a forward that branches on the batch size (`where`: the branch or what
    the exporter assumed of it): the file would hold the example's branch for every batch."""
    batched = [i for i, axis in enumerate(axes) if axis == 0]
    every = ", ".join(f"--static-input {i}" for i in batched)
    size = example_inputs[batched[0]].shape[0]
    return UserError(f"the forward branches on the batch size {where}, and an ONNX file with a dynamic batch would "
                     f"compute batch {size}'s branch for every batch; nothing was written. To export it at batch "
                     f"{size} only, add {every}")


# The guard `bngraph.trace` puts where a forward branched on a shape, as torch.export names the
# node it failed in: its last argument is where the branch is in the user's code.
_SHAPE_GUARD = re.compile(r"target=bngraph\.trace\.check_traced_(?:shapes|length)\]\(args = \(.*, (.+?)\), kwargs")


def _raise_if_branching_on_the_batch(err: BaseException, example_inputs, axes: Sequence[int | None]) -> None:
    """After a failed export: where the exporter failed in the guard of a branch on a shape, the
    branch depends on the batch, the one dynamic size (torch's own message there is sympy's
    "BooleanAtom not allowed in this context")."""
    found = _SHAPE_GUARD.search("".join(traceback.format_exception(err)))
    if found is not None and 0 in axes:
        raise _branches_on_the_batch(f"at {found[1]}", example_inputs, axes) from err


# What torch.onnx.export raises when its decomposition of scaled_dot_product_attention gives the
# output other strides than the kernel did (`bngraph.attention_math`).
_ATTENTION_VIEW_BUG = re.compile(r"Cannot view a tensor with shape .* and strides .* as a tensor with shape")


def _raise_if_batch_fixed(module: nn.Module, example_inputs, axes: Sequence[int | None]) -> None:
    """After a failed export: where the model itself runs at its example's batch size and at no
    other (`x.view(1, -1)`), say so, with the way to export it at that size, or, where it runs
    with one input left as it is (a (T, T) mask), name that input. Only on a failure path, so a
    model that exports is never run again."""
    batched = [i for i, axis in enumerate(axes) if axis == 0]
    if not batched:
        return
    size = example_inputs[batched[0]].shape[0]

    def runs_doubled(inputs: Collection[int]) -> Exception | None:
        doubled = [torch.cat([x, x]) if i in inputs else x for i, x in enumerate(example_inputs)]
        try:
            with torch.no_grad(), eval_mode(module):
                module(*fresh_inputs(doubled))
        except Exception as err:  # noqa: BLE001 (the user's model, at a size it does not take)
            return err
        return None

    err = runs_doubled(batched)
    if err is None:
        return
    # One input without a batch axis (a (T, T) mask) is the likelier cause: name it alone.
    alone = batched if len(batched) > 1 else []
    static = next((i for i in alone if runs_doubled(set(batched) - {i}) is None), None)
    if static is not None:
        raise UserError(f"input {static} has no batch axis, it seems: the model runs at batch {2 * size} with that "
                        f"input as it is, and not with it doubled ({one_line(err)}); add --static-input {static}") from err
    every = ", ".join(f"--static-input {i}" for i in batched)
    raise UserError(
        f"the model runs at its example's batch size {size} but not at others, which an ONNX file with a "
        f"dynamic batch must take (at batch {2 * size}: {one_line(err)}); to export it at batch {size} only, "
        f"add {every}"
    ) from err


class _TensorOutputs(nn.Module):
    """`module` returning its output's tensors as a tuple, in the order verify pairs them in."""

    def __init__(self, module: nn.Module, copied: Sequence[int] = ()):
        super().__init__()
        self.module, self.copied = module, set(copied)

    def forward(self, *inputs):
        # A copy of each output that is an input or an earlier output: an ONNX value has one
        # name, and each output needs its own (HF's hidden_states holds the input and the last state).
        tensors = [t for _, t in named_tensors(self.module(*inputs))]
        return tuple(t.clone() if k in self.copied else t for k, t in enumerate(tensors))


_LEAVES = (torch.Tensor, int, float, bool, str, type(None))


def _with_known_outputs(module: nn.Module, example_inputs, input_names: Sequence[str]):
    """`module`, or `_TensorOutputs(module)` where its output holds what the exporter refuses: a
    dataclass torch's pytree does not know (a user's own, in HuggingFace's style), or numbers and
    strings beside the tensors (`{"logits": t, "n_layers": 3}`), or an output that is an input or
    another output (HF's hidden_states), which it copies. An object of another class is
    refused by name (UserError): which of its tensors are outputs is not known, and the exporter
    would say only that its class is unknown. And the outputs' names (`named_tensors`), in the
    order the exporter writes them (which verify checks), where every tensor is found, none named
    as one of `input_names` (`_unique_output_names`). And where the numbers and strings left out
    of the file are in the output."""
    given = fresh_inputs(example_inputs)
    with torch.no_grad(), eval_mode(module), running_user_model():
        output = module(*given)
    named = named_tensors(output)
    names = _unique_output_names([name for name, _ in named], input_names)
    leaves = torch.utils._pytree.tree_leaves(output)
    plain = all(isinstance(leaf, (torch.Tensor, type(None))) for leaf in leaves)
    unknown = None if plain else next(
        ((where, leaf) for where, leaf in named_leaves(output) if not isinstance(leaf, _LEAVES)), None)
    if unknown is not None:
        where, value = unknown
        cls = type(value)
        hint = ""
        if cls.__module__.startswith("transformers.") and cls.__name__.endswith("Cache"):
            hint = ": a HuggingFace model returns its cache where use_cache is on; load it with use_cache=False"
        raise UserError(f"the model's output '{where}' is a {cls.__module__}.{cls.__qualname__}, which no ONNX file can "
                        f"hold (its tensors, if any, are not known to be outputs){hint}")
    seen = {id(x) for x in given}
    aliased = []  # outputs that are an input or an earlier output
    for k, (_, tensor) in enumerate(named):
        if id(tensor) in seen:
            aliased.append(k)
        seen.add(id(tensor))
    left_out = [where for where, leaf in named_leaves(output) if not isinstance(leaf, (torch.Tensor, type(None)))]
    if aliased or not plain:
        return _TensorOutputs(module, aliased), names, left_out
    # A class torch's pytree knows and `named_tensors` does not: the exporter's own names.
    return module, names if len(names) == sum(isinstance(leaf, torch.Tensor) for leaf in leaves) else None, left_out


def _unique_output_names(names: list[str], input_names: Sequence[str]) -> list[str]:
    """The outputs' names, each unlike the inputs' (ONNX names a value once: HF blocks take
    `hidden_states` and return `{"hidden_states": ...}`): such an output becomes `NAME.out`,
    `NAME.out2`... whichever no other output or input takes (`{"x": h, "x.out": g}`)."""
    taken, unique = set(names) | set(input_names), []
    for name in names:
        # An input's name, or one an earlier output took (`{0: h, "0": g}`: both are named '0').
        if name in input_names or name in unique:
            name = next(n for n in (f"{name}.out{i or ''}" for i in itertools.count()) if n not in taken)
            taken.add(name)
        unique.append(name)
    return unique


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _interrupt_within(err: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM through the CLI's handler) among `err`'s causes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _root_cause(err: BaseException) -> str:
    """The most specific line: the innermost cause's, without the exporter's colour codes."""
    while err.__cause__ is not None and str(err.__cause__).strip():
        err = err.__cause__
    return _ANSI.sub("", one_line(err))


@contextlib.contextmanager
def _output_captured_in(log):
    """Python's streams, file descriptors 1 and 2 (C++ prints), torch's log handlers and warnings,
    all into `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    handlers = [
        h
        for logger in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
        for h in getattr(logger, "handlers", [])
        if type(h) is logging.StreamHandler  # subclasses (files, torch's trace log) keep their own
    ]
    streams = [h.setStream(log) for h in handlers]
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
                warnings.formatwarning(message, category, filename, lineno, line)
            )
            yield
    finally:
        log.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        for h, stream in zip(handlers, streams):
            h.setStream(stream)


def _keep_export_log(log, err: BaseException) -> str:
    """Copy the captured output and the traceback to a new file in the temp folder; its path."""
    log.flush()
    log.seek(0)
    fd, path = tempfile.mkstemp(prefix="bngraph-export-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(_ANSI.sub("", log.read()))
        out.write("\n" + _ANSI.sub("", "".join(traceback.format_exception(err))))
    return path


def _fx_fold(module: nn.Module, example_inputs, report: Report) -> nn.Module:
    try:
        # A BN with no exact fold stays a BN here: the ONNX passes choose its form per target.
        folded, fold_report = fx_fold(module, example_inputs, standalone_bn="keep")
    except (ModelRaised, ModelNotAFunction):  # the model itself: no other route exports it
        raise
    except CheckFailed as err:  # the folded graph computes something else: nothing is exported
        raise CheckFailed(f"export's FX fold: {err}") from err
    except UserError as err:  # torch.fx cannot trace what torch.export can: fold in ONNX instead
        report.facts["fx_fold"] = "skipped"
        report.notes.append(f"FX fold skipped ({err}); the ONNX passes fold instead")
        return module
    report.facts["fx_fold"] = "done"
    report.facts.update({f"fx_fold_{k}": v for k, v in fold_report.facts.items()})
    report.sections.update({f"fx_fold_{k}": v for k, v in fold_report.sections.items()})
    report.notes.extend(fold_report.notes)
    return folded


def _record_what_its_data_means(module: nn.Module, example_inputs, model, report: Report) -> None:
    """Put a trained model's input scale and class names into the file's metadata, and say so: a
    user handed the .onnx alone fed it 0-255 pixels where it trained on pixels / 255."""
    scale, classes = getattr(module, "bngraph_input_scale", None), getattr(module, "bngraph_classes", None)
    if scale:
        model.metadata_props["bngraph_input_scale"] = str(scale)
        report.notes.append(f"the model was trained on {scale}: feed it its inputs so (recorded in the file's metadata "
                            "as bngraph_input_scale)")
    if classes:
        from bngraph.training.data import logits_width  # here: export needs training's code only for this

        width = logits_width(module, example_inputs)
        if width is None or width < len(classes):  # a new head on a loaded model: the names name no output
            report.notes.append(f"the model's {len(classes)} class names are not written into the file: its logits "
                                f"have {width if width is not None else 'no'} columns")
            return
        model.metadata_props["bngraph_classes"] = json.dumps(list(classes))
        extra = f"; outputs {len(classes)} to {width - 1} name no class" if width > len(classes) else ""
        report.notes.append(f"output i is class i of the {len(classes)} in the file's metadata (bngraph_classes){extra}")


@library_call
def export(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    fold: bool = True,
    exporter_optimize: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    batch_axes: Sequence[int | None] | None = None,
    standalone_bn: str = "batchnorm",
) -> ExportResult:
    """Export `module` to `path`, or write nothing when the file's outputs differ from it.

    An existing `path` is replaced only when it is an .onnx file bngraph wrote and `force` is true.
    `batch_axes` (0 or None per input; default: what `example_inputs` carries, see
    `bngraph.runners.ExampleInputs`, else 0 for every input but a 0-d one) says which inputs have a
    batch axis: only those are dynamic in the file and vary in the verification.
    `standalone_bn` (a key of `bngraph.onnx_fold.STANDALONE_BN_FORMS`) is the form of a BN that
    no layer can take exactly: "batchnorm" keeps it (fastest in onnxruntime), "mul-add" writes
    a Mul and an Add, for a runtime without a BatchNormalization kernel."""
    check_model(module, "export", example_inputs)
    refuse_empty_output(path)
    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"the output {path} must end in .onnx")
    check_output(path, ONNX, force=force)  # before the export, not after it
    if standalone_bn not in STANDALONE_BN_FORMS:  # before the work, not after it
        raise UserError(f"unknown form {standalone_bn!r} for a BN with no exact fold: {', '.join(STANDALONE_BN_FORMS)}")
    facts = {
        "output": str(path),
        "opset": OPSET,
        "exporter_optimize": exporter_optimize,
        "standalone_bn": standalone_bn,
    }
    report = Report("bngraph export", facts=facts)
    # bngraph's runs of the model (the trace, the checks) are not the model's: a counter it keeps in a
    # buffer is put back as it was (fold and insert do the same).
    with buffers_kept(module):
        exported = _fx_fold(module, example_inputs, report) if fold else module
        per_batch = [*batch_statistics(exported), *((path, TRAINING_IN_EVAL) for path in
                                                     batch_norms_training_in_eval(exported, example_inputs))]
        if per_batch:
            # Never a fixed map, and the exporter writes F.batch_norm(training=True) as an eval-mode
            # BatchNormalization: a file that computes something else, which only verify would catch.
            left = "; ".join(f"{name} ({why})" for name, why in per_batch)
            raise UserError(f"the exported graph keeps a BatchNormalization that cannot be folded: {left}")
        if not fold:
            report.facts["fx_fold"] = "off (--no-fold)"
        exported_onnx = to_onnx(exported, example_inputs, exporter_optimize=exporter_optimize, batch_axes=batch_axes,
                                notes=report.notes, original=module)
        _check_exported(exported_onnx)
        model, onnx_report = fold_onnx(exported_onnx, standalone_bn=standalone_bn)
        report.facts.update({f"onnx_{k}": v for k, v in onnx_report.facts.items()})
        report.sections.update({f"onnx_{k}": v for k, v in onnx_report.sections.items()})
        if (remaining := onnx_report.sections["remaining"]) and (rows := report.sections.get("fx_fold_remaining")):
            # The FX fold's rows name the model's own modules and say why.
            left = "; ".join(f"{row['node']} ({row['reason']})" for row in rows)
            raise UserError(f"the exported graph keeps a BatchNormalization that cannot be folded: {left}")
        if remaining:
            # None of the model's BatchNorms (a batch-statistics one is refused above, by name): the
            # exporter's own form of another layer (InstanceNorm with running statistics is a
            # BatchNormalization of computed scale), which verification below checks as it checks the rest.
            report.notes.append(f"{len(remaining)} BatchNormalization node(s) whose statistics the file computes as it "
                                f"runs (the exporter's form of a layer that normalizes with each batch's or instance's "
                                f"statistics), kept: {', '.join(row['node'] for row in remaining)}")
        if kept := onnx_report.sections.get("kept"):
            # The ONNX node names are the exporter's; the FX fold's rows name the model's own BNs.
            fx_kept = report.sections.get("fx_fold_kept", [])
            names = [row["node"] for row in (fx_kept if len(fx_kept) == len(kept) else kept)]
            report.notes.append(
                f"{len(kept)} BatchNorm(s) with no exact fold kept as BatchNormalization, the fastest exact form in "
                f"onnxruntime: {', '.join(names)} (why no layer took each: 'onnx_kept'); "
                "--standalone-bn mul-add writes a Mul and an Add instead"
            )
        batches = example_batches(example_inputs, EXPORT_BATCH_SIZES, batch_axes)
        sizes = EXPORT_BATCH_SIZES
        if unbatched := unbatched_sizes([tuple(x.shape) for x in example_inputs], batch_axes_of(example_inputs, batch_axes)):
            sizes = (unbatched[0],) * len(batches)  # as they ran: [1, 1, 1, 7, 2] said the batch was varied
            report.notes.append(unbatched_note(unbatched))
        _record_what_its_data_means(module, example_inputs, model, report)
        result, written = write_verified(model, path, module, batches, atol, rtol, batch_sizes=sizes, force=force)
        if not written:
            report.facts["output"] = "(not written: verification failed)"
        report.facts.update(result.facts())
        report.sections["verification"] = [d.row() for d in result.diffs]
        return ExportResult(path if written else None, result, report)
