"""nn.Module -> a verified .onnx file: FX fold, torch.onnx.export, the ONNX passes, verification.

    result = export(model, example_inputs, "model.onnx")
    if not result:                 # verification failed: no file was written
        print(result.verification.worst.line())

1. The model is folded by our FX passes (`bngraph.fold`).
2. torch.onnx.export with the torch.export-based exporter (dynamo=True), opset OPSET, a
   dynamic batch axis and the model in eval mode; the exporter's optimizer stays off unless
   asked for, so what ends up in the file is what our passes wrote.
3. The ONNX passes (`bngraph.onnx_fold`) fold whatever BN the FX fold could not reach, and
   constant-fold the exporter's leftovers; a BN still left is in training mode: an error.
4. The file is written aside, verified against the unfolded model in onnxruntime at batch 1
   and an odd batch, and renamed into place only if it passes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bngraph.atomic import check_writable, write_atomically
from bngraph.errors import UserError
from bngraph.fold import fold as fx_fold
from bngraph.onnx_fold import Rejected, fold_onnx, save_onnx
from bngraph.report import Report
from bngraph.trace import one_line
from bngraph.runners import BATCH_SIZES, eval_mode, random_batches
from bngraph.verify import VerifyResult, verify

# The newest opset that every onnxruntime pyproject admits (>= 1.20) runs; torch's default is 20.
OPSET = 21


@dataclass
class ExportResult:
    path: Path | None  # None when verification failed and nothing was written
    verification: VerifyResult
    report: Report

    def __bool__(self) -> bool:
        return bool(self.verification)


def to_onnx(module: nn.Module, example_inputs: Sequence[torch.Tensor], *, exporter_optimize: bool = False):
    """torch.onnx.export (dynamo=True) with a dynamic batch axis; returns the onnx_ir.Model."""
    # torch.export specializes a dimension of size 1, so a batch-1 example would fix the
    # batch at 1: repeat it to 2 (the values do not matter, only the shapes are traced).
    inputs = tuple(x.repeat(2, *([1] * (x.dim() - 1))) if x.dim() and x.shape[0] == 1 else x for x in example_inputs)
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} if x.dim() else None for x in inputs)
    # The exporter prints progress and logs a warning per missing torchvision op: not our report.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with eval_mode(module), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's deprecations inside torch
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                optimize=exporter_optimize,
                opset_version=OPSET,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    except Exception as err:
        raise UserError(f"torch.onnx.export could not export {type(module).__name__}: {one_line(err)}") from err
    finally:
        exporter_log.setLevel(level)
    return program.model


def _fx_fold(module: nn.Module, example_inputs, report: Report) -> nn.Module:
    try:
        folded, fold_report = fx_fold(module, example_inputs)
    except UserError as err:  # torch.fx cannot trace what torch.export can: fold in ONNX instead
        report.facts["fx_fold"] = "skipped"
        report.notes.append(f"FX fold skipped ({err}); the ONNX passes fold instead")
        return module
    report.facts["fx_fold"] = "done"
    report.facts.update({f"fx_fold_{k}": v for k, v in fold_report.facts.items()})
    report.sections.update({f"fx_fold_{k}": v for k, v in fold_report.sections.items()})
    report.notes.extend(fold_report.notes)
    return folded


def export(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    fold: bool = True,
    exporter_optimize: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
) -> ExportResult:
    """Export `module` to `path`, or write nothing when the file's outputs differ from it."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"the output {path} must end in .onnx")
    check_writable(path)  # before the export, not after it
    facts = {"output": str(path), "opset": OPSET, "exporter_optimize": exporter_optimize}
    report = Report("bngraph export", facts=facts)
    exported = _fx_fold(module, example_inputs, report) if fold else module
    if not fold:
        report.facts["fx_fold"] = "off (--no-fold)"
    model, onnx_report = fold_onnx(to_onnx(exported, example_inputs, exporter_optimize=exporter_optimize))
    report.facts.update({f"onnx_{k}": v for k, v in onnx_report.facts.items()})
    report.sections.update({f"onnx_{k}": v for k, v in onnx_report.sections.items()})
    if onnx_report.sections["remaining"]:
        left = "; ".join(f"{row['node']} ({row['reason']})" for row in onnx_report.sections["remaining"])
        raise UserError(f"the exported graph keeps a BatchNormalization that cannot be folded: {left}")
    shapes, dtypes = [tuple(x.shape) for x in example_inputs], [_np_dtype(x) for x in example_inputs]
    batches = random_batches(shapes, BATCH_SIZES, dtypes)
    outcome = {}

    def write(tmp: Path) -> None:
        save_onnx(model, tmp, path)
        outcome["result"] = result = verify(module, tmp, batches, atol, rtol)
        if not result:
            raise Rejected

    written: Path | None = path
    try:
        write_atomically(path, write)
    except Rejected:
        written = None
        report.facts["output"] = "(not written: verification failed)"
    result = outcome["result"]
    report.facts.update(result.facts())
    report.sections["verification"] = [d.row() for d in result.diffs]
    return ExportResult(written, result, report)


def _np_dtype(x: torch.Tensor):
    return torch.empty(0, dtype=x.dtype).numpy().dtype
