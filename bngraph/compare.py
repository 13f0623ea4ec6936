"""One output of two models compared: the rule, the tolerances, the numbers, and the verdict.

What passing means: for every output and every element, with r the reference and c the candidate,

    |c - r| <= atol * scale + rtol * |r|,   scale = RMS of the reference output (finite values,
                                                    over every batch compared)

The absolute part is relative to the output's own magnitude, so the rule reads the same on
logits of 10 and on outputs of 1e-5: with the defaults, an error of 1% of an output's RMS
fails at any scale (by about 50x against ONNX, 500x between two PyTorch models).

The scale is one number per output, not one per feature: where one column is 1e5 times the
others, an error in the small ones is judged at the large one's scale. A per-feature scale (the
RMS of each position over the batches, floored at a fraction of the output's) was measured on
every comparison of the test suite, and it fails exact folds: our own Inception's, folded in
PyTorch, at 1.9x what 1e-5 allows with a floor of 1/100 of the RMS, the float16 fold at 1.75x with
a floor of 1/10, and among the real models (tests/real) HF MobileNetV2's at 18x and 3.1x: rounding
scales with the terms summed, not with the result. NaN against NaN and
inf against the same inf agree (counted in `nonfinite_elements`), so a model that gives NaN on
some of the random inputs can pass; where they agree on every element, nothing was compared and
`verify` refuses the check. NaN or inf on one side only is an infinite error. A
`VerifyResult` is truthy on a pass.

    diff = compare("logits", reference_batches, candidate_batches, atol=1e-4, rtol=1e-4)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Default tolerances, by what is compared, as fractions of the output's RMS (`scale`). torch
# against onnxruntime: different kernels (ATen vs MLAS), and at ORT_ENABLE_ALL onnxruntime's own
# fusions, sum float32 products in another order. On the zoo's models with BN inserted, random
# statistics and folded, the largest difference measured is 1.5e-6 of the output's RMS
# (inception; the worst element at 1/99 of what 1e-4 allows; inception-small 1/148, mnist-mlp
# 1/370), while a wrong fold errs by the size of a BN statistic (~0.1 of it). Folded against
# unfolded torch: the same kernels, and the fold only rounds W * s and the bias once more:
# 8e-7 of the RMS (inception, 1/15 of what 1e-5 allows; inception-small 1/35, mnist-mlp 1/85),
# so 1e-5 keeps that margin and fails a 1% error by 500x.
ONNX_TOLERANCE = 1e-4
TORCH_TOLERANCE = 1e-5
# How much further from the exact (float64) result than the original a transformed model may be
# and still be rounding. Where rounding is amplified this much, where it lands is close to random:
# two exact folds of HF MobileNetV2 (FX and module by module) landed 0.26x and 3.2x the model's own
# distance away (`bngraph.equivalence`; `OutputDiff.from_exact`).
OWN_ROUNDING_FACTOR = 4.0
# The furthest, as a fraction of the RMS, that a model's float32 output is taken to stray from its
# float64 one by rounding alone (HF MobileNetV2 with its classifier after a training step: 0.0016).
# Beyond it, the model computes something else in float64 (a branch on the dtype), and its
# distance explains nothing.
ROUNDING_AT_MOST = 0.01


@dataclass
class OutputDiff:
    output: str
    reference: str  # the runner labels
    candidate: str
    atol: float
    rtol: float
    passed: bool
    scale: float = 0.0  # RMS of the reference output: the unit of atol
    batches: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0  # max |c - r| / scale
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    min_atol: float = 0.0  # the smallest atol (x scale) that passes at this rtol
    min_rtol: float = 0.0  # the smallest rtol that passes at this atol (inf: none does)
    worst_batch: int = 0
    worst_index: tuple[int, ...] = ()
    worst_reference: float = 0.0
    worst_candidate: float = 0.0
    excess: float = 0.0  # worst |c - r| / (atol * scale + rtol |r|): above 1 fails
    failed_elements: int = 0
    elements: int = 0
    nonfinite_elements: int = 0  # NaN, or the same inf, on both sides: agreed, but not compared
    top1_agreement: float | None = None  # classifiers (N, K): argmax agrees
    problem: str | None = None  # outputs that cannot be compared (shapes, structures)
    # Where it failed against a float32 PyTorch reference (`bngraph.verify`): whether the reference
    # gave another output when run again on the same batch (it draws random numbers), else how
    # far the candidate and the reference itself are from the reference run in float64, x scale.
    # Tells a model that amplifies float32 rounding from a candidate that computes something else.
    reference_varies: bool = False
    from_exact: tuple[float, float] | None = None
    # Against an ONNX reference run at both onnxruntime levels: how far the candidate is, and how
    # far the reference's two levels are from each other (its own float32 rounding), x scale.
    levels_apart: tuple[float, float] | None = None
    exact: bool = False  # integers and booleans, compared exactly whatever --atol and --rtol say
    dtypes: tuple[str, str] | None = None  # (candidate's, reference's) where they differ: float16 vs float32

    def exact_verdict(self) -> str:
        """What `reference_varies` or `from_exact` says, in words; empty without either."""
        if self.reference_varies:
            return (f"{self.reference} gives another output when run again on the same batch (it draws random "
                    "numbers, as a random masking does): no candidate can be checked against it")
        if self.levels_apart is not None:
            return self._levels_verdict()
        if self.from_exact is None:
            return ""
        theirs, own = self.from_exact
        head = (f"against {self.reference}'s exact (float64) result, {self.candidate} is off by {theirs:.2g} of the "
                f"RMS and {self.reference} itself by {own:.2g}")
        if own > ROUNDING_AT_MOST:
            return (f"{head}: the model is further from itself in float64 than float32 rounding goes, so this "
                    "says nothing about the candidate")
        if theirs <= OWN_ROUNDING_FACTOR * own:
            return (f"{head}: float32 rounding that this model amplifies, not a wrong result (the candidate is "
                    f"within {OWN_ROUNDING_FACTOR:g}x the model's own)")
        times = "far beyond" if own == 0 or theirs > 1000 * own else f"{theirs / own:.3g}x"
        return f"{head}: {times} the model's own float32 rounding, so the candidate computes something else"

    def _levels_verdict(self) -> str:
        theirs, own = self.levels_apart
        head = (f"the candidate is off by {theirs:.2g} of the RMS, and the reference at onnxruntime's two "
                f"optimization levels differs from itself by {own:.2g}")
        if theirs <= OWN_ROUNDING_FACTOR * own:
            return (f"{head}: float32 rounding (within {OWN_ROUNDING_FACTOR:g}x what onnxruntime's own optimizations "
                    "change), not a wrong result")
        times = "far beyond" if own == 0 or theirs > 1000 * own else f"{theirs / own:.3g}x"
        return f"{head}: {times} what onnxruntime's own optimizations change, so the candidate computes something else"

    def rule(self) -> str:
        """The pass rule with this output's numbers in it."""
        if self.exact:
            return "c == r (integers and booleans: exactly)"
        if self.scale <= np.finfo(np.float32).tiny:  # `output_scale`'s floor: the output is 0 everywhere
            return f"|c - r| <= {self.atol:g} x float32's smallest normal (the output is all 0: no RMS) + {self.rtol:g} x |r|"
        return f"|c - r| <= {self.atol:g} x {self.scale:.3g} (output RMS) + {self.rtol:g} x |r|"

    def line(self) -> str:
        """Polygraphy's shape: verdict, output, what against what, then why (c: candidate, r: reference)."""
        head = (
            f"{'PASSED' if self.passed else 'FAILED'} | Output: {self.output!r} | {self.candidate} vs {self.reference}"
        )
        if self.problem:
            return f"{head} | {self.problem}"
        compared = f"{self.batches} batches, {self.elements} elements"
        if self.dtypes:
            compared += f", {self.dtypes[0]} vs {self.dtypes[1]}"
        if self.nonfinite_elements:
            compared += f" ({self.nonfinite_elements} NaN or inf on both sides)"
        if self.passed:
            verdict = f"{self.rule()} everywhere, worst at {_ratio(self.excess)} of it"
        else:
            verdict = f"{self.rule()} fails on {self.failed_elements} elements, worst at {_ratio(self.excess)} times it"
        return f"{head} | {compared} | {verdict} | max |c - r| {self.max_abs:.3g}"

    def row(self) -> dict:
        """The facts for the report's table and JSON: numbers as numbers, None where not finite."""
        return {
            "output": self.output,
            "runtime": f"{self.candidate} vs {self.reference}",
            "passed": self.passed,
            "problem": self.problem,
            "elements": self.elements,
            "failed_elements": self.failed_elements,
            "nonfinite_elements": self.nonfinite_elements,
            "scale": _json_float(self.scale),
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "excess": _json_float(self.excess),
            "mean_abs": _json_float(self.mean_abs),
            "p99_abs": _json_float(self.p99_abs),
            "worst_batch": self.worst_batch,
            "worst_index": list(self.worst_index),
            "min_atol": _json_float(self.min_atol),
            "min_rtol": _json_float(self.min_rtol),
            "top1": None if self.top1_agreement is None else _json_float(self.top1_agreement),
            **({} if self.dtypes is None else {"candidate_dtype": self.dtypes[0], "reference_dtype": self.dtypes[1]}),
            **({"reference_varies": True} if self.reference_varies else {}),
            **({} if self.from_exact is None else {
                "candidate_from_exact": _json_float(self.from_exact[0]),
                "reference_from_exact": _json_float(self.from_exact[1]),
            }),
            **({} if self.levels_apart is None else {
                "candidate_off": _json_float(self.levels_apart[0]),
                "reference_levels_apart": _json_float(self.levels_apart[1]),
            }),
        }


def _json_float(value: float) -> float | None:
    """Four significant digits, the precision these numbers mean; None for inf and NaN (JSON has neither)."""
    return float(f"{value:.4g}") if np.isfinite(value) else None


def _ratio(value: float) -> str:
    return f"{value:.2g}" if np.isfinite(value) else "inf"


def output_scale(reference: Sequence[np.ndarray]) -> float:
    """RMS of the finite reference values over every batch (float32's tiny for an all-zero output)."""
    finite = [np.asarray(r, dtype=np.float64).ravel() for r in reference]
    values = np.concatenate(finite) if finite else np.zeros(0)
    values = values[np.isfinite(values)]
    rms = float(np.sqrt(np.mean(np.square(values)))) if values.size else 0.0
    return max(rms, float(np.finfo(np.float32).tiny))


def compare(
    name: str,
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    atol: float,
    rtol: float,
    labels: tuple[str, str] = ("reference", "candidate"),
    *,
    scale: float | None = None,
) -> OutputDiff:
    """Compare one output over several batches (one array per batch on each side).

    `scale` (default: `output_scale(reference)`) is what atol is a fraction of; scale=1 gives
    numpy.allclose's rule, atol in absolute units.
    """
    diff = OutputDiff(name, labels[0], labels[1], atol, rtol, passed=True, batches=len(reference))
    for ref, cand in zip(reference, candidate):
        if np.shape(ref) != np.shape(cand):
            diff.passed, diff.problem = False, f"shapes differ: {np.shape(cand)} vs {np.shape(ref)}"
            return diff
    shapes = [np.shape(r) for r in reference]
    ref = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in reference]) if shapes else np.zeros(0)
    cand = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in candidate]) if shapes else np.zeros(0)
    diff.scale = output_scale(reference) if scale is None else float(scale)
    err = _abs_error(ref, cand)
    magnitude = np.abs(ref)
    magnitude[~np.isfinite(magnitude)] = 0.0  # a NaN or inf reference gives no scale; `_abs_error` judged it
    diff.elements = int(err.size)
    diff.nonfinite_elements = int(np.count_nonzero(~np.isfinite(ref) & (err == 0)))  # `_abs_error`'s agreement
    if err.size == 0:
        return diff
    allowed = atol * diff.scale + rtol * magnitude
    # NaN or inf on one side only is an infinite error, which no tolerance covers (--atol inf too).
    diff.failed_elements = int(np.count_nonzero((err > allowed) | np.isinf(err)))
    diff.passed = diff.failed_elements == 0
    diff.max_abs = float(err.max())
    diff.max_rel = diff.max_abs / diff.scale
    diff.mean_abs = float(err.mean())
    with np.errstate(invalid="ignore"):
        diff.p99_abs = float(np.percentile(err, 99))
    with np.errstate(invalid="ignore"):  # inf - inf where rtol is inf
        diff.min_atol = float(np.maximum(err - rtol * magnitude, 0).max() / diff.scale)
    beyond_atol = err > atol * diff.scale
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, err / allowed, np.where(err > 0, np.inf, 0.0))
        needed_rtol = np.where(magnitude > 0, (err - atol * diff.scale) / magnitude, np.inf)
    diff.min_rtol = float(needed_rtol[beyond_atol].max()) if beyond_atol.any() else 0.0
    worst = int(np.argmax(ratio))
    diff.excess = float(ratio[worst])
    ends = np.cumsum([int(np.prod(s)) for s in shapes])
    diff.worst_batch = int(np.searchsorted(ends, worst, side="right"))
    offset = worst - (int(ends[diff.worst_batch - 1]) if diff.worst_batch else 0)
    diff.worst_index = tuple(int(i) for i in np.unravel_index(offset, shapes[diff.worst_batch]))
    diff.worst_reference, diff.worst_candidate = float(ref[worst]), float(cand[worst])
    if all(len(s) == 2 and s[1] > 1 for s in shapes):
        agree = np.concatenate([np.argmax(r, 1) == np.argmax(c, 1) for r, c in zip(reference, candidate)])
        diff.top1_agreement = float(agree.mean())
    return diff


def _abs_error(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """|c - r| of flat arrays, with a NaN or inf on one side only as an infinite error and on both as none."""
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
    inputs: str = "as given"  # or how they were changed (`bngraph.verify`'s non-negative retry)

    def __bool__(self) -> bool:
        return bool(self.diffs) and all(d.passed for d in self.diffs)

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
            inputs = "" if self.inputs == "as given" else f" (inputs {self.inputs})"
            lines.append(
                f"PASSED | {len(self.diffs)} comparisons (outputs x runtimes) on batches {self.batch_sizes}{inputs} | "
                f"worst: {worst.output!r} ({worst.candidate} vs {worst.reference}) at {_ratio(worst.excess)} of allowed"
            )
        elif worst.problem:
            lines.append(f"FAILED | worst output {worst.output!r} ({worst.candidate}): {worst.problem}")
        else:
            rtol = f"--rtol {worst.min_rtol:.2g}" if np.isfinite(worst.min_rtol) else "no --rtol alone"
            if worst.exact:
                passes = "integers are compared exactly, whatever --atol says"
            elif np.isfinite(worst.max_abs):
                passes = f"it would pass with --atol {worst.min_atol:.2g} (or {rtol})"
            else:
                passes = "NaN or inf on one side only, which no tolerance passes"
            lines.append(
                f"FAILED | worst output {worst.output!r} ({worst.candidate} vs {worst.reference}): "
                f"{worst.failed_elements} of {worst.elements} elements beyond {worst.rule()}, max |c - r| "
                f"{worst.max_abs:.3g} at batch {worst.worst_batch} index {list(worst.worst_index)} "
                f"(c {worst.worst_candidate:.6g} vs r {worst.worst_reference:.6g}); {passes}"
            )
            if verdict := worst.exact_verdict():
                lines.append(f"FAILED | {verdict}")
        return lines

    def facts(self) -> dict:
        worst = self.worst
        return {
            "passed": bool(self),
            "atol": sorted({d.atol for d in self.diffs}),
            "rtol": sorted({d.rtol for d in self.diffs}),
            "batch_sizes": list(self.batch_sizes),
            "inputs": self.inputs,
            "worst_output": worst.output if worst else None,
            "worst_runtime": worst.candidate if worst else None,
        }


# An output of a lower precision than float32 (a float16 model) is rounded to its epsilon on
# every op, and a fold rounds W * s to it once more: the float16 conv+BN model of
# tests/test_verify_trust.py folds with errors that pass only at atol 0.0029 of the RMS against
# PyTorch and 0.0027 in onnxruntime (`bngraph verify ... --atol`), ~3 of float16's epsilons, where
# float32's tolerances allow 1e-5 and 1e-4. There atol and rtol are 4 epsilons each (0.0039): that
# fold at 0.42-0.46 of what they allow, a 1% error failing.
LOW_PRECISION_EPSILONS = 4


def default_tolerance(reference_kind: str, candidate_kind: str, dtype=np.float32, weights_eps: float = 0.0) -> float:
    """The tolerance (atol and rtol) for an output of `dtype`, the lower precision of the two, of
    a model whose least precise tensor read in its forward rounds to `weights_eps` (a bfloat16
    layer in a float32 model rounds at bfloat16's epsilon, whatever its output's dtype;
    `bngraph.runners.ComputedPrecision`)."""
    tolerance = TORCH_TOLERANCE if reference_kind == candidate_kind == "torch" else ONNX_TOLERANCE
    eps = max(float(np.finfo(dtype).eps) if np.dtype(dtype).kind == "f" else 0.0, weights_eps)
    if eps > np.finfo(np.float32).eps:
        tolerance = max(tolerance, LOW_PRECISION_EPSILONS * eps)
    return tolerance


def output_dtype(*batches: Sequence[np.ndarray]):
    """The float dtype of least precision among the batches of an output (float32 where none is
    a float)."""
    floats = [np.asarray(b).dtype for batch in batches for b in batch if np.asarray(b).dtype.kind == "f"]
    return max(floats, key=lambda d: np.finfo(d).eps, default=np.dtype(np.float32))


def fold_tolerance(rounding_gain: float) -> float | None:
    """verify's default (None), unless a BN magnifies float32 rounding by `rounding_gain`
    (`_bn_affine.rounding_gain`, the largest of the model's): any fold of it errs by up to about
    gain x 2**-24 of the output's scale (measured: 0.04-0.25 of that on
    `tests.passes.fold_util.nearly_dead_channel` at gains 1e3-2.7e5), and the check allows 4x it."""
    tolerance = rounding_gain * 2.0**-24 * 4
    return tolerance if tolerance > TORCH_TOLERANCE else None
