"""`bngraph verify`: reference vs candidate on the same inputs, every output compared.

    result = verify(model, "model.onnx", random_batches([(1, 3, 32, 32)]))  # bngraph.runners
    if not result:
        print(result.worst.line())
    result, report = verify_models("model.py:Net", "folded/", weights="net.pt")   # the command

Each side runs through a runner (`bngraph.runners`): a PyTorch module, an ONNX model in
onnxruntime at ORT_DISABLE_ALL and ORT_ENABLE_ALL, or onnx's ReferenceEvaluator. A PyTorch
model's result is flattened to named tensors (dicts, dataclasses such as HuggingFace's
ModelOutput, NamedTuples, lists and tuples, nested; None skipped; a complex tensor as its real
and imaginary parts); an ONNX model's outputs are
named by its graph and paired with the other side's by position. Outputs that differ in number
(or, between two PyTorch models, in names) fail; comparing no tensor at all is an error, and so
is an output that is NaN or inf on both sides at every element (nothing of it compared). The
rule each output passes by, and the default tolerances: `bngraph.compare`. The result of
`verify` is truthy on a pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bngraph.compare import OutputDiff, VerifyResult, compare, default_tolerance, output_dtype
from bngraph.data import model_images
from bngraph.errors import ModelRaised, UserError, one_line, running_user_model
from bngraph.library_call import library_call
from bngraph.load import load_model
from bngraph.report import Report
from bngraph.runners import (
    BATCH_SIZES, Float64Runner, OrtRunner, TorchRunner, crossed_name, embedding_bounds, eval_mode, forward_parameter_names,
    input_order, integer_range, keyword_call, named_leaves, onnx_inputs, random_batches, required_parameter_names, runners_for,
    unbatched_note, unbatched_sizes,
)
from bngraph.spec import parse_input_dtypes, parse_input_shapes, parse_model_spec

DATA_EXAMPLES = 97  # an odd batch of real images, besides the random ones


@library_call
def verify(
    reference: Any,
    candidate: Any,
    inputs: Sequence[Sequence[np.ndarray]],
    atol: float | None = None,
    rtol: float | None = None,
    *,
    evaluator: bool = False,
    batch_sizes: Sequence[int] | None = None,
    explain_failures: bool = True,
    input_names: Sequence[str] | None = None,
    dtypes_must_match: bool = False,
    refuse_nothing_compared: bool = True,
) -> VerifyResult:
    """Run both on each batch of `inputs` and compare every output (see the module docstring).

    `reference` and `candidate` are nn.Modules or ONNX models (a path, bytes, a ModelProto).
    An ONNX model runs at both onnxruntime levels (and in onnx's ReferenceEvaluator with
    `evaluator`); two ONNX models are compared level by level. `atol`/`rtol` default to
    `default_tolerance` for the kinds compared. `batch_sizes` labels the batches in the report
    (default: the first dimension of each batch's first input that has one). On a failure
    against a float32 PyTorch reference, each failed output gets `from_exact` unless
    `explain_failures` is false (`bngraph.equivalence` measures that itself, with its own runs).
    `input_names` names the inputs of each batch (default: the reference's): an ONNX model that
    names the same inputs in another order is fed them by name, as its users call it; a PyTorch
    model against another is fed them by position, as it is called. Two PyTorch models' dict
    outputs are paired by key. An output whose
    dtype differs between the two is compared at the less precise one's tolerance and its diff
    names both (`OutputDiff.dtypes`); with `dtypes_must_match` (a fold, which never changes one)
    it fails. An output NaN or inf on both sides at every element is a UserError unless
    `refuse_nothing_compared` is false (a check whose own passes name the cause better).
    """
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if tol is not None and not 0 <= tol < math.inf:  # inf passed any candidate at all
            raise UserError(f"--{name} must be a finite number >= 0, not {tol}")
    if inputs is None:
        raise UserError("verify's inputs are None: give a list of batches, each a list of the forward's inputs: [[x]]")
    if not isinstance(inputs, (torch.Tensor, np.ndarray, Sequence)):  # a generator of batches: each is read again
        inputs = list(inputs)
    if isinstance(inputs, (torch.Tensor, np.ndarray)) or any(isinstance(b, (torch.Tensor, np.ndarray)) for b in inputs):
        # A batch that is one tensor was taken as a list of inputs: its rows, a model call each.
        raise UserError("verify's inputs are a list of batches, each a list of the forward's inputs: [[x]] for one "
                        "batch of a one-input model, not [x] or x")
    if not inputs:
        raise UserError("nothing to compare: no input batches")
    refs, cands = runners_for(reference, evaluator=evaluator), runners_for(candidate, evaluator=evaluator)
    if all(r.kind == "torch" for r in (*refs, *cands)):
        # Two PyTorch models: what is not a tensor counts too ((logits, 0.43) vs (logits, -123.0)).
        for runner in (*refs, *cands):
            runner.every_leaf = True
    names_given = list(input_names or refs[0].input_names)
    orders = {id(r): input_order(r.input_names, names_given) for r in (*refs, *cands)}
    against_a_file = any(r.kind == "onnx" for r in (*refs, *cands))
    for r in (*refs, *cands):
        # Fed by position where the names differ (a model and a file it is checked against, whose
        # names given may be the file's): a name both use at other positions would get another
        # input's values (a file exported with `mask` as a keyword, skipping `past`).
        if against_a_file and r.kind == "torch" and orders[id(r)] is None:
            r.keywords = keyword_call(r.input_names, names_given)
        if against_a_file and r.kind == "torch":
            _refuse_missing_required(r, names_given)
        if against_a_file and orders[id(r)] is None and not getattr(r, "keywords", None) \
                and (name := crossed_name(r.input_names, names_given)):
            here, there = list(r.input_names).index(name), names_given.index(name)
            whose = (f"{type(r.module).__name__}'s forward takes {name!r} as input {here}"
                     if r.kind == "torch" else f"{getattr(r, 'source', None) or r.label} has input {name!r} at {here}")
            raise UserError(f"{whose}, the other side at {there}: fed by position, it would get another input's "
                            "values; give both the inputs in one order (the forward's: bngraph export writes it so)")
    if all(r.kind == "torch" for r in (*refs, *cands)):
        # Two PyTorch models are called as their users call them, by position: by name,
        # forward(self, y, x) against forward(self, x, y) failed where both compute x - 2y of
        # their first and second inputs, and a pair that differed positionally passed.
        orders = dict.fromkeys(orders)
    if len(refs) > 1 and len(cands) > 1:
        pairs = list(zip(refs, cands))  # same level against same level
    else:
        pairs = [(r, c) for r in refs for c in cands]
    if batch_sizes is None:
        batch_sizes = [next((len(x) for x in map(np.asarray, batch) if x.ndim), 1) for batch in inputs]
    elif len(batch_sizes) != len(inputs):  # a label per batch: an IndexError at the first failure
        raise UserError(f"batch_sizes labels {len(batch_sizes)} batches; the inputs hold {len(inputs)}")
    result = VerifyResult(batch_sizes=list(batch_sizes))
    outputs: dict[int, list[list[np.ndarray]]] = {}
    structures: dict[int, list[list[str | None]]] = {}  # of sequence and map outputs (`_flattened`)

    def hint(failed: int, err: BaseException | None = None) -> str:
        """What to try, for a model that fails on batch `failed` of `inputs`."""
        axes = re.findall(r"index: (\d+) Got", str(err or ""))
        if axes and "0" not in axes:  # onnxruntime: the file declares other sizes on other axes
            return ""
        if len(inputs[0]) > 1:  # a model with several inputs may have one without a batch axis
            return " (an input without a batch axis? name it: --static-input INDEX)"
        ran = {result.batch_sizes[b] for b in range(failed)} - {result.batch_sizes[failed]}
        if ran:  # one input, run at batch 1 and not at 7: the model fixes its batch (a Reshape to [1, ...])
            return (f" (it runs at batch {min(ran)}: if the model fixes its batch, keep the input's own shape "
                    "with --static-input 0)")
        # The first batch already fails: axis 0 may be no batch (a sequence-first LSTM's time steps).
        return " (if axis 0 of the input is not its batch, keep the input's own shape with --static-input 0)"

    def run(runner) -> list[list[np.ndarray]]:
        if id(runner) not in outputs:
            order, raw = orders[id(runner)], []
            for b, batch in enumerate(inputs):
                which = f"a batch of {result.batch_sizes[b]} (batch {b} of {result.batch_sizes})"
                try:
                    raw.append(runner(batch if order is None else [batch[i] for i in order]))
                except ModelRaised as err:
                    raise ModelRaised(f"{err}; on {which}{hint(b)}") from err
                except UserError:
                    raise
                except Exception as err:
                    raise UserError(f"{_what(runner)} failed on {which}: {one_line(err)}{hint(b, err)}") from err
            flat = [[_flattened(value) for value in batch] for batch in raw]
            outputs[id(runner)] = [[array for array, _ in batch] for batch in flat]
            structures[id(runner)] = [[structure for _, structure in batch] for batch in flat]
        return outputs[id(runner)]

    compared = []  # (diff, reference runner, candidate runner, output index in each)
    for ref, cand in pairs:
        ref_out, cand_out = run(ref), run(cand)
        for runner in (ref, cand):  # {"a.b": h, "a": {"b": g}}: paired by position, they were swapped unseen
            if twice := sorted({n for n in runner.output_names or [] if (runner.output_names or []).count(n) > 1}):
                if runner.kind == "onnx":  # valid ONNX: a tensor listed twice among the graph's outputs
                    raise UserError(f"{getattr(runner, 'source', None) or runner.label} lists the graph output {twice[0]!r} twice: verify pairs outputs "
                                    "by name and cannot tell the two apart; list it once")
                raise UserError(f"{runner.label}'s outputs name {twice[0]!r} twice once their keys are joined with "
                                "'.': verify cannot tell which is which; give them distinct keys")
        names, problem = _paired_names(ref, cand, len(ref_out[0]), len(cand_out[0]))
        # First: a side whose outputs change with the batch explains a count unlike the other's
        # ("2 outputs ['main', 'aux'] vs 1 ['main', 'aux']", names from one batch, count from another).
        problem = _count_changes_with_batch(ref, ref_out, result.batch_sizes) \
            or _count_changes_with_batch(cand, cand_out, result.batch_sizes) or problem
        # Outputs by name where both sides name the same ones in another order (an ONNX graph's
        # `b, a` against a model's {"a": ..., "b": ...}), else by position.
        order = input_order(ref.output_names or [], cand.output_names or [])
        if order is not None:
            names = list(ref.output_names)
        elif not problem and (name := crossed_name(ref.output_names or [], cand.output_names or [])):
            problem = (f"output {name!r} is output {ref.output_names.index(name)} of {ref.label} and "
                       f"{cand.output_names.index(name)} of {cand.label}: paired by position, each would be "
                       "judged under another's name; give the outputs the same names, or none in common")
        if problem:
            tolerance = default_tolerance(ref.kind, cand.kind)
            atol_used, rtol_used = (tolerance if atol is None else atol), (tolerance if rtol is None else rtol)
            diff = OutputDiff(names[0], ref.label, cand.label, atol_used, rtol_used, passed=False, problem=problem)
            result.diffs.append(diff)
            continue
        for i, name in enumerate(names):
            j = i if order is None else order[i]
            ref_batches, cand_batches = [batch[i] for batch in ref_out], [batch[j] for batch in cand_out]
            if problem := _structures_differ(ref_batches, cand_batches, [b[i] for b in structures[id(ref)]],
                                             [b[j] for b in structures[id(cand)]]):
                result.diffs.append(OutputDiff(name, ref.label, cand.label, 0.0, 0.0, passed=False, problem=problem))
                continue
            # None (an empty optional), strings (onnxruntime's are objects), any object: compared exactly
            if any(not isinstance(a, np.ndarray) or a.dtype.kind in "UOS" for a in (*ref_batches, *cand_batches)):
                result.diffs.append(_compare_exactly(name, ref_batches, cand_batches, (ref.label, cand.label)))
                continue
            dtypes = _changed_dtypes(ref_batches, cand_batches)
            if dtypes and dtypes_must_match:
                result.diffs.append(OutputDiff(name, ref.label, cand.label, 0.0, 0.0, passed=False, dtypes=dtypes,
                                               problem=f"its dtype changed: {dtypes[0]} vs {dtypes[1]}"))
                continue
            # A complex output as its parts; an ONNX file holds one so already (a last axis of 2).
            ref_batches, cand_batches = (_real_and_imaginary(side) if any(a.dtype.kind == "c" for a in side) else side
                                         for side in (ref_batches, cand_batches))
            if all(a.dtype.kind in "iub" for a in (*ref_batches, *cand_batches)):
                # Token ids, class indices, masks: off by 3 is wrong, whatever the output's RMS.
                diff = compare(name, ref_batches, cand_batches, 0.0, 0.0, (ref.label, cand.label), scale=1.0)
                diff.exact, diff.dtypes = True, dtypes
                result.diffs.append(diff)
                compared.append((diff, ref, cand, i, j))  # a reference that draws random numbers says so
                continue
            weights_eps = max(getattr(r, "eps_of_output", lambda k: 0.0)(k) for r, k in ((ref, i), (cand, j)))  # 0: ONNX
            tolerance = default_tolerance(ref.kind, cand.kind, output_dtype(ref_batches, cand_batches), weights_eps)
            atol_used, rtol_used = (tolerance if atol is None else atol), (tolerance if rtol is None else rtol)
            diff = compare(name, ref_batches, cand_batches, atol_used, rtol_used, (ref.label, cand.label))
            diff.dtypes = dtypes
            result.diffs.append(diff)
            compared.append((diff, ref, cand, i, j))
    if refuse_nothing_compared and _nothing_compared(result.diffs):
        # A model whose input is a magnitude (a power spectrogram it takes the Log of) is NaN
        # everywhere on N(0, 1) values: compared on their absolute values instead, and said so.
        absolute = [[np.abs(x) if np.asarray(x).dtype.kind == "f" else x for x in batch] for batch in inputs]
        if any(np.asarray(x).dtype.kind == "f" and (np.asarray(x) < 0).any() for batch in inputs for x in batch):
            retried = verify(reference, candidate, absolute, atol, rtol, evaluator=evaluator, batch_sizes=batch_sizes,
                             explain_failures=explain_failures, input_names=input_names,
                             dtypes_must_match=dtypes_must_match)
            # Only those outputs: another one may differ on negative inputs alone (w(x) vs w(relu(x))).
            empty = _all_nonfinite_outputs(result.diffs)
            result.diffs = [d for d in result.diffs if d.output not in empty] + \
                           [d for d in retried.diffs if d.output in empty]
            result.inputs = (f"made non-negative (their absolute values) for {_listed(sorted(empty))}, NaN or inf "
                             "at every element on N(0,1) inputs")
            return result
        raise UserError(
            f"output {_nothing_compared(result.diffs)!r} is NaN or inf at every element in both models, so nothing of it "
            "was compared: random inputs (N(0,1), and their absolute values) give NaN there; compare on real inputs "
            "with bngraph verify --data"
        )
    if not result and explain_failures:
        _measure_from_exact(compared, inputs, outputs, orders)
    return result


def _flattened(value: Any) -> tuple[np.ndarray, str | None]:
    """An output as one array, and its structure in words where it is a sequence or a map (an
    ONNX SequenceConstruct's list of arrays, sklearn-onnx's ZipMap list of {label: probability}):
    its tensors' (or values') elements in order, by key in a map, compared as one tensor's are."""
    if not isinstance(value, (list, tuple, dict)):
        return value, None
    leaves: list[np.ndarray] = []

    def walk(item: Any) -> str:
        if isinstance(item, dict):
            return "{" + ", ".join(f"{key!r}: {walk(item[key])}" for key in sorted(item)) + "}"
        if isinstance(item, (list, tuple)):
            return "[" + ", ".join(walk(x) for x in item) + "]"
        array = np.asarray(item)
        leaves.append(array.ravel())
        return f"{array.dtype.name}{list(array.shape)}"

    structure = walk(value)
    return (np.concatenate(leaves) if leaves else np.zeros(0, np.float32)), structure


def _structures_differ(ref_batches, cand_batches, ref_structures, cand_structures) -> str | None:
    """Why a sequence or map output cannot be compared element by element (another length, other
    keys, other shapes), on the first batch where it differs; None where it can."""
    def words(structure: str | None, array: np.ndarray) -> str:
        text = structure or f"a tensor {list(np.shape(array))}"
        return text if len(text) <= 80 else text[:77] + "..."

    for b, (r, c) in enumerate(zip(ref_structures, cand_structures)):
        if r != c:
            return f"sequence or map outputs differ on batch {b}: {words(c, cand_batches[b])} vs {words(r, ref_batches[b])}"
    return None


def _count_changes_with_batch(runner, outputs: Sequence[Sequence], batch_sizes: Sequence[int]) -> str | None:
    """Where a side returns another number of outputs on another batch (a tuple of one at batch 1,
    of two at others): said as the problem (the outputs of batch 0 were indexed in every batch)."""
    counts = [len(batch) for batch in outputs]
    if len(set(counts)) == 1:
        return None
    b = next(i for i, n in enumerate(counts) if n != counts[0])
    return (f"{runner.label} returns {counts[0]} output(s) on a batch of {batch_sizes[0]} and {counts[b]} on a batch "
            f"of {batch_sizes[b]}: its outputs change with the batch size")


def _real_and_imaginary(batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A complex output as its real and imaginary parts, a last axis of 2, compared as any float
    output is: cast to float64, a conjugate spectrum passed with error 0 (the imaginary part dropped)."""
    return [np.stack([np.real(a), np.imag(a)], axis=-1) for a in batches]


def _changed_dtypes(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> tuple[str, str] | None:
    """(the candidate's dtype, the reference's) of one output where they differ, else None."""
    ref_dtype, cand_dtype = reference[0].dtype, candidate[0].dtype
    return None if ref_dtype == cand_dtype else (cand_dtype.name, ref_dtype.name)


def _nothing_compared(diffs: Sequence[OutputDiff]) -> str | None:
    """The first output that is NaN or inf on both sides at every element, at every runtime
    level, or None. NaN against NaN agrees (`bngraph.compare`), but such an output would pass
    whatever the two models compute: a log-spectrogram front end fed N(0, 1) values (Log of a
    negative) passed against one with other weights. No check, no pass. At every level:
    onnxruntime's own BN fold may overflow a float16 model at one level only."""
    return next(iter(_all_nonfinite_outputs(diffs)), None)


def _all_nonfinite_outputs(diffs: Sequence[OutputDiff]) -> list[str]:
    by_output: dict[str, list[OutputDiff]] = {}
    for diff in diffs:
        by_output.setdefault(diff.output, []).append(diff)
    return [name for name, compared in by_output.items()
            if all(d.elements and d.nonfinite_elements == d.elements for d in compared)]


def _measure_from_exact(compared, inputs, outputs: dict[int, list[list[np.ndarray]]], orders: dict) -> None:
    """For each output that failed: whether the reference gives another output when run again on
    the first batch (`OutputDiff.reference_varies`); else, against a float32 PyTorch reference,
    how far the candidate and the reference are from the reference run in float64 on the same
    batches (`OutputDiff.from_exact`), and against an ONNX one, how far its two onnxruntime
    levels are apart (`OutputDiff.levels_apart`). Only after a failure: it runs the model again."""
    varies: dict[int, bool] = {}
    exact: dict[int, list[list[np.ndarray]] | None] = {}
    for diff, ref, cand, i, j in compared:
        if diff.passed or diff.problem or diff.scale <= np.finfo(np.float32).tiny:
            continue
        if not np.isfinite(diff.max_abs):  # NaN or inf against a number: no rounding explains it
            continue
        if id(ref) not in varies:  # an ONNX file draws too (Bernoulli, RandomNormal)
            order = orders.get(id(ref))  # as `run` fed it
            again = [_flattened(value)[0] for value in ref(inputs[0] if order is None else [inputs[0][k] for k in order])]
            varies[id(ref)] = not all(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
                                      for a, b in zip(again, outputs[id(ref)][0]))
        if varies[id(ref)]:
            diff.reference_varies = True
            continue
        if diff.exact:  # integers: no rounding to measure
            continue
        if isinstance(ref, OrtRunner):
            _measure_levels_apart(diff, ref, cand, i, compared, outputs)
            continue
        if ref.kind != "torch":
            continue
        if id(ref) not in exact:
            order = orders.get(id(ref))
            exact[id(ref)] = _float64_outputs(ref.module, [b if order is None else [b[k] for k in order] for b in inputs],
                                              ref.keywords)
        wide = exact[id(ref)]
        if wide is None or any(outputs[id(ref)][b][i].dtype != np.float32 for b in range(len(inputs))):
            continue
        theirs, own = _largest_difference(outputs[id(cand)], wide, i, j), _largest_difference(outputs[id(ref)], wide, i)
        if np.isfinite(theirs) and np.isfinite(own):
            diff.from_exact = (theirs / diff.scale, own / diff.scale)


def _measure_levels_apart(diff, ref, cand, i: int, compared, outputs) -> None:
    """`OutputDiff.levels_apart`: the candidate's largest error, and how far the ONNX reference
    at its other onnxruntime level is from itself on output `i` (its own float32 rounding, which
    a fold's rounding matches: a sigmoid near 0 on random inputs moves 1.5e-7 either way)."""
    other = next((r for _, r, *_ in compared if isinstance(r, OrtRunner) and r is not ref), None)
    if other is None:
        return
    own = max(float(np.max(np.abs(np.asarray(a[i], np.float64) - np.asarray(b[i], np.float64)), initial=0.0))
              for a, b in zip(outputs[id(ref)], outputs[id(other)]))
    if np.isfinite(own):
        diff.levels_apart = (diff.max_abs / diff.scale, own / diff.scale)


def _compare_exactly(name: str, reference, candidate, labels: tuple[str, str]) -> OutputDiff:
    """An output that is not a number (`named_arrays`' string arrays, onnxruntime's string
    tensors, None for an empty optional): equal on every batch, or not."""
    diff = OutputDiff(name, labels[0], labels[1], 0.0, 0.0, passed=True, batches=len(reference), elements=len(reference))

    def show(a) -> str:
        if not isinstance(a, np.ndarray):
            return repr(a)
        if a.dtype.kind == "U" and a.size == 1:  # `named_arrays`' text of a value: shown as it is
            return str(a.item())
        return repr(a.item()) if a.size == 1 and a.dtype.kind in "OS" else f"a {a.dtype} array of shape {a.shape}"

    for ref, cand in zip(reference, candidate):
        same = (ref is None and cand is None) or (
            isinstance(ref, np.ndarray) and isinstance(cand, np.ndarray) and ref.dtype.kind == cand.dtype.kind
            and ref.shape == cand.shape and ref.tolist() == cand.tolist())
        if not same:
            diff.passed, diff.problem = False, f"not a tensor, and not the same: {show(cand)} vs {show(ref)}"
            break
    return diff


def _largest_difference(batches: list[list[np.ndarray]], exact: list[list[np.ndarray]], i: int, j: int | None = None) -> float:
    """max |batches - exact| over every batch, of the exact output `i` and output `j` (default `i`)."""
    j = i if j is None else j
    return max(float(np.max(np.abs(outs[j] - wide[i]))) for outs, wide in zip(batches, exact))


def _float64_outputs(module: torch.nn.Module, inputs, keywords=None) -> list[list[np.ndarray]] | None:
    """`module`'s exact (float64) outputs on `inputs` (by `keywords` where given), or None where it
    does not run in float64 (a model that fixes float32 somewhere: no figure)."""
    try:
        exact = Float64Runner(module)
        exact.keywords = keywords
        return [exact(batch) for batch in inputs]
    except Exception:  # noqa: BLE001 (the user's model in float64)
        return None


def _paired_names(ref, cand, ref_count: int, cand_count: int) -> tuple[list[str], str | None]:
    """The name of each output pair, or (a name, why they cannot be paired)."""
    ref_names = ref.output_names or [f"output{i}" for i in range(ref_count)]
    cand_names = cand.output_names or [f"output{i}" for i in range(cand_count)]
    if not getattr(ref, "tensor_outputs", ref_count) and not getattr(cand, "tensor_outputs", cand_count):
        raise UserError(
            f"nothing to compare: neither model returns a tensor ({_what(ref)} and {_what(cand)} give no tensor output)"
        )
    # Between two PyTorch models, by name: the same dict with its keys in another order computes
    # the same outputs (`verify` pairs them by key).
    if ref.kind == cand.kind == "torch" and sorted(ref_names) != sorted(cand_names):
        return ["(structure)"], f"output structures differ: {_listed(cand_names)} vs {_listed(ref_names)}"
    if ref_count != cand_count:
        return ["(structure)"], f"{cand_count} outputs {_listed(cand_names)} vs {ref_count} {_listed(ref_names)}"
    # An ONNX graph's names are what a user finds in the file; two PyTorch models agree on theirs.
    return (cand_names if cand.kind == "onnx" else ref_names), None


def _what(runner) -> str:
    module, source = getattr(runner, "module", None), getattr(runner, "source", None)
    if module is not None:
        return f"{runner.label} {type(module).__name__}"
    return f"{runner.label} {source}" if source else runner.label


def _listed(names: Sequence[str], most: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return f"[{shown}{', ...' if len(names) > most else ''}]"


def verify_models(
    reference: str,
    candidate: str,
    *,
    weights: str | None = None,
    candidate_weights: str | None = None,
    input_shape: str | None = None,
    input_dtype: str | None = None,
    static_inputs: Sequence[int] = (),
    data: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    evaluator: bool = False,
) -> tuple[VerifyResult, Report]:
    """`bngraph verify A B`: two model specs loaded, random batches of 1 and 7 (and real images
    from `data`) built for both, and `verify` run on them. `weights` loads a state dict into A,
    `candidate_weights` into B; the inputs are as the command's --input-shape, --input-dtype
    and --static-input say, else as the models declare."""
    given = parse_input_shapes(input_shape) if input_shape else None
    models, onnx_specs, onnx_texts = [], [], []
    sides = ((reference, weights, "--weights"), (candidate, candidate_weights, "--candidate-weights"))
    specs = [(parse_model_spec(text), text, side_weights, flag) for text, side_weights, flag in sides]
    if evaluator and not any(spec.kind == "onnx" for spec, *_ in specs):
        raise UserError("--reference runs onnx's ReferenceEvaluator on an ONNX file; neither model is one")
    torch_sides = {}  # loaded first: their declared shapes serve an ONNX file whose shapes are symbolic
    for i, (spec, text, side_weights, flag) in enumerate(specs):
        if spec.kind == "onnx" and side_weights:
            raise UserError(f"{flag} loads a PyTorch state dict; {text} is an ONNX file with its own weights")
        if spec.kind != "onnx":
            torch_sides[i] = load_model(
                spec, weights=side_weights, input_shape=input_shape, input_dtype=input_dtype, static_inputs=static_inputs
            )
    loaded = [model for model in torch_sides.values() if model.input_shapes]
    for i, (spec, text, _, _) in enumerate(specs):
        if spec.kind != "onnx":
            models.append(torch_sides[i].module)
            continue
        models.append(spec.path)
        try:
            onnx_specs.append(onnx_inputs(spec.path, given, static_inputs))
        except UserError:
            if given or not loaded:  # [?, 3, ?, ?] and nothing else says what: --input-shape
                raise
            onnx_specs.append(onnx_inputs(spec.path, loaded[0].input_shapes, static_inputs))
        onnx_texts.append(text)
    # The PyTorch side's declared shapes first, else the ONNX graph's (batch axis symbolic); the
    # dtypes the user gave, else the ONNX graph's, else the PyTorch side's.
    if loaded:
        shapes = loaded[0].input_shapes
        # The inputs it declares, not the optional ones after them (`scale=1.0`), which no file holds.
        names = forward_parameter_names(loaded[0].module)[:len(shapes) if shapes else None]
        _refuse_undeclared_inputs(loaded[0].module, names, onnx_specs, onnx_texts)
    elif onnx_specs:
        shapes, names = onnx_specs[0].shapes, onnx_specs[0].names
    else:
        raise UserError(f"neither {reference} nor {candidate} declares an input shape: give --input-shape")
    if input_dtype:
        dtypes = parse_input_dtypes(input_dtype)
        if len(dtypes) != len(shapes):
            raise UserError(f"--input-dtype gives {len(dtypes)} dtypes for {len(shapes)} inputs")
        for onnx_spec, text in zip(onnx_specs, onnx_texts):
            declared = [d.name for d in onnx_spec.dtypes]
            if declared != dtypes:
                raise UserError(f"--input-dtype gives {';'.join(dtypes)}; {text} declares {';'.join(declared)}")
    else:
        dtypes = _in_order(onnx_specs[0], onnx_specs[0].dtypes, names) if onnx_specs else loaded[0].input_dtypes
        if len(onnx_specs) == 2:
            _check_same_input_dtypes(onnx_specs, onnx_texts, names)
    # An input has a batch axis only where every side says so.
    sides_axes = [m.batch_axes for m in loaded] + [_in_order(s, s.batch_axes, names) for s in onnx_specs]
    if any(len(axes) != len(shapes) for axes in sides_axes):
        counts = sorted({len(axes) for axes in sides_axes} | {len(shapes)})
        raise UserError(f"the two models declare different numbers of inputs {counts}: give --input-shape")
    batch_axes = [0 if all(axes[i] == 0 for axes in sides_axes) else None for i in range(len(shapes))]
    fixed = {s.fixed_batch for s in onnx_specs} - {None}
    if len(fixed) > 1:
        raise UserError(f"the two ONNX files fix different batch sizes {sorted(fixed)}: no input fits both")
    unbatched = None if fixed else unbatched_sizes(shapes, batch_axes)
    sizes = (fixed.pop(),) * 2 if fixed else unbatched or BATCH_SIZES
    bounds = _index_bounds(models, onnx_specs, random_batches(shapes, sizes[:1], dtypes, batch_axes=batch_axes)[0])
    batches = random_batches(shapes, sizes, dtypes, batch_axes=batch_axes, index_bounds=bounds)
    batch_sizes = list(sizes)
    notes = _rows_reached(batches, bounds, names)
    if onnx_specs:
        resized = _at_other_sizes(models, onnx_specs, onnx_texts, names, shapes, dtypes, batch_axes, bounds, notes,
                                  batch_size=2 if sizes == BATCH_SIZES else sizes[0])
        if resized is not None:
            batches.append(resized)
            batch_sizes.append(_batch_size(resized, batch_axes))
    if data:
        batches.append(data_batch(data, shapes, dtypes[0] if dtypes else None))
        batch_sizes.append(len(batches[-1][0]))
    versions = [_state_versions(m) for m in models]
    result = verify(models[0], models[1], batches, atol, rtol, evaluator=evaluator, batch_sizes=batch_sizes,
                    input_names=names)
    report = Report(
        "bngraph verify",
        facts={"reference": reference, "candidate": candidate, **result.facts()},
        sections={"verification": [d.row() for d in result.diffs]},
    )
    report.notes += notes
    if unbatched:  # [1, 1, 1, 7] said the batch was varied where no input has one
        report.notes.append(unbatched_note(unbatched))
    elif sizes != BATCH_SIZES:
        report.notes.append(f"an ONNX file fixes the batch at {sizes[0]}: compared at that batch only")
    for text, model, before in zip((reference, candidate), models, versions):
        if written := _written_state(model, before):
            # Silent, a candidate that doubled its output from its 7th call on passed.
            report.notes.append(f"{text} writes {_listed(written)} in its forward, in eval mode: what it computes may "
                                f"depend on how often it ran before; verify compared its outputs on these {len(batches)} "
                                "batches only")
    if onnx_specs:  # a PyTorch model against an ONNX file: only tensors are compared
        for text, model in zip((reference, candidate), models):
            if left_out := _not_tensors(model, batches[0], names):
                # Silent, a model returning (logits, n, 3) passed against a file holding only logits.
                report.notes.append(f"{text} returns {_listed(left_out)} beside its tensors, numbers or strings an ONNX "
                                    "file does not hold: only its tensors were compared")
    # Silent, a ReLU gate shut on every drawn batch (or detections `y[y > 4]` never found)
    # passed two models that differ once it opens.
    for name in dict.fromkeys(d.output for d in result.diffs if d.problem is None and not d.exact):
        diffs = [d for d in result.diffs if d.output == name]
        if all(d.elements == 0 for d in diffs):
            report.notes.append(f"output {name!r} was empty in every batch: nothing of it was compared")
        elif all(d.scale <= np.finfo(np.float32).tiny for d in diffs):  # `compare`'s scale of an all-zero output
            report.notes.append(f"output {name!r} was 0 at every element of every batch: if it can be other than 0, "
                                "the inputs that make it so were not drawn, and it was not compared there")
    # Silent, a float16 candidate passed a 0.3% gain error at float16's tolerance against float32.
    changed = {d.output: d for d in result.diffs if d.dtypes}
    for name, diff in changed.items():
        tolerance = "exactly" if diff.exact else f"at the less precise one's tolerance (atol {diff.atol:g}, rtol {diff.rtol:g})"
        report.notes.append(f"output {name!r} is {diff.dtypes[0]} in {candidate} but {diff.dtypes[1]} in {reference}: "
                            f"compared {tolerance}")
    return result, report


def _not_tensors(model, batch, names: Sequence[str]) -> list[str]:
    """The names of what a PyTorch `model` returns on `batch` (its inputs `names`, fed as verify fed
    them) that is neither a tensor nor None."""
    if not isinstance(model, torch.nn.Module):
        return []
    params = forward_parameter_names(model)
    tensors = [torch.from_numpy(np.array(x, order="C", copy=True)) for x in batch]
    if (order := input_order(params, names)) is not None:
        tensors = [tensors[k] for k in order]
    keywords = keyword_call(params, names) if order is None else None
    with torch.no_grad(), eval_mode(model), running_user_model():
        out = model(**dict(zip(keywords, tensors))) if keywords else model(*tensors)
    return [where for where, leaf in named_leaves(out) if not isinstance(leaf, (torch.Tensor, type(None)))]


def _refuse_missing_required(runner, names_given: Sequence[str]) -> None:
    """A file holding fewer inputs than the model's forward requires: an exporter drops one the
    forward never uses (torch.onnx's TorchScript exporter does), and the call failed in Python's
    words, with a hint about --static-input beside them."""
    required = required_parameter_names(runner.module)
    if keywords := getattr(runner, "keywords", None):
        missing = [name for name in required if name not in keywords]
    else:
        missing = required[len(names_given):]
    if missing:
        raise UserError(f"{type(runner.module).__name__}'s forward requires {_listed(missing)}, which the other side "
                        f"does not take (its inputs: {_listed(list(names_given))}; an exporter drops an input the "
                        "forward never uses): verify feeds both sides the same inputs")


def _refuse_undeclared_inputs(module: torch.nn.Module, declared: Sequence[str], onnx_specs, texts) -> None:
    """A file taking a forward's later argument the model declares no shape for (`mask`, where the
    model declares `x, past`) cannot be fed from those shapes: by position, `mask` got `past`'s
    values and a correct file FAILED as "computes something else"."""
    params = forward_parameter_names(module)
    for spec, text in zip(onnx_specs, texts):
        if undeclared := [n for n in spec.names if n in params and n not in declared]:
            name = undeclared[0]
            raise UserError(f"{text} takes input {name!r}, which {type(module).__name__}'s forward takes as input "
                            f"{params.index(name)} but declares no shape for (it declares {', '.join(declared)}): a model "
                            "that declares no input shapes is fed the file's inputs by name")


def _written_state(model, before: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    """The parameters and buffers of `model` written since `before` (`_state_versions`)."""
    return [name for name, (tensor, version) in _state_versions(model).items()
            if name not in before or before[name][0] is not tensor or before[name][1] != version]


def _state_versions(model) -> dict[str, tuple[torch.Tensor, int]]:
    """Each parameter and buffer with its version counter, which a write moves, in place
    (`self.calls += 1`) or by a new tensor (`self.calls = self.calls + 1`): empty for an ONNX file
    (its state is constant). The tensor itself is held, not its id(): a freed tensor's id is
    reused, and a buffer reassigned on every call could end at its first tensor's address."""
    if not isinstance(model, torch.nn.Module):
        return {}
    return {name: (t, t._version) for name, t in model.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor)}


def _check_same_input_dtypes(specs, texts: Sequence[str], names: Sequence[str]) -> None:
    """Two ONNX files compared on the same batches must take each input in the same dtype; else
    onnxruntime refuses one of them in its own words, batch after batch."""
    a, b = (_in_order(spec, spec.dtypes, names) for spec in specs)
    for i, (dtype_a, dtype_b) in enumerate(zip(a, b)):
        if dtype_a != dtype_b:
            name = names[i] if i < len(names) else str(i)
            raise UserError(f"{texts[0]} takes input '{name}' as {dtype_a.name}, {texts[1]} as {dtype_b.name}: "
                            "verify compares two models on the same inputs")


def _rows_reached(batches, bounds, names: Sequence[str]) -> list[str]:
    """A note for each input of ids whose batches reached fewer rows than its table has: a row
    no batch looks up is not compared."""
    notes = []
    for i, bound in enumerate(bounds):
        values = np.unique(np.concatenate([np.ravel(batch[i]) for batch in batches]))
        if isinstance(bound, int) and bound > 2:
            if len(values) < bound:
                notes.append(f"input {_input_name(names, i)} looks up a table of {bound} rows, of which the batches "
                             f"reached {len(values)}: the others were not compared")
        elif bound is None and values.dtype.kind in "iu" and set(values.tolist()) <= {0, 1} \
                and "mask" not in _input_name(names, i).lower():  # an attention mask is 0 or 1
            # Ids clamped (or offset) before their table: found by no probe, so drawn where any
            # table has rows; two models differing in rows 2 and up passed without a word.
            notes.append(f"input {_input_name(names, i)} holds integers, drawn at 0 and 1 only (no table it indexes "
                         "directly was found): what the models do with larger values was not compared")
    return notes


def _input_name(names: Sequence[str] | None, i: int) -> str:
    return repr(names[i]) if names and i < len(names) else str(i)


# What a size an ONNX file declares symbolic past the batch (a sequence length, an image's
# height) is also compared at: twice the example's, which keeps a size the model divides by
# (a UNet's 16) divisible.
_RESIZE_FACTOR = 2


def _at_other_sizes(models, onnx_specs, onnx_texts, names, shapes, dtypes, batch_axes, bounds, notes, batch_size):
    """A batch of `batch_size` at other sizes wherever an ONNX file declares a size past the
    batch symbolic (one that `shapes`, the PyTorch model's example or --input-shape, fixed for
    the comparison): a file that computes with the example's size as a constant there passes at
    that size alone. Each symbol takes one size in every input that names it. None (and a note)
    where either model does not run at those sizes."""
    resized = [list(shape) for shape in shapes]
    symbolic: dict[str, list[tuple[int, int]]] = {}
    for spec in onnx_specs:
        for i, axes in enumerate(_in_order(spec, spec.symbols, names)):
            for axis, symbol in enumerate(axes):
                if symbol is not None and axis < len(shapes[i]) and (axis >= 1 or batch_axes[i] is None):
                    symbolic.setdefault(symbol, []).append((i, axis))
    if not symbolic:
        return None
    for places in symbolic.values():
        size = shapes[places[0][0]][places[0][1]] * _RESIZE_FACTOR
        for i, axis in places:
            resized[i][axis] = size
    batch = random_batches(resized, (batch_size,), dtypes, seed=1, batch_axes=batch_axes, index_bounds=bounds)[0]
    declared = ", ".join(sorted(symbolic))
    text = " and ".join(str(tuple(shape)) for shape in resized)
    for model in models:
        if _run_quietly(runners_for(model)[0], batch) is None:
            who = "the PyTorch model does" if isinstance(model, nn.Module) else f"{model} does"
            notes.append(f"{' and '.join(onnx_texts)} declares {declared} symbolic, but {who} not run at other sizes "
                         f"({text} tried): compared at the example's sizes only")
            return None
    notes.append(f"{' and '.join(onnx_texts)} declares {declared} symbolic: also compared at {text}")
    return batch


def _batch_size(batch, batch_axes) -> int:
    return next((x.shape[0] for x, axis in zip(batch, batch_axes) if axis == 0), 1)


def _in_order(spec, values: list, names: Sequence[str]) -> list:
    """An ONNX file's `values` (one per input, in its graph's order) in the order of `names`, the
    inputs the batches are built for, where the file names the same inputs in another order."""
    order = input_order(names, spec.names)
    return values if order is None else [values[k] for k in order]


def _index_bounds(models, onnx_specs, probe: list[np.ndarray]) -> list[int | tuple[int, int] | None]:
    """What each integer input's random values are drawn from (`random_batches`' index_bounds).
    Ids looked up in a table: below the smallest table either model looks them up in directly
    (`embedding_bounds`, `OnnxInputs.index_bounds`), where both models also run on the largest
    such id (the same ids may index a smaller table too: `F.one_hot(ids, 10)`). Any other
    unsigned integer input: `integer_range` (raw pixels), where both models run on it and stay
    finite wherever they were on 0 and 1. Else (a signed mask, lengths, class indices) None: 0 or 1."""
    if not any(np.asarray(x).dtype.kind in "iu" for x in probe):
        return [None] * len(probe)  # no ids: the models need not run for this
    found = [embedding_bounds(m, probe) for m in models if isinstance(m, nn.Module)]
    found += [spec.index_bounds for spec in onnx_specs]
    bounds = [min((b[i] for b in found if i < len(b) and b[i]), default=None) for i in range(len(probe))]
    runners = [TorchRunner(m) if isinstance(m, nn.Module) else OrtRunner(m) for m in models]  # one session each
    finite_on_probe: list[bool] | None = None
    rng = np.random.default_rng(0)
    ranges: list[int | tuple[int, int] | None] = []
    for i, (x, bound) in enumerate(zip(probe, bounds)):
        if np.asarray(x).dtype.kind not in "iu":
            ranges.append(None)
            continue
        if bound:
            tried = [np.full_like(v, bound - 1) if j == i else v for j, v in enumerate(probe)]
        elif np.asarray(x).dtype.kind == "i":
            # A signed integer input no table reads is a mask, lengths or class indices, whose
            # meaning lives at 0 and 1: drawn from -128..127, a mask of 127 saturated the softmax
            # and hid a changed query weight, a length of -90 or 100 hid an off-by-one.
            ranges.append(None)
            continue
        else:
            low, high = bound = integer_range(np.asarray(x).dtype)
            tried = [rng.integers(low, high, np.shape(v)).astype(v.dtype) if j == i else v for j, v in enumerate(probe)]
            if finite_on_probe is None:
                finite_on_probe = [_all_finite(_run_quietly(runner, probe)) for runner in runners]
        for k, runner in enumerate(runners):
            outputs = _run_quietly(runner, tried)
            # The model's own limit (an index past a table, a mask that overflows): 0 and 1 it is.
            if outputs is None or (isinstance(bound, tuple) and finite_on_probe[k] and not _all_finite(outputs)):
                bound = None
                break
        ranges.append(bound)
    return ranges


def _run_quietly(runner, batch) -> list | None:
    """`runner`'s outputs on `batch`, or None where it raises (probing what the model accepts)."""
    try:
        return runner(batch)
    except Exception:  # noqa: BLE001 (the comparison itself runs it and says why it fails)
        return None


def _all_finite(outputs: list | None) -> bool:
    """Whether every float output is finite everywhere (None, a run that raised: no)."""
    if outputs is None:
        return False
    arrays = [np.asarray(y) for y in outputs if not isinstance(y, (list, dict))]
    return all(np.isfinite(a).all() for a in arrays if a.dtype.kind in "fc")


def data_batch(path: str, shapes, dtype=None) -> list[np.ndarray]:
    """The first DATA_EXAMPLES test images of any data `train` reads, shaped as the model's one
    input (`bngraph.data.model_images`), in its dtype (a numpy dtype or its name; token ids for
    an integer input are read as integers, as train reads them)."""
    torch_dtype = None if dtype is None else torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype
    images = model_images(path, shapes, "test", lambda n: range(min(DATA_EXAMPLES, n)), torch_dtype)
    return [images.numpy() if torch_dtype is None else images.to(torch_dtype).numpy()]
