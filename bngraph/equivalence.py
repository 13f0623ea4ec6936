"""Does a transformed model still compute what it was made from? One check, run before writing.

    check_same_function(original, folded, example_inputs, what="the folded model")

Every command that promises an unchanged function (fold, export's FX fold, insert with
--preserve, a trace) runs both models in eval mode on the example input and on a random batch
of another size, the smallest that differs (1, or 2 after an example of 1; the next size up
where the model itself refuses a batch of 1; only inputs with a batch axis change size; see
`bngraph.runners`), compares
every output with `bngraph.compare`'s rule and tolerances (PyTorch against PyTorch: 1e-5 of the
output's RMS plus 1e-5 relative), and raises `CheckFailed` naming the output that differs and by
how much. Both run with the same random seed, so a forward that draws random numbers (dropout
with training=True) compares equal when the transformation kept those draws. Neither model's
mode is changed: each submodule's training flag is put back. `recalibrate` changes the function
on purpose; `check_only_statistics_changed` checks that it changed nothing else.

A fixed tolerance cannot fit every model: a deep one's own float32 arithmetic can stray from its
exact result by more (HuggingFace's MobileNetV1 after ten training steps: 5.6e-5 of its output's
RMS, against itself run in float64). So an output beyond the tolerance passes where the
transformed model is at most `OWN_ROUNDING_FACTOR` (4) times as far from that exact result as the
original is, and the original's distance is at most `OWN_ROUNDING_CAP` (1e-4) of the output's RMS;
the check says so in its notes (`Reference.notes`), which the command's report carries. A wrong
fold errs by the size of a BN statistic, ~0.1 of the RMS: 250x more than this ever admits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from bngraph.compare import OWN_ROUNDING_FACTOR
from bngraph.errors import CheckFailed, ModelNotAFunction
from bngraph.runners import Float64Runner, SeededRunner, batch_axes_of, example_batches, seeded
from bngraph.verify import verify

OWN_ROUNDING_CAP = 1e-4  # of the output's RMS: a model that rounds worse is refused, with the figure


class Reference:
    """The original model's outputs on the check's batches, computed once for several checks."""

    def __init__(self, original: nn.Module, example_inputs: Sequence[torch.Tensor]):
        self.runner = SeededRunner(original, "original")
        self.batches = [[_numpy(x) for x in example_inputs]]
        axes = batch_axes_of(example_inputs)
        sizes = {x.shape[0] for x, axis in zip(example_inputs, axes) if axis is not None}
        if len(sizes) == 1:
            size = sizes.pop()
            # The smallest other size costs the least; where the model refuses it (a squeeze that
            # takes the batch axis away), the next size up.
            for other_size in [1, size + 1] if size > 1 else [2]:
                other = example_batches(example_inputs, [other_size], axes, seed=1234)
                try:
                    self.runner(other[0])
                except Exception:
                    continue
                self.batches += other
                break
            # else the model itself only takes its example's batch size: check on that alone
        self.notes: list[str] = []  # outputs that passed within the model's own rounding, for the report
        self._float64: Float64Runner | None = None
        state = {k: v.detach().clone() for k, v in original.state_dict().items()}
        self.runner(self.batches[0])  # a model that fails on its own example input fails here, as itself
        self._check_is_a_function(state)

    def _check_is_a_function(self, state_before: dict[str, torch.Tensor]) -> None:
        """ModelNotAFunction where the original computes something else on the same input each time it
        runs (its forward counts its calls into a buffer it then reads): any copy would differ
        from it by its calls, not by what a transformation did."""
        again = SeededRunner(self.runner.module, "the original, run again")
        # NaN everywhere agrees here: the passes that run next name NaN statistics, and a fold's check refuses it.
        result = verify(self.runner, again, self.batches[:1], explain_failures=False, refuse_nothing_compared=False)
        if result:
            return
        now = self.runner.module.state_dict()
        changed = [k for k, v in state_before.items() if k in now and not torch.equal(now[k], v)]
        written = f" (its forward writes {', '.join(repr(k) for k in changed[:3])})" if changed else ""
        raise ModelNotAFunction(
            f"the model computes something else each time it runs on the same input in eval mode{written}: "
            f"output {result.worst.output!r} moved by up to {result.worst.max_abs:.3g} between two calls; no "
            "transformed copy can be checked against it, so nothing was written"
        )

    def check(
        self,
        transformed: nn.Module,
        *,
        what: str,
        atol: float | None = None,
        rtol: float | None = None,
        example_only: bool = False,
        example_output=None,
    ) -> float:
        """Raise CheckFailed unless `transformed` computes the reference's outputs (on the example
        input alone with `example_only`); return the worst error as a fraction of the tolerance
        (above 1 where an output passed within the model's own rounding: see `notes`).
        `example_output`: `transformed`'s output on the example input, where a run the caller
        needed anyway computed it (under `seeded()`, in eval mode): not run again."""
        batches = self.batches[:1] if example_only else self.batches
        runner = SeededRunner(transformed, what)
        if example_output is not None:
            runner.know(batches[0], example_output)
        # A transformation (a fold, inserted BNs, a trace) never changes an output's dtype.
        # The trace's check (example_only) runs before the passes that name a BN's NaN statistics.
        result = verify(self.runner, runner, batches, atol, rtol, explain_failures=False,  # `_rounding_note` does
                        dtypes_must_match=True, refuse_nothing_compared=not example_only)
        if not result and not self._within_own_rounding(result, runner, batches, what):
            worst = result.worst
            batch = (
                f"batch of {result.batch_sizes[worst.worst_batch]}"
                if worst.worst_batch < len(result.batch_sizes)
                else "a batch"
            )
            if worst.problem:
                raise CheckFailed(
                    f"{what} differs from the model it was made from: output {worst.output!r}: {worst.problem}"
                )
            if worst.scale <= np.finfo(np.float32).tiny:  # every reference value is 0: no size to judge by
                raise CheckFailed(
                    f"{what} differs from the model it was made from: output {worst.output!r} is 0 everywhere in the "
                    f"original on the check's batches and up to {worst.max_abs:.3g} in the transformed model; an "
                    "all-zero output gives no scale that tells float rounding from a wrong result, so nothing was written"
                )
            raise CheckFailed(
                f"{what} differs from the model it was made from: output {worst.output!r} by up to {worst.max_abs:.3g} "
                f"({worst.max_rel:.3g} of its RMS, {worst.failed_elements} of {worst.elements} elements beyond "
                f"tolerance, worst on the {batch}){self._rounding_note(worst, runner, batches)}; nothing was written"
            )
        return max((d.excess for d in result.diffs), default=0.0)

    def _from_exact(self, runner: SeededRunner, output: str, batches) -> float | None:
        """The largest |float32 - float64| of `runner`'s `output` on `batches`, against the
        original run in float64: how far a float32 model strays from the original's exact result.
        None where the original does not run in float64."""
        try:
            if self._float64 is None:
                self._float64 = Float64Runner(self.runner.module)
            distance = 0.0
            for inputs in batches:
                exact = self._float64(inputs)[self._float64.output_names.index(output)]
                distance = max(distance, float(np.max(np.abs(runner(inputs)[runner.output_names.index(output)] - exact))))
        except Exception:  # noqa: BLE001 (a model that fixes float32 somewhere: no figure, the tolerance stands)
            return None
        return distance if np.isfinite(distance) else None

    def _within_own_rounding(self, result, runner: SeededRunner, batches, what: str) -> bool:
        """Whether every output beyond the tolerance is within the original's own rounding (see the
        module docstring); if so, a note for each in `notes`."""
        notes = []
        for d in (d for d in result.diffs if not d.passed):
            if d.problem or d.scale <= np.finfo(np.float32).tiny:
                return False
            own = self._from_exact(self.runner, d.output, batches)
            if own is None or own > OWN_ROUNDING_CAP * d.scale:
                return False
            theirs = self._from_exact(runner, d.output, batches)
            if theirs is None or theirs > OWN_ROUNDING_FACTOR * own:
                return False
            notes.append(
                f"{what}: output {d.output!r} differs from the model's by up to {d.max_rel:.2g} of its RMS, beyond the "
                f"check's {d.atol:.2g}, but is off the model's exact (float64) result by {theirs / d.scale:.2g} of the "
                f"RMS where the model itself is off by {own / d.scale:.2g}: float32 rounding, which this model amplifies"
            )
        self.notes += notes
        return True

    def _rounding_note(self, worst, runner: SeededRunner, batches) -> str:
        """Where `worst` failed, how far each model is from the original's exact (float64) result:
        tells a refusal of an ill-conditioned model (a LayerNorm over near-equal features) from a
        wrong transformation. Empty where the model does not run in float64."""
        own = self._from_exact(self.runner, worst.output, batches)
        theirs = self._from_exact(runner, worst.output, batches)
        if own is None or theirs is None:
            return ""
        if theirs > OWN_ROUNDING_FACTOR * own:
            verdict = f"{_ratio(theirs, own)} the model's own float32 rounding"
        else:
            verdict = (f"within {OWN_ROUNDING_FACTOR:g}x the model's own float32 rounding, but that rounding is beyond "
                       f"the {OWN_ROUNDING_CAP:g} of the RMS within which it can be told from a wrong result")
        return (f"; against the model's exact (float64) result it is off by {theirs / worst.scale:.2g} of the RMS, "
                f"the model itself by {own / worst.scale:.2g}: {verdict}")


def _ratio(theirs: float, own: float) -> str:
    return "far beyond" if own == 0 or theirs > 1000 * own else f"{theirs / own:.3g}x"


def check_same_function(
    original: nn.Module,
    transformed: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    what: str,
    atol: float | None = None,
    rtol: float | None = None,
) -> float:
    """Raise CheckFailed unless `transformed` computes what `original` computes in eval mode (see
    the module docstring); return the worst error as a fraction of the tolerance."""
    return Reference(original, example_inputs).check(transformed, what=what, atol=atol, rtol=rtol)


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def check_only_statistics_changed(state_before: dict[str, torch.Tensor], model: nn.Module, *, what: str) -> None:
    """Raise CheckFailed unless `model` holds the same tensors as `state_before` (its state dict
    before a pass that may only re-estimate BatchNorm statistics, as `recalibrate` does) apart
    from the BatchNorms' running statistics."""
    statistics = {f"{path}.{name}".lstrip(".") for path, m in model.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) for name in _STATISTICS}
    state = model.state_dict()
    if state.keys() != state_before.keys():
        changed = sorted(state.keys() ^ state_before.keys())
        raise CheckFailed(f"{what} holds other tensors than the model it was made from: {', '.join(changed[:5])}")
    for key, value in state.items():
        if key not in statistics and not torch.equal(value, state_before[key]):
            raise CheckFailed(f"{what} changed {key}, which is not a BatchNorm statistic")


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


__all__ = ["Reference", "check_only_statistics_changed", "check_same_function", "seeded"]
