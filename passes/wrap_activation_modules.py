"""The fallback for models torch.fx cannot trace: wrap activation modules, decided by running.

Without a graph, an activation is only visible as a module instance, and its input only when it
runs. So the model runs once on the example input (eval mode, `_dataflow.record_run`),
which records for each activation module call the op and the module that produced its input,
its shape and dtype. Then, numbered as in the code:
  1. Activation modules are the known ones (nn.ReLU, ...) and modules that were seen computing
     one elementwise nonlinearity by hand (HuggingFace's GELUActivation, SiLUActivation).
  2. Never called: skip. Every call's input already normalized (a norm produced it, maybe inside a
     custom block, maybe behind a dropout): skip; that is where Conv-Norm-Act blocks keep theirs.
  3. Called at several sites: skip; one BatchNorm would pool the statistics of different layers.
     Also where it runs once on the example but more often on an input twice its size (a loop
     over scales): the model runs once more for that, on such an input, where it takes one.
     Its input computed from parameters and buffers alone (Swin V2's position-bias MLP reads a
     table of coordinates): skip; there is no batch to take statistics over.
  4. The feature axis comes from the layer that produced the input (conv: axis 1, linear: the
     last axis), followed through elementwise ops, slices (wav2vec2's padding layer) and views
     that regroup only the axes before the last (HuggingFace's Conv1D); unproven: skip, with the
     reason.
  5. An in-place activation: skip, as a BatchNorm in front would stop it from mutating the tensor
     the code may read after it, and a run cannot tell that read from a read of its result.
  6. The code reads the module itself (`isinstance(self.act, ...)`, `self.act.negative_slope`),
     or the module has a second name (`nn.Sequential(self.fc, self.act)`), or it is the activation
     of an nn.TransformerEncoderLayer, whose fused eval path does not call it: skip, as a wrapper
     in its place would change what the code reads, or not run.
  7. Otherwise the module becomes `Sequential(bn=BatchNorm{1,2,3}d(features), act=module)`, the
     BatchNorm in the input's dtype and on its device; for features in the last axis of a rank > 2
     input (a transformer's MLP), `bn=LastAxisBatchNorm(BatchNorm1d(features))`, statistics over
     every axis but the last, as `insert` computes them on a traced graph.
  8. The model runs once more: a BatchNorm that did not run is unwrapped again, skipped with the
     reason. The forward reached its activation through another reference than its name (a
     list, `self._order = [self.conv, self.act]`), which still holds the bare module.
Nonlinearities called as functions (`F.relu`, `x.sigmoid()`) cannot be wrapped: each is reported.

`insert` runs it on models torch.fx cannot trace at all, and, with `within`, inside the
submodules a partial trace kept opaque (HF Swin's blocks), whose activations no graph shows.
"""

from __future__ import annotations

import inspect
import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from bngraph.errors import running_user_model
from bngraph.runners import buffers_kept
from bngraph.passes._dataflow import feature_axis, is_elementwise_nonlinearity, normalizer_of, record_run
from bngraph.passes._op_kinds import ACTIVATION_MODULES
from bngraph.passes.base import PassResult, Skip, graph_pass
from bngraph.passes.insert_bn_before_activation import BATCHNORM_BY_RANK, NOT_FROM_THE_INPUT


class LastAxisBatchNorm(nn.Module):
    """A BatchNorm over the last axis of an (N, ..., C) input, whose statistics pool every other axis."""

    def __init__(self, norm: nn.BatchNorm1d):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N*T, C) is BatchNorm1d's own layout: no transposes, and folding it into the Linear
        # before needs no graph (`fold_bn_into_producer_module`, LeViT's case).
        return self.norm(x.reshape(-1, x.shape[-1])).view(x.shape)


def _read_other_than_called(parent: nn.Module, name: str) -> str | None:
    """Where a forward of `parent`'s class (or of a class it inherits from, torch's aside) uses
    `self.<name>` other than calling it, assigning it or testing it (monai's `if self.act is not
    None:`, `self.act(h) if self.act else h`, which a wrapper leaves true): the line, stripped;
    else None. Only the forwards: `__init__` and `extra_repr` run no computation a wrapper changes."""
    use = re.compile(rf"self\.{re.escape(name)}\b(?!\s*(\(|=[^=]|is\s+(not\s+)?None\b|:|else\b|and\b|or\b|\)\s*:))")
    for cls in type(parent).__mro__:
        if cls.__module__.startswith("torch.") or cls is object or "forward" not in cls.__dict__:
            continue
        try:
            lines = inspect.getsource(cls.__dict__["forward"]).splitlines()
        except (OSError, TypeError):  # no source (a forward built at run time): nothing to read
            continue
        for line in lines:
            code = line.split("#")[0]
            assigned = re.search(r"(?<![=!<>])=(?!=)", code)  # left of it: targets (`self.fc, self.act = ...`)
            if any(not assigned or m.start() > assigned.start() for m in use.finditer(code)):
                return line.strip()
    return None


def _input_problem(call) -> str | None:
    x = call.input
    if x is None:
        return "its input is not a tensor"
    if x.dtype is None or not x.dtype.is_floating_point:
        return f"input has dtype {x.dtype}; BatchNorm needs floating point"
    if len(x.shape) not in BATCHNORM_BY_RANK:
        why = "no batch axis besides the features" if len(x.shape) < 2 else f"no BatchNorm for rank-{len(x.shape)} tensors"
        return f"input of shape {x.shape}: {why}"
    return None


def _calls_elsewhere(module: nn.Module, example_inputs: Sequence[torch.Tensor], probed: list) -> dict[str, int]:
    """How many times each module runs on an input of twice the example's size along its last two
    axes past the batch's and the channels' (an image's H and W), where the model takes one: a
    forward that loops `while h.shape[-1] > 4` calls its activation once on the example and three
    times on larger images. Run once; `probed` gets the input and the counts."""
    if probed:
        return probed[1]
    larger = [torch.randn([2 * d if i >= max(2, x.dim() - 2) else d for i, d in enumerate(x.shape)], dtype=x.dtype)
              if x.is_floating_point() and x.dim() >= 3 else x for x in example_inputs]
    counts: dict[str, int] = {}
    paths = {id(m): p for p, m in module.named_modules()}
    count = lambda m, args: counts.__setitem__(paths.get(id(m)), counts.get(paths.get(id(m)), 0) + 1)  # noqa: E731
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    was_training = module.training
    try:
        with torch.no_grad():
            module.eval()(*larger)
    except Exception:  # noqa: BLE001 - a model that takes only its example's size: nothing to compare
        counts = {}
    finally:
        handle.remove()
        module.train(was_training)
    probed[:] = [larger, counts]
    return counts


@graph_pass(in_place=True)
def wrap_activation_modules(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], within: Sequence[str] | None = None
) -> PassResult:
    """Wrap each activation module of `module` with a BatchNorm in front of it; with `within`,
    only those inside the submodules at these paths (the leaves a partial trace kept opaque)."""
    with buffers_kept(module):  # the runs below are bngraph's, not the model's: a counter stays where it was
        return _wrap_activation_modules(module, example_inputs, within)


def _wrap_activation_modules(module: nn.Module, example_inputs: Sequence[torch.Tensor], within) -> PassResult:
    result = PassResult(module)
    inside = None if within is None else tuple(f"{p}." for p in within)
    with running_user_model():
        record = record_run(module, example_inputs)
    was_training = module.training

    # 1. Which modules are activations: by type, or by what their calls computed.
    calls: dict[str, list] = {}
    for call in record.module_calls:
        calls.setdefault(call.path, []).append(call)
    hand_written = {p for p, cs in calls.items() if all(is_elementwise_nonlinearity(c) for c in cs)}
    activations = [p for p, m in module.named_modules() if isinstance(m, ACTIVATION_MODULES) or p in hand_written]
    activations = [p for p in activations if not any(p.startswith(a + ".") for a in activations)]
    if inside is not None:  # inside a leaf, or the leaf itself (an activation module fx cannot follow)
        activations = [p for p in activations if p in within or p.startswith(inside)]

    probed: list = []  # the other input `_calls_elsewhere` ran, once it has
    wrapped_at: dict[str, tuple] = {}  # path -> (parent, name, activation, its new BatchNorm)
    for path in activations:
        act = module.get_submodule(path)
        kind = type(act).__name__
        sites = calls.get(path, [])
        # 2. Not called, or already normalized at every call.
        if not sites:
            result.skipped.append(Skip(path, "never called on the example input"))
            continue
        norms = [normalizer_of(c.input) for c in sites]
        if all(norms):
            result.skipped.append(Skip(path, f"input already normalized by {norms[0]}"))
            continue
        # 3. One module, several sites, also on an input of another size (a loop over scales).
        if len(sites) > 1:
            result.skipped.append(
                Skip(path, f"called {len(sites)} times; without a graph one BatchNorm would mix their statistics")
            )
            continue
        if (elsewhere := _calls_elsewhere(module, example_inputs, probed).get(path, 1)) != 1:
            shapes = ", ".join(str(tuple(x.shape)) for x in probed[0])
            result.skipped.append(Skip(path, f"called once on the example input but {elsewhere} times on an input of "
                                             f"{shapes}; one BatchNorm would mix their statistics"))
            continue
        call = sites[0]
        problem = _input_problem(call)
        if problem:
            result.skipped.append(Skip(path, problem))
            continue
        if not call.input.data:
            result.skipped.append(Skip(path, NOT_FROM_THE_INPUT))
            continue
        # 4. The feature axis, proven by the layer that produced the input.
        x = call.input
        found = feature_axis(x)
        if found.axis is None:
            result.skipped.append(Skip(path, f"the feature axis of its input cannot be proven: it comes from {found.layer}"))
            continue
        # 5. In place: the code may read the tensor it activated through the name it had before
        # (`self.act(h); return h`), which a run cannot tell from a read of the result.
        if getattr(act, "inplace", False):
            result.skipped.append(
                Skip(path, "in-place activation (inplace=True): the code may read the tensor it activates, which a "
                           "BatchNorm in front would leave as it was; with inplace=False it gets one")
            )
            continue
        # 6. The code reads the module itself (`isinstance(self.act, nn.LeakyReLU)`,
        # `self.act.negative_slope`): a wrapper in its place would change what that reads.
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        if (read := _read_other_than_called(parent, name)) is not None:
            result.skipped.append(
                Skip(path, f"the code reads the module itself, not only calls it ({read}): a BatchNorm wrapped around "
                           "it would change what that reads")
            )
            continue
        # A second name (`self.block = nn.Sequential(self.fc, self.act)`): the wrap would replace
        # one, and the forward may call the module through the other, the BatchNorm never run.
        if len(names := [p for p, m in module.named_modules(remove_duplicate=False) if m is act]) > 1:
            result.skipped.append(Skip(path, f"registered under several names ({', '.join(names)}): a BatchNorm "
                                             "wrapped in at one would not run where the code calls another"))
            continue
        if isinstance(parent, nn.TransformerEncoderLayer):
            result.skipped.append(Skip(path, "the activation of an nn.TransformerEncoderLayer, whose fused eval path "
                                             "(without gradients) does not call it: a BatchNorm in front would not run "
                                             "there"))
            continue
        # 7. Wrap.
        last_axis = found.axis == "last" and len(x.shape) > 2
        norm_cls = nn.BatchNorm1d if last_axis else BATCHNORM_BY_RANK[len(x.shape)]
        features = x.shape[-1] if last_axis else x.shape[1]
        bn = norm_cls(features, device=x.device, dtype=x.dtype).train(was_training)
        wrapper = LastAxisBatchNorm(bn) if last_axis else bn
        parent._modules[name] = nn.Sequential(OrderedDict(bn=wrapper, act=act))
        wrapped_at[path] = (parent, name, act, bn)
        result.changed.append(path)
        result.details.append(
            {
                "node": path,
                "activation": kind,
                "norm": norm_cls.__name__,
                "features": features,
                "axis": found.axis if len(x.shape) > 2 else "1",
                "bn": f"{path}.bn.norm" if last_axis else f"{path}.bn",
                "input": found.layer,
                "dtype": str(x.dtype).removeprefix("torch."),
            }
        )

    _unwrap_those_not_run(module, example_inputs, wrapped_at, result)

    wrapped = set(activations)
    for i, f in enumerate(record.functional):
        if f.module in wrapped or any(f.module.startswith(a + ".") for a in wrapped):
            continue  # inside an activation module handled above (GELUActivation calls F.gelu)
        if inside is not None and f.module not in within and not f.module.startswith(inside):
            continue
        where = f.module or "the model's forward"
        result.skipped.append(
            Skip(f"{f.module or 'forward'}:{f.op}#{f.index}",
                 f"{f.op} called as a function in {where}: without a traced graph only activation modules can be wrapped")
        )
    return result


def _unwrap_those_not_run(module: nn.Module, example_inputs: Sequence[torch.Tensor], wrapped_at: dict,
                          result: PassResult) -> None:
    """8. Run the model as the record did; put back the bare activation where its new BatchNorm did
    not run (the report said "inserted" for a BatchNorm that never ran, and training left that
    activation's input unnormalized)."""
    if not wrapped_at:
        return
    ran: set[int] = set()
    handles = [bn.register_forward_pre_hook(lambda m, args: ran.add(id(m))) for *_, bn in wrapped_at.values()]
    was_training = module.training
    try:
        with running_user_model(), torch.no_grad():
            module.eval()(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    for path, (parent, name, act, bn) in wrapped_at.items():
        if id(bn) in ran:
            continue
        parent._modules[name] = act
        result.changed.remove(path)
        result.details = [row for row in result.details if row["node"] != path]
        result.skipped.append(Skip(path, "the forward calls it through another reference than its name (a list or "
                                         "attribute holding the module): a BatchNorm wrapped in at its name never ran"))
