"""What runs a model on numpy inputs, for `verify`: PyTorch, onnxruntime, onnx's ReferenceEvaluator.

A runner maps a list of numpy inputs to a list of outputs. An ONNX model runs in onnxruntime on
the CPU at ORT_DISABLE_ALL (our graph as written) and at ORT_ENABLE_ALL (as deployed:
onnxruntime then fuses BN and constant-folds on its own, which hides what the file says);
onnx's ReferenceEvaluator is a third opinion that shares no kernel with either. Also here: the
random batches both sides run on, and the input shapes an ONNX file declares.

One module, though long: the runners and the inputs they are fed (random batches, an ONNX file's
declared inputs and batch axis) make one contract with `verify`, and change together.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from bngraph.errors import UserError, one_line
from bngraph.errors import running_user_model

ORT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")
# Several single examples, then an odd batch: batch 1 and a batch the example never had show
# that the batch axis is really dynamic (torch.export specializes an example batch of 1).
BATCH_SIZES = (1, 1, 1, 7)


class TorchRunner:
    """A PyTorch module in eval mode; its outputs flattened and named by `named_tensors`, or with
    `every_leaf` (two PyTorch models compared: `bngraph.verify`) by `named_arrays`."""

    kind = "torch"

    def __init__(self, module: nn.Module, label: str = "torch"):
        self.module, self.label = module, label
        self.input_names = forward_parameter_names(module)
        self.output_names: list[str] | None = None  # known after the first call
        self.tensor_outputs = 0  # how many of them are tensors
        self.every_leaf = False
        # The forward's parameters to pass the inputs as, by keyword: a file exported with some of
        # the forward's optional arguments (`token_type_ids` without `attention_mask`). None: by position.
        self.keywords: list[str] | None = None
        # `ComputedPrecision`'s epsilon of each output, known after the first call
        self.computed_eps: list[float] | None = None

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        # The first run records the precision the forward computes in; one run shows which
        # tensors it reads, and the mode costs a Python call per op, so not every run.
        precision = ComputedPrecision() if self.computed_eps is None else contextlib.nullcontext()
        tensors = [torch.from_numpy(np.array(x, order="C", copy=True)) for x in inputs]  # see fresh_inputs
        with torch.no_grad(), eval_mode(self.module), running_user_model(), precision:
            out = self.module(**dict(zip(self.keywords, tensors))) if self.keywords else self.module(*tensors)
        arrays = self._arrays(out)
        if isinstance(precision, ComputedPrecision):
            leaves = named_leaves(out) if self.every_leaf else named_tensors(out)
            self.computed_eps = [precision.eps_of(leaf) for _, leaf in leaves]
        return arrays

    def eps_of_output(self, index: int) -> float:
        """The epsilon output `index` was computed at (0 for a runner that does not know: ONNX)."""
        eps = self.computed_eps or []
        return eps[index] if index < len(eps) else max(eps, default=0.0)

    def _arrays(self, out: Any) -> list[np.ndarray]:
        tensors = named_tensors(out)
        named = named_arrays(out) if self.every_leaf else [(name, _to_numpy(t)) for name, t in tensors]
        self.output_names, self.tensor_outputs = [name for name, _ in named], len(tensors)
        return [array for _, array in named]


class ComputedPrecision(TorchFunctionMode):
    """The epsilon of the least precise floating tensor computed on the way to each tensor while
    the mode was on (`eps_of`; 0 where nothing rounded coarser than float64): a bfloat16 layer
    inside a float32 model rounds every output after it at bfloat16's epsilon, whatever their
    dtype. Followed tensor by tensor, not for the whole forward: one float16 side output (or a
    bfloat16 cast feeding a comparison) widened the tolerance of a float32 model's logits that
    never passed through it, and a candidate 0.17% off passed. What a forward computes, not what
    it holds or moves: an unused bfloat16 buffer widened verify's tolerance to 0.031, and so did a
    bfloat16 zero indexed, cloned or concatenated from a buffer and added to a float32 sum (exact:
    the sum is float32). A view, or a copy in a precision no finer than its inputs' (`MOVES`),
    computes nothing; a cast to a coarser dtype rounds. A fold rounds its weights in their layer's
    dtype, which that layer computes in."""

    def __init__(self):
        super().__init__()
        self._rounded: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> coarsest eps on its way

    def eps_of(self, tensor) -> float:
        return self._rounded.get(tensor, 0.0) if isinstance(tensor, torch.Tensor) else 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.compiler.is_compiling():  # torch.cond's branches traced by dynamo: no storage there (and no rounding)
            return out
        read = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        storages = {_storage(t) for t in read}
        finest = min((torch.finfo(t.dtype).eps for t in read if t.is_floating_point()), default=None)
        moves = getattr(func, "__name__", None) in MOVES
        # Values carry their rounding on; a choice (a mask, an argmax, an index) carries none into
        # the float32 values it selects: a bfloat16 router's `>` widened float32 experts' tolerance.
        inherited = max((self._rounded.get(t, 0.0) for t in read if t.is_floating_point() or t.is_complex()),
                        default=0.0)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            eps = inherited
            if t.is_floating_point():
                own = torch.finfo(t.dtype).eps
                viewed = _storage(t) in storages and _storage(t) is not None  # a view, or written in place
                if not (viewed or (moves and finest is not None and own <= finest)):  # else moved, not rounded
                    eps = max(eps, own)
            self._rounded[t] = max(eps, self._rounded.get(t, 0.0))
        return out


# Functions that move values without computing new ones: their output rounds nothing unless its
# dtype is coarser than their inputs' (a cast).
MOVES = frozenset({
    "__getitem__", "clone", "contiguous", "detach", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
    "index_select", "gather", "take", "take_along_dim", "masked_select", "repeat", "repeat_interleave", "tile",
    "expand", "expand_as", "flip", "roll", "narrow", "narrow_copy", "to", "type", "type_as", "float", "double",
    "half", "bfloat16", "reshape", "view", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
    "movedim", "chunk", "split", "unbind", "select", "where", "zeros_like", "ones_like", "empty_like", "copy_",
})


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a sparse or nested tensor: taken as computed
        return None


@contextlib.contextmanager
def buffers_kept(module: nn.Module):
    """Put back each buffer of `module` that a run inside wrote in place: bngraph's own runs of a
    model (to trace, check or record it) are not the model's, and a counter it keeps
    (`self.seen += len(x)`) was saved moved by them. Yields, once the block is done, the value
    before of each buffer the runs wrote. Inference tensors (a model built inside
    torch.inference_mode()) keep no version and cannot be written outside that block: left out."""
    buffers = {name: b for name, b in module.named_buffers()
               if not isinstance(b, nn.parameter.UninitializedBuffer) and not b.is_inference()}
    versions = {name: b._version for name, b in buffers.items()}
    values = {name: b.detach().clone() for name, b in buffers.items()}
    moved: dict[str, torch.Tensor] = {}
    try:
        yield moved  # filled on the way out: name -> value before, for a copy run inside to take too (a fold)
    finally:
        with torch.no_grad():
            for name, buffer in buffers.items():
                if buffer._version != versions[name]:
                    buffer.copy_(values[name])
                    moved[name] = values[name]


@contextlib.contextmanager
def host_generators_kept():
    """numpy's and Python's global generators put back as they were after the block: a model may
    draw from them (HuggingFace's SpecAugment masks in wav2vec2 and HuBERT use numpy's)."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def seeded():
    """The random state every run compared starts from (`bngraph.equivalence`; a run outside it,
    such as the shape-recording run of `bngraph.trace`, uses it to stand for one of its runs):
    torch's, numpy's and Python's generators, or two runs of a model drawing with numpy differed
    and the model written was blamed."""
    with torch.random.fork_rng(devices=[]), host_generators_kept():
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        yield


@contextlib.contextmanager
def training_copy(model: nn.Module):
    """A copy of `model` in train mode, for one probing run that must leave the model and the
    random state as they were (its dropout draws from the generators a resumed run restored):
    which parameters a training step uses (`bngraph.training.distributed`), which hand-written
    BNs normalize with batch statistics (`bngraph.passes.recalibrate_bn`)."""
    devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield copy.deepcopy(model).train()


class SeededRunner(TorchRunner):
    """A TorchRunner that draws the same random numbers on every call, and keeps its outputs
    (by the identity of the batch it was given, and whether every leaf was asked for). Each
    entry holds its batch too: a freed batch's id() is reused, and a new batch at the old
    address must not be answered with the old batch's outputs."""

    def __init__(self, module: nn.Module, label: str):
        super().__init__(module, label)
        self._outputs: dict[tuple[int, bool], tuple[Any, list[str], int, list[np.ndarray]]] = {}
        self._known: dict[int, tuple[Any, Any]] = {}  # forward results handed in (`know`), by batch

    def __call__(self, inputs):
        key = (id(inputs), self.every_leaf)
        if key not in self._outputs or self._outputs[key][0] is not inputs:
            known = self._known.get(id(inputs))
            if known is not None and known[0] is inputs:
                arrays = self._arrays(known[1])
            else:
                with seeded():
                    arrays = super().__call__(self._prepared(inputs))
            self._outputs[key] = (inputs, self.output_names, self.tensor_outputs, arrays)
        _, self.output_names, self.tensor_outputs, arrays = self._outputs[key]
        return arrays

    def _prepared(self, inputs) -> list[np.ndarray]:
        return inputs

    def know(self, inputs, outputs) -> None:
        """Take `outputs` (a forward's result, run under `seeded()` in eval mode without gradients)
        as this module's on `inputs`, instead of running it again."""
        self._known[id(inputs)] = (inputs, outputs)


class Float64Runner(SeededRunner):
    """The exact result a float32 model's outputs are measured against: a float64 copy of
    `module`, run on each batch with its float32 inputs widened (`bngraph.equivalence`'s
    rounding allowance, `bngraph.verify`'s verdict on a failure). Raises where the model does
    not run in float64 (it fixes float32 somewhere)."""

    def __init__(self, module: nn.Module):
        super().__init__(copy.deepcopy(module).double(), "float64")

    def _prepared(self, inputs) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.float64) if np.asarray(x).dtype == np.float32 else x for x in inputs]


class OrtRunner:
    kind = "onnx"

    def __init__(self, model: str | Path | bytes, level: str = "ORT_DISABLE_ALL"):
        import onnxruntime as ort  # here: a second to import, and a PyTorch-only command never needs it

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        # Fatal only: unused initializers are warnings, and a failed run is an error onnxruntime
        # prints in colour before our one line, which already says what failed and why.
        options.log_severity_level = 4
        source = _without_absent_outputs(model)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise UserError(f"onnxruntime cannot load {_describe(model)}: {one_line(err)}") from err
        self.label = "ort-" + level.removeprefix("ORT_").lower().replace("_", "-")  # ort-disable-all
        self.source = _describe(model)
        self.output_names = [o.name for o in self.session.get_outputs()]
        # onnxruntime lists neither initializers nor IR-3 initializers-as-inputs here: the same
        # inputs as `onnx_inputs` and the ReferenceEvaluator feed, in graph order.
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {name: np.asarray(x) for name, x in zip(self.input_names, inputs)}
        return self.session.run(None, feeds)


def _without_absent_outputs(model: str | Path | bytes) -> str | bytes:
    """`model` for onnxruntime: as it is, or, where a node lists optional outputs it does not
    produce by their empty names (`BatchNormalization(..., outputs=["y", "", "", "", ""])`, as
    the ONNX spec allows), without those trailing names. The same model; onnxruntime 1.32
    crashes the process on the original at ORT_DISABLE_ALL. A path onnxruntime cannot open
    becomes the file's bytes."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, and what else a damaged file raises
        raise UserError(f"{_describe(model)} is not a valid ONNX model: {one_line(err)}") from err
    trimmed = False
    for nodes in [*(graph.node for graph in _graphs(proto.graph)), *(function.node for function in proto.functions)]:
        for node in nodes:
            while node.output and node.output[-1] == "":
                node.output.pop()
                trimmed = True
    if isinstance(model, bytes):
        return proto.SerializeToString() if trimmed else model
    if not trimmed and _is_utf8(str(model)):
        return str(model)
    # Changed, or at a path onnxruntime cannot open (a folder name that is not UTF-8): as bytes,
    # its weights read from beside it first, where they are named relative to its folder.
    load_external_data_for_model(proto, str(Path(model).parent))
    return proto.SerializeToString()


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # os.fsdecode's surrogates for bytes that are not UTF-8
        return False
    return True


def _graphs(graph):
    """`graph` and every graph inside its nodes' attributes (If, Loop and Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for inner in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                yield from _graphs(inner)


def _batch_normalization_as_specified():
    """A BatchNormalization for onnx's ReferenceEvaluator that runs as the spec says. Its own runs
    one of opsets 9 to 14 that carries a momentum attribute (torch.onnx writes one) on batch
    statistics, and so failed a correct file; in every opset a node with one output is inference,
    on its running statistics, and those of opset 6 to 8 with spatial=0 are per C x H x W."""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9, training_mode=0, **_):
            # Per channel, or per element of one example (spatial=0): its statistics' own shape.
            stats_shape = (-1,) + (1,) * (x.ndim - 2) if mean.size == x.shape[1] else x.shape[1:]
            s, b, m, v = (np.asarray(t).reshape(stats_shape) for t in (scale, bias, mean, var))
            outputs = sum(1 for name in self.onnx_node.output if name)
            if outputs == 1 and not training_mode:
                return ((s * (x - m) / np.sqrt(v + epsilon) + b).astype(x.dtype),)
            axes = (0, *range(2, x.ndim)) if mean.size == x.shape[1] else (0,)
            batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
            shape = (1, *stats_shape)
            y = s * (x - batch_mean.reshape(shape)) / np.sqrt(batch_var.reshape(shape) + epsilon) + b
            running = (mean * momentum + batch_mean * (1 - momentum), var * momentum + batch_var * (1 - momentum))
            return tuple(t.astype(x.dtype) for t in (y, *running, batch_mean, batch_var)[:outputs])

    return BatchNormalization


class EvaluatorRunner:
    kind, label = "onnx", "onnx-reference"

    def __init__(self, model: str | Path | bytes):
        import onnx  # here, as onnxruntime above
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        try:
            self.evaluator = ReferenceEvaluator(proto, new_ops=[_batch_normalization_as_specified()])
        except NotImplementedError as err:  # an op it lacks (ai.onnx.ml's ZipMap): the user's choice of --reference
            raise UserError(f"onnx's ReferenceEvaluator cannot run {_describe(model)}: {one_line(err).removesuffix(' in')} "
                            "(compare in onnxruntime alone: drop --reference)") from err
        self.input_names = [i for i in self.evaluator.input_names if i not in {t.name for t in proto.graph.initializer}]
        self.output_names = list(self.evaluator.output_names)

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {name: np.asarray(x) for name, x in zip(self.input_names, inputs)}
        # A sequence or map output stays a list or dict, as onnxruntime returns it (`bngraph.verify`).
        return [y if isinstance(y, (list, dict)) else np.asarray(y) for y in self.evaluator.run(None, feeds)]


def runners_for(model: Any, *, evaluator: bool = False) -> list:
    """A PyTorch module runs once; an ONNX model (path, bytes or ModelProto) at each ORT level."""
    if isinstance(model, nn.Module):
        return [TorchRunner(model)]
    if isinstance(model, (TorchRunner, OrtRunner, EvaluatorRunner)):
        return [model]
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    if not isinstance(model, (str, Path, bytes)):
        raise UserError(f"cannot run a {type(model).__name__}: give an nn.Module or an ONNX model (a path, bytes or a "
                        "ModelProto)")
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise UserError(f"{model}: no such ONNX file")
    runners = [OrtRunner(model, level) for level in ORT_LEVELS]
    return runners + ([EvaluatorRunner(model)] if evaluator else [])


def _positional_parameters(module: nn.Module) -> list[inspect.Parameter]:
    """The parameters `module`'s forward takes by position (none after a `*args`)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or TorchScript forward
        return []
    positional = []
    for p in parameters:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        positional.append(p)
    return positional


def forward_parameter_names(module: nn.Module) -> list[str]:
    """The names of the parameters `module`'s forward takes by position."""
    return [p.name for p in _positional_parameters(module)]


def required_parameter_names(module: nn.Module) -> list[str]:
    """The forward's positional parameters without a default: those every call must give."""
    return [p.name for p in _positional_parameters(module) if p.default is p.empty]


def input_order(names: Sequence[str], given: Sequence[str]) -> list[int] | None:
    """Where each of a model's inputs `names` is among the inputs `given`, when both name the same
    inputs in another order (an ONNX file whose graph lists y before x); None: by position."""
    if not names or not given or list(names) == list(given) or sorted(names) != sorted(given):
        return None
    return [list(given).index(name) for name in names]


def keyword_call(names: Sequence[str], given: Sequence[str]) -> list[str] | None:
    """`given`, where a model whose forward takes `names` is to be called with the inputs `given`
    by keyword: each is a parameter of the forward, but not its first ones in order (a file
    exported with `token_type_ids` and not `attention_mask`). None: by position (or `input_order`)."""
    if not given or not set(given) <= set(names) or list(given) == list(names)[:len(given)]:
        return None
    return None if sorted(given) == sorted(names) else list(given)


def crossed_name(names: Sequence[str], other: Sequence[str]) -> str | None:
    """A name both lists hold at different positions, where they do not name the same set (which
    `input_order` pairs by name): paired by position, it would label another's value."""
    if not names or not other or sorted(names) == sorted(other):
        return None
    return next((n for i, n in enumerate(names) if n in other and list(other).index(n) != i), None)


def fresh_inputs(inputs: Sequence) -> list:
    """Copies of the tensors among `inputs`, for one run: a forward that writes into its input
    (`x.sub_(0.5)`, a user's preprocessing) must not change what the next run is given, or two
    runs compared would see different batches."""
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    # No command mutates the model it was handed: put back each submodule's mode afterwards.
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            if m.training is not training:  # nn.Module's __setattr__ is slow: 1000s of layers, each check
                m.training = training


def named_tensors(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a forward's result, in order, named by where they sit in it.

    A tensor alone is 'output'; dict keys, dataclass fields (HuggingFace's ModelOutput is both a
    dict and a dataclass) and NamedTuple fields give their names ('logits'); list and tuple items
    their index ('hidden_states.0', 'output.1' at the top). None entries and other leaves (ints,
    strings) are not outputs of an ONNX file (torch.onnx drops or bakes them in); two PyTorch
    models compare them too (`named_arrays`)."""
    return [(name, leaf) for name, leaf in named_leaves(out, prefix) if isinstance(leaf, torch.Tensor)]


def named_leaves(out: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of a forward's result, tensor or not (None, a number, an object of any other
    class), named as `named_tensors` names the tensors."""
    if isinstance(out, dict):  # before dataclasses: a ModelOutput lists only its non-None fields
        items = [(str(key), value) for key, value in out.items()]
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    elif isinstance(out, tuple) and hasattr(out, "_fields"):  # a NamedTuple
        items = list(zip(out._fields, out))
    elif isinstance(out, (list, tuple)):
        items = [(str(i), value) for i, value in enumerate(out)]
        if not prefix:
            prefix = "output"
    else:
        return [(prefix or "output", out)]
    return [pair for key, value in items for pair in named_leaves(value, f"{prefix}.{key}" if prefix else key)]


def named_arrays(out: Any) -> list[tuple[str, np.ndarray]]:
    """Every leaf of a forward's result (`named_leaves`) as an array to compare: a tensor as it
    is, a number (Python's or numpy's) as a 0-d float64 array, compared as a tensor is, and any
    other leaf as a 0-d string array, compared exactly: the value of None, a string or a bool,
    the class of anything else (whose repr may hold its address)."""
    arrays = []
    for name, leaf in named_leaves(out):
        if isinstance(leaf, torch.Tensor):
            arrays.append((name, _to_numpy(leaf)))
        elif isinstance(leaf, (int, float, np.number)) and not isinstance(leaf, bool):
            arrays.append((name, np.asarray(leaf, dtype=np.float64)))
        elif leaf is None or isinstance(leaf, (str, bool)):
            arrays.append((name, np.asarray(repr(leaf))))
        else:
            arrays.append((name, np.asarray(f"a {type(leaf).__module__}.{type(leaf).__qualname__}")))
    return arrays


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    # A lazy conjugate or negation (`spectrum.conj()`) is a bit on the tensor that numpy cannot
    # read: resolved here, the model's output is what it means.
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        tensor = tensor.float()
    return tensor.numpy()


def _describe(model: Any) -> str:
    return "the ONNX model" if isinstance(model, bytes) else str(model)


# ---- inputs -------------------------------------------------------------------------------


class ExampleInputs(list):
    """Example input tensors, with each one's batch axis (0, or None for an input without one,
    such as a (T, T) mask or a per-feature scale) beside them, so that what checks a model at
    another batch size (export, fold, verify) varies only the inputs that have a batch."""

    def __init__(self, tensors: Sequence[torch.Tensor], batch_axes: Sequence[int | None] | None = None):
        super().__init__(tensors)
        self.batch_axes = batch_axes_of(self, batch_axes)


def batch_axes_of(example_inputs: Sequence[torch.Tensor], batch_axes: Sequence[int | None] | None = None):
    """`batch_axes` if given, else what `ExampleInputs` carries, else axis 0 of every input but a 0-d one."""
    if batch_axes is None:
        batch_axes = getattr(example_inputs, "batch_axes", None)
    if batch_axes is None:
        return [0 if x.dim() else None for x in example_inputs]
    if len(batch_axes) != len(example_inputs):
        raise UserError(f"{len(batch_axes)} batch axes given for {len(example_inputs)} example inputs")
    if other := [axis for axis in batch_axes if axis not in (0, None)]:  # taken as 0, the file's batch was another axis
        raise UserError(f"batch axis {other[0]}: an input's batch axis is 0, or None for an input without one")
    return [None if axis is None or not x.dim() else 0 for x, axis in zip(example_inputs, batch_axes)]


def random_tensor(shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) floats; integers 0 or 1 (indices valid in any embedding table); either boolean."""
    with _allocating(shape, torch.empty(0, dtype=dtype).element_size()):
        if dtype.is_floating_point:
            return torch.randn(tuple(shape), generator=generator, dtype=dtype)
        return torch.randint(0, 2, tuple(shape), generator=generator).to(dtype)


@contextlib.contextmanager
def _allocating(shape: Sequence[int], itemsize: int):
    """A UserError naming the size where an input of `shape` does not fit in memory: a typo in
    --input-shape (2,3,100000,100000: 240 GB) ended in torch's allocator traceback."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        text = str(err)
        if isinstance(err, RuntimeError) and not any(s in text for s in ("allocate", "overflow", "too large")):
            raise
        size = itemsize * int(np.prod([int(d) for d in shape], dtype=object))
        raise UserError(f"an input of shape {tuple(int(d) for d in shape)} takes {size / 1e9:.3g} GB, more memory than "
                        "this machine can give: give a smaller --input-shape") from err


def example_batches(
    example_inputs: Sequence[torch.Tensor],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    batch_axes: Sequence[int | None] | None = None,
    seed: int = 0,
) -> list[list[np.ndarray]]:
    """`random_batches` shaped and typed like `example_inputs`, batch varied where there is one."""
    shapes = [tuple(x.shape) for x in example_inputs]
    dtypes = [torch.empty(0, dtype=x.dtype).numpy().dtype for x in example_inputs]
    return random_batches(shapes, batch_sizes, dtypes, seed, batch_axes_of(example_inputs, batch_axes))


def random_batches(
    shapes: Sequence[Sequence[int]],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    dtypes: Sequence[np.dtype] | None = None,
    seed: int = 0,
    batch_axes: Sequence[int | None] | None = None,
    index_bounds: Sequence[int | tuple[int, int] | None] | None = None,
) -> list[list[np.ndarray]]:
    """One list of inputs per batch size: `shapes` with the batch axis (0) replaced, on the
    inputs that have one (`batch_axes`: 0 or None per input; default 0 for all but 0-d ones).
    Integer inputs are 0 or 1, indices valid in any table, or below their `index_bounds` (an
    int), or in their range (a (low, high) pair, high excluded: `integer_range`)."""
    rng = np.random.default_rng(seed)
    dtypes = [np.dtype(d) for d in dtypes] if dtypes is not None else [np.dtype(np.float32)] * len(shapes)
    if batch_axes is None:
        batch_axes = [0 if len(shape) else None for shape in shapes]
    bounds = list(index_bounds or [None] * len(shapes))
    ids = {i: _SpreadIds(rng, bound) for i, (bound, dtype) in enumerate(zip(bounds, dtypes))
           if isinstance(bound, int) and bound > 2 and dtype.kind in "iu"}
    batches = []
    for batch in batch_sizes:
        batches.append(
            [
                ids[i].take(shaped, dtype) if i in ids else _random(rng, shaped, dtype, bound or 2)
                for i, (shape, dtype, axis, bound) in enumerate(zip(shapes, dtypes, batch_axes, bounds))
                for shaped in [tuple(shape) if axis is None or not len(shape) else (batch, *shape[1:])]
            ]
        )
    return batches


class _SpreadIds:
    """Ids below `bound` (a table's rows), each batch taking the next ones of shuffled runs
    through every id: batches with as many positions as the table has rows reach every row,
    where independent draws left a third of them out (a changed row of 100 passed)."""

    def __init__(self, rng: np.random.Generator, bound: int):
        self.rng, self.bound, self.left = rng, bound, np.empty(0, np.int64)

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = int(np.prod([int(d) for d in shape], dtype=object))
        with _allocating(shape, np.dtype(dtype).itemsize):
            taken = np.empty(count, dtype)
        filled = min(count, self.left.size)
        taken[:filled], self.left = self.left[:filled], self.left[filled:]
        while filled < count:
            run = self.rng.permutation(self.bound)
            n = min(count - filled, self.bound)
            taken[filled:filled + n], self.left = run[:n], run[n:]
            filled += n
        return taken.reshape(shape)


def unbatched_sizes(shapes: Sequence[Sequence[int]], batch_axes: Sequence[int | None]) -> tuple[int, ...] | None:
    """Where no input has a batch axis (every one named by --static-input, or a model that says
    so), the size every batch really has, once per batch of BATCH_SIZES (each draws other random
    values at the same shapes): the first dimension of the first input that has one. Else None."""
    if any(axis is not None for axis in batch_axes):
        return None
    return (next((shape[0] for shape in shapes if len(shape)), 1),) * len(BATCH_SIZES)


def unbatched_note(sizes: Sequence[int]) -> str:
    """The report's note for `unbatched_sizes` (verify's and the ONNX fold's)."""
    return (f"no input has a batch axis: every batch has the inputs' own shapes (batch {sizes[0]}), "
            "so other batch sizes were not tried")


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, bound: int | tuple[int, int] = 2) -> np.ndarray:
    with _allocating(shape, np.dtype(dtype).itemsize):
        return _drawn(rng, shape, dtype, bound)


def _drawn(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, bound: int | tuple[int, int]) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return np.asarray(rng.standard_normal(shape), dtype=dtype)  # a 0-d array for shape ()
    if dtype == np.bool_:
        return np.asarray(rng.integers(0, 2, shape), dtype=bool)
    low, high = bound if isinstance(bound, tuple) else (0, bound)
    return np.asarray(rng.integers(low, high, shape), dtype=dtype)


# Functions that pass ids on unchanged, one per element: `emb(ids.long())`, `ids.view(-1)`,
# `ids[:, :T]` still look up the ids themselves; `ids % 8` or `ids + 1` do not (`embedding_bounds`).
INDEX_PRESERVING_FUNCTIONS = {
    "long", "int", "to", "type", "view", "reshape", "flatten", "unsqueeze", "squeeze", "contiguous", "clone",
    "detach", "__getitem__", "expand", "expand_as", "permute", "transpose", "t", "unflatten",
}


def embedding_bounds(module: nn.Module, batch: Sequence[np.ndarray]) -> list[int | None]:
    """For each input of `batch`, the size of the smallest embedding table `module` looks it up
    in directly (`F.embedding`, which nn.Embedding calls, on the input itself or on it passed
    through INDEX_PRESERVING_FUNCTIONS: `emb(ids.long())`), or None: token ids drawn below it
    reach every row, where 0 and 1 left two models that differ past row 1 alike. A lookup of
    ids after arithmetic (`bucket(ids % 8)`) bounds nothing: the ids' own table has 100 rows,
    and a bound of 8 left rows 8-99 uncompared. One eval-mode run."""
    tensors = [torch.from_numpy(np.array(x, copy=True)) for x in batch]
    carries: dict[int, tuple[int, torch.Tensor]] = {  # id of a tensor -> (the input whose ids it holds, it)
        id(t): (i, t) for i, t in enumerate(tensors) if not t.is_floating_point() and t.dtype != torch.bool
    }
    bounds: list[int | None] = [None] * len(tensors)

    def source(value) -> int | None:
        held = carries.get(id(value))
        return held[0] if held is not None and held[1] is value else None

    class Lookups(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            i = source(args[0]) if args else None
            if i is None:
                return result
            if func is F.embedding:
                table = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
                if table is not None:
                    bounds[i] = min(bounds[i] or len(table), len(table))
            elif getattr(func, "__name__", "") in INDEX_PRESERVING_FUNCTIONS and isinstance(result, torch.Tensor):
                carries[id(result)] = (i, result)  # the tensor kept too: its id cannot be reused meanwhile
            return result

    try:
        with torch.no_grad(), eval_mode(module), running_user_model(), Lookups():
            module(*tensors)
    except Exception:  # noqa: BLE001 (the comparison itself runs it again and says why it fails)
        pass
    return bounds


def integer_range(dtype: np.dtype) -> tuple[int, int]:
    """The values an unsigned integer input that indexes no table is drawn from (high excluded):
    uint8's (0..255, raw pixels). With 0 and 1 alone, a candidate that cast uint8 pixels to int8
    (above 127 wrapped negative) passed. `bngraph.verify` draws signed ones at 0 and 1 (masks)."""
    return (0, 256) if np.dtype(dtype).kind == "u" else (-128, 128)


# Ops that pass ids on unchanged, one per element: an int32 input cast to int64 for the Gather
# (int32-input exports, tf2onnx), or reshaped first, still indexes the same table.
INDEX_PRESERVING_OPS = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"}


def _gather_bounds(proto, inputs) -> list[int | None]:
    """For each graph input, the size of the smallest initializer a Gather looks it up in, the
    input read directly or through INDEX_PRESERVING_OPS."""
    sizes = {t.name: list(t.dims) for t in proto.graph.initializer}
    carries = {value.name: value.name for value in inputs}  # tensor -> the graph input whose ids it holds
    bounds: dict[str, int] = {}
    for node in proto.graph.node:  # in the order ONNX requires: a producer before its users
        if node.op_type in INDEX_PRESERVING_OPS and node.input and node.input[0] in carries and node.output:
            carries[node.output[0]] = carries[node.input[0]]
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in sizes and node.input[1] in carries:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = sizes[node.input[0]]
            if -len(dims) <= axis < len(dims):
                source = carries[node.input[1]]
                bounds[source] = min(bounds.get(source, dims[axis]), dims[axis])
    return [bounds.get(value.name) for value in inputs]


@dataclass
class OnnxInputs:
    shapes: list[tuple[int, ...]]  # batch axis as 1 where it is symbolic
    dtypes: list[np.dtype]
    fixed_batch: int | None  # the batch size the file allows, when it fixes one
    batch_axes: list[int | None] = dataclasses.field(default_factory=list)  # 0, or None: no batch axis
    names: list[str] = dataclasses.field(default_factory=list)
    index_bounds: list[int | None] = dataclasses.field(default_factory=list)  # `random_batches`'
    # Per input, per axis: the name of a symbolic size (its dim_param, or one of its own where it
    # has none), None where the size is fixed.
    symbols: list[list[str | None]] = dataclasses.field(default_factory=list)


def onnx_inputs(
    model: str | Path | bytes,
    input_shape: list[tuple[int, ...]] | None = None,
    static_inputs: Sequence[int] = (),
) -> OnnxInputs:
    """The graph's inputs to feed (initializers listed as inputs, as IR 3 files do, excluded).

    A dimension is symbolic when it has a name, no value, or a value <= 0 (older exporters write
    -1). An input whose first dimension is symbolic has a batch axis; where another input has
    one, an input whose first dimension is fixed has none (a mask, a table); where none has one,
    the file fixes the batch. A scalar input (shape []) is fed a 0-d array. `input_shape`
    replaces the declared shapes; `static_inputs` names inputs without a batch axis.
    """
    import onnx  # here, as onnxruntime above

    try:
        if isinstance(model, bytes):
            proto = onnx.load_from_string(model)
        else:
            proto = onnx.load(str(model), load_external_data=False)  # the graph is enough
    except Exception as err:
        raise UserError(f"{_describe(model)} is not a valid ONNX model: {one_line(err)}") from err
    # Protobuf reads a 0-byte file as an empty model, with no input: "the two models declare
    # different numbers of inputs [0, 1]" hid the cause. onnxruntime needs both fields; the
    # checker itself would refuse files that onnxruntime runs, which verify compares too.
    if not proto.ir_version or not proto.HasField("graph"):
        empty = proto.ByteSize() == 0
        raise UserError(f"{_describe(model)} is not a valid ONNX model: "
                        f"{'the file is empty' if empty else 'it sets no IR version or no graph'}")
    if not proto.graph.output:
        raise UserError(f"{_describe(model)} declares no graph outputs: nothing it computes can be compared")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if input_shape is not None and len(input_shape) != len(inputs):
        raise UserError(f"--input-shape gives {len(input_shape)} shapes; {_describe(model)} has {len(inputs)} inputs")
    for index in static_inputs:
        if not 0 <= index < len(inputs):
            raise UserError(f"--static-input {index}: {_describe(model)} has inputs 0 to {len(inputs) - 1}")
    declared, dtypes = [], []
    for value in inputs:
        if (kind := value.type.WhichOneof("value")) != "tensor_type":
            raise UserError(f"input {value.name!r} of {_describe(model)} is a {str(kind).removesuffix('_type')}, not a "
                            "tensor: bngraph runs models whose inputs are tensors")
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            declared.append(
                [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
            )
        else:
            declared.append(None)  # rank unknown
        dtypes.append(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    has_symbolic_batch = any(dims and dims[0] is None for dims in declared)
    # A fixed first dimension of an input --static-input names is its own size, no batch (a
    # sequence-first RNN's time steps): "the file fixes the batch at 5" was said of it.
    fixed = {dims[0] for index, dims in enumerate(declared)
             if dims and dims[0] is not None and index not in set(static_inputs)}
    shapes, batch_axes = [], []
    for index, (value, dims) in enumerate(zip(inputs, declared)):
        if input_shape is not None:
            shape = tuple(input_shape[index])
            if dims is not None and len(dims) != len(shape):
                raise UserError(
                    f"--input-shape gives input {value.name!r} of {_describe(model)} rank {len(shape)}; "
                    f"the file declares rank {len(dims)} ({_dims_text(dims)})"
                )
            if dims is not None and (axis := next((a for a in range(1, len(dims)) if dims[a] not in (None, shape[a])),
                                                  None)) is not None:
                raise UserError(
                    f"--input-shape gives input {value.name!r} of {_describe(model)} size {shape[axis]} on axis {axis}; "
                    f"the file declares {_dims_text(dims)}, which it alone takes"
                )
        elif dims is None:
            raise UserError(f"input {value.name!r} of {_describe(model)} declares no shape: give it with --input-shape")
        elif any(d is None for d in dims[1:]):
            named = [str(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else d.dim_param or "?"
                     for d in value.type.tensor_type.shape.dim]  # the file's names for them: [N, K] said [?, ?]
            raise UserError(
                f"input {value.name!r} of {_describe(model)} has symbolic dimensions ([{', '.join(named)}]) "
                "beyond the batch: give them with --input-shape"
            )
        else:
            shape = tuple(1 if d is None else d for d in dims)
        shapes.append(shape)
        batched = len(shape) > 0 and index not in set(static_inputs)
        if dims:  # the file's own word: a fixed first dimension beside a symbolic batch is no batch
            batched = batched and (dims[0] is None or not has_symbolic_batch)
        batch_axes.append(0 if batched else None)
    fixed_batch = None
    if not has_symbolic_batch and fixed:
        fixed_batch = next(dims[0] for dims in declared if dims)
        # Inputs that fix another first dimension keep their shape at that batch.
        batch_axes = [
            0 if axis == 0 and dims and dims[0] == fixed_batch else None for axis, dims in zip(batch_axes, declared)
        ]
    symbols = [[(d.dim_param or f"{value.name}[{axis}]") if not (d.HasField("dim_value") and d.dim_value > 0) else None
                for axis, d in enumerate(value.type.tensor_type.shape.dim)] for value in inputs]
    return OnnxInputs(shapes, dtypes, fixed_batch, batch_axes, [value.name for value in inputs],
                      _gather_bounds(proto, inputs), symbols)


def _dims_text(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
