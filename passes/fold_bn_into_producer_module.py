"""Fold BatchNorms into the layer module that produced their input, for models fx cannot trace.

The graph-free counterpart of `fold_bn_into_preceding_layer`, for what the module-level fallback
of `insert` writes (`Sequential(bn, act)` wraps) and any other untraceable model: the model runs
once in eval mode (`_dataflow.record_run`), and a BatchNorm module folds into the conv or
linear module whose output it normalizes when that is exact without a graph:
  1. the BN is called once, in eval mode, with running statistics, and runs no hooks (forward,
     backward or global: `_fx_effects.hook_refusal`, the traced passes' rule);
  2. its input was made, maybe through an eval-mode dropout or a slice that keeps every channel,
     by one call of a Conv*d or ConvTranspose*d (features in axis 1), or of a Linear on (N, C),
     or on (N, T, C) flattened to (N*T, C) as LeViT does (BatchNorm1d's axis 1 is then the Linear's output axis), or of a
     layer computing `addmm(bias, x, weight)` viewed back to x's leading axes with its own
     weight (in, out) (HuggingFace's Conv1D); a plain layer (its op read its own weight and
     bias, or a weight its own weight_norm parametrization computed, made plain by the fold),
     unshared, running no hooks, called once;
  3. nothing but the BN read that output, and nothing changed it in place in between, and the
     forward reads nothing of the BN and no tensor of the layer beyond calling them
     (`self.bn.running_mean` or `self.bn.eps` used in the forward would be gone,
     `self.conv.weight` changed).
Without a graph these are facts about runs, not about the code: a loop that runs a shared conv
once on the example and twice on larger inputs passes them on the example alone. So the model
also runs on probes unlike the example (`PROBES`: scaled, shifted, all positive, another batch
size), and a BN folds only where 1-3 hold, with the same layer, on every probe the model takes.
That is evidence, not proof: a fold is exact on the inputs probed, and each fold's row says which.
Then the layer's weight and bias absorb the BN (torch.nn.utils.fusion) and the BN becomes an
nn.Identity. Every other BN is left, with the reason; export's ONNX passes can still fold it.
Each fold also lists the edits that rebuild it from the model's source, for `bngraph fold -o`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from bngraph.errors import ModelRaised, running_user_model
from bngraph.passes._bn_affine import BatchNormStats, fold_into_producer
from bngraph.passes._dataflow import RunRecord, record_run, regroups_leading_axes
from bngraph.passes._fx_effects import hook_refusal
from bngraph.passes._fx_layers import make_plain
from bngraph.passes.base import PassResult, Skip, graph_pass
from bngraph.runners import batch_axes_of, eval_mode, fresh_inputs, random_tensor


TRAINING_IN_EVAL = ("it is in training mode when the model is in eval mode (its train() or its forward keeps it "
                    "so), normalizing with each batch's statistics")


def _why_not(path, bn, calls, record, module) -> tuple[str | None, str | None]:
    """(reason the BN stays, None) or (None, path of the layer it folds into)."""
    if not calls:
        return "the model does not call it", None
    if len(calls) > 1:
        return f"called {len(calls)} times; one fold would change every call", None
    if calls[0].training:
        return TRAINING_IN_EVAL, None
    if type(bn).forward.__module__ != "torch.nn.modules.batchnorm" or "forward" in vars(bn):  # torch's own BNs pass
        # A subclass computing more (timm's BatchNormAct2d, a clamp after), or a forward set on
        # the instance: folding its statistics and putting an Identity in its place dropped the
        # rest, a 0.25 error on inputs x10.
        whose = "its instance" if "forward" in vars(bn) else type(bn).__name__
        return f"{whose} overrides BatchNorm's forward: folding it would drop what else it computes", None
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False), so it normalizes each batch", None
    if reason := hook_refusal(path, bn, "folding it away"):
        return reason, None
    if len(names := [p for p, m in module.named_modules(remove_duplicate=False) if m is bn]) > 1:
        # The fold puts an Identity at one name; the forward may call the BN through another.
        return f"registered under several names ({', '.join(names)}): the fold would remove it at one only", None
    if read := record.read_outside.get(path):
        return f"the forward reads its {_names(read)} beyond calling it, and the fold would remove the BN", None
    x = calls[0].input
    # In eval mode a dropout is the identity: the BN folds through it into the layer before.
    while x is not None and x.op in _EVAL_IDENTITIES and len(x.inputs) == 1 and _reads(x, record) == 1:
        x = x.inputs[0]
    # A slice that keeps every channel (wav2vec2's SamePadLayer: x[:, :, :-1]): a per-channel
    # scale and shift commute with it.
    if (x is not None and x.op == "__getitem__" and x.relaid is not None and _reads(x, record) == 1
            and len(x.shape) == len(x.relaid.shape) >= 2 and x.shape[1] == x.relaid.shape[1]):
        x = x.relaid
    merged = _merged_leading_axes(x, record)
    if merged is not None:  # LeViT: BatchNorm1d(linear(x).flatten(0, 1)), features still last
        x = merged
    if x is None or not x.modules:
        return f"its input comes from {x.where() if x else 'no op'}, not a layer module", None
    layer_path, layer = x.modules[0], module.get_submodule(x.modules[0])
    product = _transposed_linear_product(x, layer, record)
    if product is not None:  # HuggingFace's Conv1D
        x = product
    elif not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) or x.op not in ("linear", *_CONV_OPS):
        return f"its input comes from {x.where()}, not a conv or linear layer", None
    if merged is not None and product is None and not isinstance(layer, nn.Linear):
        # (N, C, L).reshape(-1, C): the BN's features are L's positions, a conv's are C
        return (f"its input is {layer_path}'s output with its leading axes merged, whose last axis is not the "
                f"{type(layer).__name__}'s feature axis"), None
    if isinstance(layer, nn.Linear) and len(x.shape) != 2 and merged is None:
        return f"the Linear {layer_path}'s output has rank {len(x.shape)}: the BN's axis 1 is not its feature axis", None
    used = x.parameters
    own_weight = id(layer.weight) in used or _weight_normed(layer, used)
    if not own_weight or (layer.bias is not None and id(layer.bias) not in used):
        return f"{layer_path} ({type(layer).__name__}) computes with other tensors than its own weight and bias", None
    if _shares_parameters(module, layer):
        return f"{layer_path} shares its weight or bias (or their memory) with another tensor of the model", None
    if reason := hook_refusal(layer_path, layer, "folding a BatchNorm into it"):
        return reason, None
    if read := record.read_outside.get(layer_path):
        return f"the forward reads {layer_path}'s {_names(read)} beyond calling it, which the fold would change", None
    if len(record.calls_of(layer_path)) != 1:
        return f"{layer_path} is called {len(record.calls_of(layer_path))} times", None
    reads = _reads(x, record)
    if reads != 1:
        return f"{layer_path}'s output is read {reads} times, not only by the BN", None
    return None, layer_path


# Inputs unlike the example, where a data-dependent forward may take another path (a loop that
# runs until its values are small, a branch on their range or on the batch size). Integer and
# boolean inputs (indices, masks) are kept: scaled, they would be other indices or none at all.
PROBES = (
    ("the example x 10", lambda x, gen: x * 10),
    ("the example + 3", lambda x, gen: x + 3),
    ("uniform [0, 1) values", lambda x, gen: torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)),
)


def _probe_inputs(example_inputs: Sequence) -> list[tuple[str, list]]:
    gen = torch.Generator().manual_seed(0)
    probes = [(what, [change(x, gen) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                      for x in example_inputs]) for what, change in PROBES]
    axes = batch_axes_of(example_inputs)
    sizes = {x.shape[0] for x, axis in zip(example_inputs, axes) if axis is not None}
    if len(sizes) == 1:  # one batch size: one more (not 1, which a model may refuse)
        size = sizes.pop() + 1
        batch = [random_tensor((size, *x.shape[1:]), x.dtype, gen).to(x.device)
                 if isinstance(x, torch.Tensor) and axis is not None else x for x, axis in zip(example_inputs, axes)]
        probes.append((f"a batch of {size}", batch))
    return probes


def _records_on_probes(module: nn.Module, example_inputs: Sequence) -> list[tuple[str, RunRecord]]:
    """(what the probe is, its run's record) for each probe the model runs on: one it raises on
    is an input it does not take, and proves nothing either way."""
    records = []
    for what, inputs in _probe_inputs(example_inputs):
        try:
            with running_user_model():  # only the model's own exception: a bug in the recorder is not a refusal
                records.append((what, record_run(module, inputs)))
        except ModelRaised:
            continue
    return records


class _ReadFoldedAway(Exception):
    """Not an AttributeError, which `getattr(bn, name, default)` and `hasattr` would swallow."""

    def __init__(self, path: str, name: str):
        super().__init__(f"{path}.{name}")
        self.path, self.name = path, name


class _StandIn(nn.Module):
    """Computes as the BN at `path` does and has none of its attributes: a forward that reads one
    (`self.bn.eps`, `self.bn.num_features`) beyond calling the BN trips it, as it would the
    nn.Identity the fold leaves there."""

    def __init__(self, path: str, bn: nn.Module):
        super().__init__()
        self.__dict__["_stand_in_for"] = (path, bn)  # not a submodule: the model holds no BN here

    def forward(self, x):
        return self._stand_in_for[1](x)

    def __getattr__(self, name: str):
        raise _ReadFoldedAway(self._stand_in_for[0], name)


def _attributes_read_beyond_a_call(module: nn.Module, paths: Sequence[str], example_inputs) -> dict[str, str]:
    """BN path -> an attribute of it the forward reads other than by calling it, found by running
    the model on the example with a stand-in (`_StandIn`) for each BN at `paths`. Tensors read
    show in the record already (`RunRecord.read_outside`); this finds the rest, which the record
    cannot see. One run, and one more for each BN found."""
    found: dict[str, str] = {}
    left = list(paths)
    while left:
        slots = {p: module.get_submodule(p) for p in left}
        for p, bn in slots.items():
            parent, _, name = p.rpartition(".")
            module.get_submodule(parent)._modules[name] = _StandIn(p, bn)
        try:
            with torch.no_grad(), eval_mode(module):
                module(*fresh_inputs(example_inputs))
        except _ReadFoldedAway as err:
            found[err.path] = err.name
            left.remove(err.path)
            continue
        except Exception:  # noqa: BLE001 - the model ran on the example before: the check after the fold decides
            break
        finally:
            for p, bn in slots.items():
                parent, _, name = p.rpartition(".")
                module.get_submodule(parent)._modules[name] = bn
        break
    return found


_EVAL_IDENTITIES = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")


def _merged_leading_axes(x, record):
    """The value `x` re-lays as (all leading axes, last axis), when that is all it does."""
    if x is None or x.op not in ("flatten", "reshape", "view") or x.relaid is None or len(x.shape) != 2:
        return None
    source = x.relaid
    if len(source.shape) < 3 or source.shape[-1] != x.shape[-1] or _reads(x, record) != 1:
        return None
    return source if math.prod(source.shape[:-1]) == x.shape[0] else None


def _transposed_linear_product(x, layer: nn.Module, record):
    """For a layer whose output `x` is `addmm(bias, input, weight)` viewed back to the input's
    leading axes, with its own weight (in, out) and bias (out) and no other parameters
    (HuggingFace's Conv1D: a Linear storing its weight transposed), the addmm's value."""
    product = x.relaid
    if product is None or product.op != "addmm" or not regroups_leading_axes(x) or _reads(x, record) != 1:
        return None
    params = dict(layer.named_parameters(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    if len(params) != 2 or weight is None or bias is None or weight.dim() != 2 or bias.shape != weight.shape[1:]:
        return None
    return product if product.parameters == {id(weight), id(bias)} else None


def _weight_normed(layer: nn.Module, used: frozenset[int]) -> bool:
    """Whether `layer`'s weight is computed in its call by a parametrization of its own (torch's
    weight_norm, as on wav2vec2's positional conv), and its op read no other parameter than its
    bias: the fold then makes the weight it computes a plain one."""
    if not parametrize.is_parametrized(layer, "weight") or set(layer.parametrizations) != {"weight"}:
        return False
    return used <= {id(layer.bias)}


def _names(attrs) -> str:
    return " and ".join(sorted(attrs))


def _reads(value, record) -> int:
    return value.uses + sum(v is value for v in record.outputs)


def _shares_parameters(module: nn.Module, layer: nn.Module) -> bool:
    """The layer's parameters are also another module's, or their memory another tensor's (a
    buffer made as `conv.weight.detach()`, a Parameter of `c1.weight.data`): the model rebuilt
    from what fold saves shares that memory again, and loading one tensor overwrites the other."""
    mine = {id(p) for p in layer.parameters()}
    if sum(id(p) in mine for _, p in module.named_parameters(remove_duplicate=False)) > len(mine):
        return True
    memory = {p.untyped_storage().data_ptr() for p in layer.parameters()} - {0}
    others = (t for t in (*module.parameters(), *module.buffers()) if id(t) not in mine)
    return any(t.untyped_storage().data_ptr() in memory for t in others)


_CONV_OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


@graph_pass(in_place=True)
def fold_bn_into_producer_module(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], within: Sequence[str] | None = None
) -> PassResult:
    """Fold each BatchNorm of `module` (in eval mode) into the layer module that produced its
    input, where that is exact (see the module docstring); with `within`, only those inside the
    submodules at these paths (what a traced graph calls whole, which its passes cannot reach)."""
    result = PassResult(module)
    inside = None if within is None else tuple(f"{p}." for p in within)
    with running_user_model():
        record = record_run(module, example_inputs)
    probes = _records_on_probes(module, example_inputs)
    foldable = {}  # BN path -> the layer it folds into
    for path, bn in list(module.named_modules()):
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or inside is not None and not path.startswith(inside):
            continue
        reason, layer_path = _why_not(path, bn, record.calls_of(path), record, module)
        for what, probe in probes if not reason else ():
            reason, on_probe = _why_not(path, bn, probe.calls_of(path), probe, module)
            if reason:
                reason = f"on {what}: {reason} (on the example it folds into {layer_path})"
            elif on_probe != layer_path:
                reason = f"its input comes from {on_probe} on {what}, from {layer_path} on the example"
            if reason:
                break
        if reason:
            result.skipped.append(Skip(path, reason))
        else:
            foldable[path] = layer_path
    for path, name in _attributes_read_beyond_a_call(module, list(foldable), example_inputs).items():
        del foldable[path]
        result.skipped.append(Skip(path, f"the forward reads its {name} beyond calling it, and the fold would "
                                          "replace the BN by an nn.Identity, which has none"))
    for path, layer_path in foldable.items():
        bn = module.get_submodule(path)
        layer = module.get_submodule(layer_path)
        edits: list[tuple] = [("identity", path)]
        if parametrize.is_parametrized(layer, "weight"):  # the weight it computes, now plain
            make_plain(layer)
            edits.append(("plain", layer_path, "weight"))
        had_bias = layer.bias is not None
        stats = BatchNormStats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        if isinstance(layer, nn.modules.conv._ConvNd):  # grouped transposed convs too (`_bn_affine.regroup`)
            kind = "conv_transpose" if isinstance(layer, nn.modules.conv._ConvTransposeNd) else "conv"
            weight, bias = fold_into_producer(kind, layer.weight, layer.bias, layer.groups, stats)
        elif isinstance(layer, nn.Linear):
            weight, bias = fold_into_producer("linear", layer.weight, layer.bias, 1, stats)
        else:  # a Conv1D's weight is (in, out)
            weight, bias = fold_into_producer("linear", layer.weight.t(), layer.bias, 1, stats)
            weight = weight.t().contiguous()
        # Each keeps the trainability of what it replaces; a new bias, the BN's beta's it comes from.
        bias_like = layer.bias if had_bias else bn.bias if bn.bias is not None else layer.weight
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias, requires_grad=bias_like.requires_grad)
        if not had_bias:
            edits.append(("bias", layer_path, bias.shape[0], str(bias.dtype).removeprefix("torch.")))
        parent_path, _, name = path.rpartition(".")
        module.get_submodule(parent_path)._modules[name] = nn.Identity()
        result.changed.append(path)
        result.details.append({"node": path, "into": layer_path, "how": "into the layer before it", "edits": edits,
                               "probed_on": ["the example", *(what for what, _ in probes)]})
    return result
