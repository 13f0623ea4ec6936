"""What the ONNX passes share: reading a BatchNormalization node, torch tensors from initializers.

The fold algebra lives in torch.nn.utils.fusion (the FX fold's home too) and in onnxscript's
rules; this module only adapts ONNX values to it. Everything here reads the graph, except
`new_initializer`, which adds one under a name nobody uses yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir
import torch
from onnxscript.optimizer import _constant_folding, fold_constants_ir
from torch.nn.utils.fusion import fuse_conv_bn_weights

from bngraph.passes.base import PassResult, Skip

BATCHNORM = "BatchNormalization"
DEFAULT_EPSILON = 1e-5  # BatchNormalization's default in every opset
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CONV_LAYERS = ("Conv", "ConvTranspose")  # the layers with a bias input per output channel


def fold_constants_quietly(model: ir.Model) -> None:
    """onnxscript's constant folding with shape inference, without its warning for each node it
    cannot evaluate ("Evaluation failed: cannot reshape array...", on BERT's position ids): it
    leaves that node as it was, and the user's terminal has nothing to act on. Nor numpy's
    warnings on the values it computes (T5's position buckets take log(0) = -inf on purpose)."""
    folder_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)
    try:
        with np.errstate(all="ignore"), _partial_evaluators_left_out():
            fold_constants_ir(model, onnx_shape_inference=True, should_fold=_should_fold)
    finally:
        folder_log.setLevel(level)


# onnxscript's partial evaluators (they rewrite a node whose inputs are not all constants) that
# write another op than the file's, not exactly or not in its opset: ConcatFromSequence and
# SplitToSequence became opset-13 Unsqueeze and Split in an opset-12 file, and the latter failed
# on a split the file computes; and CastLike with `saturate=0` became a Cast without it (float8:
# 448 where the file gave NaN), while the exporter's CastLike of a constant still folds. Nodes of
# these ops with constant inputs are folded as any other.
_PARTIAL_EVALUATORS_LEFT_OUT = (("", "ConcatFromSequence"), ("", "SplitToSequence"))


def _unless_unsaturated(evaluate):
    def cast_like(node: ir.Node, op, state):
        saturate = node.attributes.get("saturate")
        return None if saturate is not None and saturate.as_int() == 0 else evaluate(node, op, state)

    return cast_like


@contextlib.contextmanager
def _partial_evaluators_left_out():
    evaluators = _constant_folding.registry.op_evaluators
    kept = {key: evaluators.pop(key) for key in _PARTIAL_EVALUATORS_LEFT_OUT if key in evaluators}
    if cast_like := evaluators.get(("", "CastLike")):
        kept[("", "CastLike")] = cast_like
        evaluators[("", "CastLike")] = [dataclasses.replace(e, function=_unless_unsaturated(e.function)) for e in cast_like]
    try:
        yield
    finally:
        evaluators.update(kept)


# Random draws: onnxscript's folder skips most of them, but not Bernoulli, whose one sample it froze.
# All are listed here, so that the folder's list (private) may change without our noticing.
_RANDOM_OPS = frozenset({"Bernoulli", "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike",
                         "Multinomial"})


def _should_fold(node: ir.Node) -> bool | None:
    """The folder's own rules (None), but never a random op, and always a ConstantOfShape whose
    value a BN or a layer's weights take: the folder keeps ConstantOfShape to keep a file small,
    and onnx's own "light" models write every weight and BN statistic so (light_resnet50: its 53
    BNs were left as "not a constant")."""
    if node.domain in ("", "ai.onnx") and node.op_type in _RANDOM_OPS:
        return False
    if node.op_type == "ConstantOfShape" and any(
        use.node.op_type == "BatchNormalization" or (use.node.op_type in LAYER_OPS and use.idx > 0)
        for use in node.outputs[0].uses()
    ):
        return True
    return None


def site(node: ir.Node) -> str:
    """A node as the user finds it in Netron: its name, or its op and first output."""
    return node.name or f"{node.op_type}:{node.outputs[0].name}"


def batchnorms(model: ir.Model) -> list[ir.Node]:
    return _batchnorms_in(model.graph)


def _batchnorms_in(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == BATCHNORM and n.domain in ("", "ai.onnx")]


# A graph inside a node (If's branches, Loop's and Scan's bodies) or a model-local function runs
# only when, and as often as, the node or caller decides: a check on random inputs may never run
# it. onnxscript's rewriter goes into them; the BN rules leave them as they are (`skip_reason`).
NESTED = "bngraph.nested_graph"
NESTED_REASON = ("inside a subgraph or function, which the check runs only where its inputs lead: left as it is, "
                 "unchecked folds being what this tool does not write")


def mark_nested_graphs(model: ir.Model) -> list[ir.Node]:
    """Mark every graph but the main one (see NESTED); the BatchNormalization nodes inside them."""
    nested = [*model.graph.subgraphs()]
    for function in model.functions.values():
        nested += [function.graph, *function.subgraphs()]
    inside = []
    for graph in nested:
        graph.meta[NESTED] = True
        inside += _batchnorms_in(graph)
    return inside


def op_counts(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph.all_nodes())


def constant(value: ir.Value | None) -> torch.Tensor | None:
    """`value` as a torch tensor when it is a constant (an initializer that is not an input)."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    try:
        return torch.from_numpy(value.const_value.numpy().copy())
    except TypeError:  # a dtype torch lacks (e.g. an ml_dtypes float8): leave the node alone
        return None


def training_reason(bn: ir.Node) -> str | None:
    """Why `bn` must keep normalizing with batch statistics, or None when it is in eval mode."""
    mode = bn.attributes.get("training_mode")
    if mode is not None and (mode.is_ref() or mode.as_int() != 0):
        return "runs in training mode (batch statistics): export the model in eval mode"
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return "its running-statistics outputs are used, so it runs in training mode"
    # Opsets 7-13 have no attribute: a node that declares the statistics outputs is in training
    # mode, used or not (torch.onnx.export(training=TRAINING) at those opsets writes five unused
    # ones), and onnxruntime normalizes it with each batch's statistics.
    if opset_of(bn) < 14 and any(out is not None and out.name for out in bn.outputs[1:]):
        return "it declares the running-statistics outputs, which at opsets below 14 means training mode"
    return None


def opset_of(node: ir.Node) -> int:
    """The default-domain opset `node` runs at (the newest where the file does not say)."""
    if node.version is not None:
        return node.version
    imports = node.graph.opset_imports if node.graph is not None else {}
    return imports.get("", imports.get("ai.onnx", 10**6))


def skip_reason(bn: ir.Node) -> str | None:
    """Why no rewrite may touch `bn` at all, or None when it is an eval-mode BN of constants."""
    if bn.graph is not None and bn.graph.meta.get(NESTED):
        return NESTED_REASON
    reason = training_reason(bn)
    if reason:
        return reason
    for value, what in zip(bn.inputs[1:], ("scale", "bias", "mean", "variance")):
        if value is not None and value.const_value is not None and value.is_graph_input():
            # Only when asked to (keep_initializer_inputs): a caller may feed another value.
            return f"its {what} {value.name!r} is a graph input (an initializer a caller may override)"
        if constant(value) is None:
            return f"its {what} {value.name if value else '(missing)'!r} is not a constant"
    return None


def per_position_reason(bn: ir.Node) -> str | None:
    """Why no layer can take `bn` even in eval mode: opset 7/8's spatial=0 keeps statistics per
    channel and position, shaped like one example (C, D1, ...), not per channel."""
    attr = bn.attributes.get("spatial")
    mean = constant(bn.inputs[3]) if len(bn.inputs) > 3 else None
    if attr is None or attr.is_ref() or attr.as_int() != 0 or mean is None:
        return None
    if mean.ndim >= 2:
        return f"spatial=0: its statistics are per channel and position {tuple(mean.shape)}, not per channel"
    # One number per channel is per position too only where a channel has one position, (N, C):
    # statistics flattened to (C*H*W,) for an image would be read as one per channel.
    shape = bn.inputs[0].shape
    if shape is None or len(shape) != 2:
        rank = "an input of unknown rank" if shape is None else f"a rank-{len(shape)} input"
        return f"spatial=0 on {rank}: its {mean.shape[0]} statistics are per position, not per channel"
    return None


def layer_fold_reason(bn: ir.Node) -> str | None:
    """Why `bn` may not fold into a layer's per-channel weights, or None when it may."""
    return skip_reason(bn) or per_position_reason(bn)


def exposed_reason(*values: ir.Value | None) -> str | None:
    """Why a layer whose weights are `values` may not take a BN: one is also a graph output,
    which must keep its value while the layer's changes."""
    exposed = [v.name for v in values if v is not None and v.is_graph_output()]
    return f"its {exposed[0]!r} is also a graph output, which must keep its value" if exposed else None


def bn_parameters(bn: ir.Node) -> dict[str, torch.Tensor | float]:
    """The keyword arguments of torch.nn.utils.fusion's fuse_*_bn_weights for this node."""
    scale, bias, mean, var = (constant(v) for v in bn.inputs[1:5])
    eps = bn.attributes.get("epsilon")
    return {
        "bn_rm": mean,
        "bn_rv": var,
        "bn_eps": eps.as_float() if eps is not None else DEFAULT_EPSILON,
        "bn_w": scale,
        "bn_b": bias,
    }


def bn_scale_shift(bn: ir.Node) -> tuple[torch.Tensor, torch.Tensor]:
    """The BN as an affine map per channel, y = scale * x + shift, shaped like its statistics:
    (C,), or (C, D1, ...) for spatial=0, in float64: each fold rounds once, to its layer's type.

    A lone BN is a BN folded into the identity, so torch's own fold of a 1x1 identity layer
    gives its scale and shift: one algebra for every fold, not a second copy of it here.
    """
    params = bn_parameters(bn)
    shape = params["bn_rm"].shape
    # In float64: computed in float32 (torch.ones'), a float64 model's fold was float32-accurate
    # only, 1.3e-4 of the output off near its mean; rounded to float16 statistics (opset 15 lets a
    # float32 BN keep them), a float32 fold was 0.0019 of the RMS off.
    flat = {k: v.reshape(-1).double() if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    with torch.no_grad():
        scale, shift = fuse_conv_bn_weights(torch.ones(flat["bn_rm"].numel(), 1, dtype=torch.float64), None, **flat)
    return scale.detach().reshape(shape), shift.detach().reshape(shape)


def overflow_reason(bn: ir.Node, layer: ir.Node, bias: torch.Tensor | None = None) -> str | None:
    """Why folding `bn` into `layer` (before or after it) could overflow the layer's float type, or
    None. A float16 layer and a BN of tiny variance make weights beyond 65504, which round to inf:
    the fold is then left to the BN. The bounds are the largest the fold's products can reach
    either way (each weight times the largest scale; the bias by every weight times the largest
    shift), so a fold they allow cannot overflow. `bias`: the layer's, where an Add after it holds
    it (a MatMul's)."""
    weight, dtype = constant(layer.inputs[1]), layer.inputs[1].dtype
    if weight is None or dtype is None or not np.issubdtype(dtype.numpy(), np.floating):
        return None
    largest = float(np.finfo(dtype.numpy()).max)
    scale, shift = (t.double().abs().max().item() for t in bn_scale_shift(bn))
    if bias is None and len(layer.inputs) > 2 and layer.inputs[2] is not None:
        bias = constant(layer.inputs[2])
    bias_max = bias.double().abs().max().item() if bias is not None else 0.0
    weights = weight.double().abs().max().item() * max(scale, 1.0)
    biases = bias_max * max(scale, 1.0) + weight.double().abs().sum().item() * shift + shift
    reach = max(weights, biases)
    if reach <= largest:
        return None
    return (f"folded into {layer.op_type} {site(layer)!r}, its weights could reach {reach:.3g}, beyond {dtype.name.lower()}'s "
            f"largest {largest:.3g}")


def fresh_name(graph: ir.Graph, base: str) -> str:
    """A name no initializer has: reusing one would overwrite a weight that another node still
    reads (the trap onnxscript's BN rules avoid by refusing shared weights)."""
    name, n = base, 1
    while name in graph.initializers:
        n += 1
        name = f"{base}{n}"
    return name


def new_initializer(op, graph: ir.Graph, tensor: torch.Tensor, base: str, dtype: ir.DataType | None = None) -> ir.Value:
    """A folded tensor as a new initializer of the rewrite `op` is building (cast to `dtype`)."""
    array = tensor.detach().contiguous().numpy()
    if dtype is not None:
        array = array.astype(dtype.numpy())
    return op.initializer(ir.tensor(array), name=fresh_name(graph, f"{base}_bnfolded"))


def rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def report_removed_nodes(model: ir.Model, transform) -> PassResult:
    """Run `transform(model)` in place; the result lists each node it removed (for cleanup passes)."""
    before = {id(n): n for n in model.graph}
    transform(model)
    after = {id(n) for n in model.graph}
    result = PassResult(model)
    for key, node in before.items():
        if key not in after:
            result.changed.append(site(node))
            result.details.append({"node": site(node), "op": node.op_type})
    return result


def bns_fed_by(model: ir.Model, op_types: tuple[str, ...]) -> Iterator[tuple[ir.Node, ir.Node]]:
    """(BN, the standard-domain node of `op_types` making its input) for each BN a layer fold
    could take (`layer_fold_reason` is None): the sites the rewrites before a fold look at."""
    for bn in batchnorms(model):
        node = bn.inputs[0].producer()
        if node is not None and node.op_type in op_types and node.domain in ("", "ai.onnx") and not layer_fold_reason(bn):
            yield bn, node


def fold_by_rules(model: ir.Model, rules, find: Callable, why_left: Callable, how: str,
                  layer_in: Callable = lambda found: found) -> PassResult:
    """Apply the rewrite `rules` and report each BN: folded (a row naming `layer_in(find(bn))`,
    the layer it went into) or left, with `why_left(bn, find(bn))`. `find` runs before the
    rewrite, while each BN still stands where the rules look for it."""
    result = PassResult(model)
    found = {bn: find(bn) for bn in batchnorms(model)}
    rules.apply_to_model(model)
    left = set(batchnorms(model))
    for bn, where in found.items():
        if bn in left:
            result.skipped.append(Skip(site(bn), why_left(bn, where)))
            continue
        # A BN gone although `find` saw no layer for it: the rewrite took it some other way (the
        # file is verified as a whole after the passes); say so rather than name a layer.
        into = f"{layer.op_type} {site(layer)}" if where and (layer := layer_in(where)) else "a layer the rules found"
        result.changed.append(site(bn))
        result.details.append({"node": site(bn), "into": into, "how": how, "note": ""})
    return result
