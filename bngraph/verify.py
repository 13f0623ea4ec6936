"""Reference vs candidate on the same inputs: per-output errors, a verdict, and the worst element.

Each side runs through a runner (`bngraph.runners`): a PyTorch module, an ONNX model in
onnxruntime at ORT_DISABLE_ALL and ORT_ENABLE_ALL, or onnx's ReferenceEvaluator.

An element fails only when it is beyond both tolerances, |c - r| > atol + rtol * |r|
(numpy.allclose's rule: atol covers outputs near zero, rtol large ones). The result of
`verify` is truthy on a pass.

    result = verify(model, "model.onnx", random_batches([(1, 3, 32, 32)]))  # bngraph.runners
    if not result:
        print(result.worst.line())
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bngraph.errors import UserError
from bngraph.runners import runners_for
from bngraph.trace import one_line

# Default tolerances, by what is compared. torch against onnxruntime: different kernels (ATen
# vs MLAS), and at ORT_ENABLE_ALL onnxruntime's own fusions, sum float32 products in another
# order. On the zoo's models with BN inserted, random statistics and folded, the largest
# difference measured is below 1e-6 (inception 8e-7, inception-small 5e-7, mnist-mlp 2e-7;
# tests/test_export.py keeps it under a tenth of the tolerance), while a wrong fold errs by the
# size of a BN statistic (~0.1): 1e-4 sits between, 100x from each. Folded against unfolded
# torch: the same kernels, and the fold only rounds W * s and the bias once more; measured on
# the same models up to 6e-7 (inception), so 1e-5 keeps a 15x margin and catches more.
ONNX_TOLERANCE = 1e-4
TORCH_TOLERANCE = 1e-5


# ---- comparison ---------------------------------------------------------------------------


@dataclass
class OutputDiff:
    output: str
    reference: str  # the runner labels
    candidate: str
    atol: float
    rtol: float
    passed: bool
    max_abs: float = 0.0
    max_rel: float = 0.0  # |c - r| / max(|r|, atol): relative to atol where r is below it
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    min_atol: float = 0.0  # the smallest atol that passes at this rtol
    min_rtol: float = 0.0  # the smallest rtol that passes at this atol (inf: none does)
    worst_batch: int = 0
    worst_index: tuple[int, ...] = ()
    worst_reference: float = 0.0
    worst_candidate: float = 0.0
    excess: float = 0.0  # worst |c - r| / (atol + rtol |r|): above 1 fails
    failed_elements: int = 0
    elements: int = 0
    top1_agreement: float | None = None  # classifiers (N, K): argmax agrees
    problem: str | None = None  # shapes that cannot be compared

    def line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        if self.problem:
            return f"FAILED | Output: {self.output!r} | {self.candidate} vs {self.reference} | {self.problem}"
        within = "is within" if self.passed else "exceeds"
        return (
            f"{verdict} | Output: {self.output!r} | {self.candidate} vs {self.reference} | "
            f"Difference {within} tolerance (rel={self.rtol:g}, abs={self.atol:g}) | "
            f"max abs={self.max_abs:.3g}, max rel={self.max_rel:.3g}"
        )

    def row(self) -> dict:
        """The facts for the report's table and JSON (the tolerance is in the report's facts)."""
        return {
            "output": self.output,
            "runtime": f"{self.candidate} vs {self.reference}",
            "passed": self.passed,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "mean_abs": _json_float(self.mean_abs),
            "p99_abs": _json_float(self.p99_abs),
            "worst_batch": self.worst_batch,
            "worst_index": list(self.worst_index),
            "min_atol": _json_float(self.min_atol),
            "min_rtol": _json_float(self.min_rtol),
            "top1": self.top1_agreement,
            "failed": f"{self.failed_elements}/{self.elements}" if not self.problem else self.problem,
        }


def _json_float(value: float) -> float | str:
    return value if np.isfinite(value) else str(value)  # "inf": JSON has no infinity


def compare(
    name: str,
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    atol: float,
    rtol: float,
    labels: tuple[str, str] = ("reference", "candidate"),
) -> OutputDiff:
    """Compare one output over several batches (one array per batch on each side)."""
    diff = OutputDiff(name, labels[0], labels[1], atol, rtol, passed=True)
    for ref, cand in zip(reference, candidate):
        if np.shape(ref) != np.shape(cand):
            diff.passed, diff.problem = False, f"shapes differ: {np.shape(cand)} vs {np.shape(ref)}"
            return diff
    ref = [np.asarray(r, dtype=np.float64) for r in reference]
    cand = [np.asarray(c, dtype=np.float64) for c in candidate]
    errors = [_abs_error(r, c) for r, c in zip(ref, cand)]
    flat_err = np.concatenate([e.ravel() for e in errors]) if errors else np.zeros(0)
    flat_ref = np.abs(np.concatenate([r.ravel() for r in ref])) if ref else np.zeros(0)
    # A NaN or inf reference gives no scale to be relative to; `_abs_error` judged it already.
    flat_ref[~np.isfinite(flat_ref)] = 0.0
    diff.elements = int(flat_err.size)
    if flat_err.size == 0:
        return diff
    allowed = atol + rtol * flat_ref
    diff.failed_elements = int(np.count_nonzero(flat_err > allowed))
    diff.passed = diff.failed_elements == 0
    diff.max_abs = float(flat_err.max())
    diff.max_rel = float((flat_err / np.maximum(flat_ref, max(atol, np.finfo(np.float32).tiny))).max())
    diff.mean_abs = float(flat_err.mean())
    with np.errstate(invalid="ignore"):
        diff.p99_abs = float(np.percentile(flat_err, 99))
    diff.min_atol = float(np.maximum(flat_err - rtol * flat_ref, 0).max())
    beyond_atol = flat_err > atol
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, flat_err / allowed, np.where(flat_err > 0, np.inf, 0.0))
        needed_rtol = np.where(flat_ref > 0, (flat_err - atol) / flat_ref, np.inf)
    diff.min_rtol = float(needed_rtol[beyond_atol].max()) if beyond_atol.any() else 0.0
    worst = int(np.argmax(ratio))
    diff.excess = float(ratio[worst])
    sizes = np.cumsum([e.size for e in errors])
    diff.worst_batch = int(np.searchsorted(sizes, worst, side="right"))
    offset = worst - (sizes[diff.worst_batch - 1] if diff.worst_batch else 0)
    diff.worst_index = tuple(int(i) for i in np.unravel_index(offset, errors[diff.worst_batch].shape))
    diff.worst_reference = float(ref[diff.worst_batch][diff.worst_index])
    diff.worst_candidate = float(cand[diff.worst_batch][diff.worst_index])
    if all(r.ndim == 2 and r.shape[1] > 1 for r in ref):
        agree = np.concatenate([r.argmax(1) == c.argmax(1) for r, c in zip(ref, cand)])
        diff.top1_agreement = float(agree.mean())
    return diff


def _abs_error(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """|c - r|, with a NaN or inf on one side only as an infinite error and on both as none."""
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(cand - ref)
    same = (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & (ref == cand))
    err[same] = 0.0
    err[np.isnan(err)] = np.inf
    return err


@dataclass
class VerifyResult:
    diffs: list[OutputDiff] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return all(d.passed for d in self.diffs)

    @property
    def worst(self) -> OutputDiff | None:
        """The output furthest beyond (or closest to) its tolerance."""
        failed = [d for d in self.diffs if d.problem]
        return failed[0] if failed else max(self.diffs, key=lambda d: d.excess, default=None)

    def lines(self) -> list[str]:
        lines = [d.line() for d in self.diffs]
        worst = self.worst
        if worst is None:
            return lines
        if self:
            lines.append(f"PASSED | {len(self.diffs)} comparisons on batches {self.batch_sizes}")
        elif worst.problem:
            lines.append(f"FAILED | worst output {worst.output!r} ({worst.candidate}): {worst.problem}")
        else:
            lines.append(
                f"FAILED | worst output {worst.output!r} ({worst.candidate} vs {worst.reference}): "
                f"{worst.failed_elements} of {worst.elements} elements beyond tolerance, max abs error "
                f"{worst.max_abs:.3g} at batch {worst.worst_batch} index {list(worst.worst_index)} "
                f"({worst.worst_candidate:.6g} vs {worst.worst_reference:.6g}); it would pass with "
                f"--atol {worst.min_atol:.2g} (or --rtol {worst.min_rtol:.2g})"
            )
        return lines

    def facts(self) -> dict:
        worst = self.worst
        return {
            "passed": bool(self),
            "atol": sorted({d.atol for d in self.diffs}),
            "rtol": sorted({d.rtol for d in self.diffs}),
            "batch_sizes": list(self.batch_sizes),
            "worst_output": worst.output if worst else None,
            "worst_runtime": worst.candidate if worst else None,
        }


def default_tolerance(reference_kind: str, candidate_kind: str) -> float:
    return TORCH_TOLERANCE if reference_kind == candidate_kind == "torch" else ONNX_TOLERANCE


def verify(
    reference: Any,
    candidate: Any,
    inputs: Sequence[Sequence[np.ndarray]],
    atol: float | None = None,
    rtol: float | None = None,
    *,
    evaluator: bool = False,
) -> VerifyResult:
    """Run both on each batch of `inputs` and compare every output.

    `reference` and `candidate` are nn.Modules or ONNX models (a path, bytes, a ModelProto).
    An ONNX model runs at both onnxruntime levels (and in onnx's ReferenceEvaluator with
    `evaluator`); two ONNX models are compared level by level. `atol`/`rtol` default to
    `default_tolerance` for the kinds compared.
    """
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if tol is not None and not tol >= 0:
            raise UserError(f"--{name} must be a number >= 0, not {tol}")
    refs, cands = runners_for(reference, evaluator=evaluator), runners_for(candidate, evaluator=evaluator)
    if len(refs) > 1 and len(cands) > 1:
        pairs = list(zip(refs, cands))  # same level against same level
    else:
        pairs = [(r, c) for r in refs for c in cands]
    result = VerifyResult(batch_sizes=[len(batch[0]) if batch else 0 for batch in inputs])
    outputs: dict[int, list[list[np.ndarray]]] = {}

    def run(runner) -> list[list[np.ndarray]]:
        if id(runner) not in outputs:
            try:
                outputs[id(runner)] = [runner(batch) for batch in inputs]
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"{runner.label} failed on a batch of {result.batch_sizes}: {one_line(err)}") from err
        return outputs[id(runner)]

    for ref, cand in pairs:
        ref_out, cand_out = run(ref), run(cand)
        if ref_out and len(ref_out[0]) != len(cand_out[0]):
            raise UserError(f"{ref.label} gives {len(ref_out[0])} outputs but {cand.label} gives {len(cand_out[0])}")
        tol = default_tolerance(ref.kind, cand.kind)
        names = cand.output_names or ref.output_names or [f"output{i}" for i in range(len(ref_out[0]))]
        for i, name in enumerate(names):
            result.diffs.append(
                compare(
                    name,
                    [batch[i] for batch in ref_out],
                    [batch[i] for batch in cand_out],
                    tol if atol is None else atol,
                    tol if rtol is None else rtol,
                    (ref.label, cand.label),
                )
            )
    return result


def print_lines(result: VerifyResult, args: Any = None) -> None:
    """The PASSED/FAILED lines: on stdout, or on stderr beside --json's report."""
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    for line in result.lines():
        print(line, file=stream)
