"""Which axes of each traced tensor hold the features of the layer that made it, proven on shapes.

A layer starts a layout: a conv's output channels sit on axis 1 (batched input), a Linear's,
an Embedding's, an RNN's or an attention block's on the last axis. Each op with known semantics
carries the layout to its output: elementwise math with broadcasting (`pos + fc(x)`), dropout,
pooling, concatenation along another axis (or along the features: more features), transposes and
permutes (function and method forms), indexing, splits, reductions over other axes, and reshapes
(`view`, `flatten`, `nn.Unflatten`, `torch.reshape`), followed through the recorded shapes: the
features keep their place in the row-major element order, so a reshape maps them to the output
axes whose leading product and size match. A Linear of C*H*W features reshaped to (N, C, H, W)
keeps all C*H*W as features (axes 1 to 3), never C alone.

A layout is `Features(start, stop)`: axes [start, stop) of the tensor. Anything not proven is a
sentence saying why (a string), so a caller skips the site with that reason: no axis is guessed.

One module past 300 lines: it is one walk over the graph with one rule per kind of op, and each
rule reads the layouts the walk already gave the op's inputs (`_Layouts.of`); split, the rules
would reach back into the walker from another file.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from bngraph.passes._fx_meta import tensor_shape
from bngraph.passes._op_kinds import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES, op_label


@dataclass(frozen=True)
class Features:
    start: int
    stop: int
    source: str  # the layer whose output features these are, as the report names it

    def count(self, shape) -> int:
        return math.prod(shape[self.start : self.stop])


Layout = Features | str | tuple | None  # a tuple for a tuple output, None for a non-tensor value

LAST_AXIS_LAYERS = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention,
                    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                    nn.TransformerDecoder, nn.Transformer)
CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
LINEAR_FUNCTIONS = {F.linear, F.embedding, F.bilinear}
NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)

# Ops whose output has the input's shape and keeps every value where it was (possibly changed).
SAME_LAYOUT_MODULES = (*ACTIVATION_MODULES, *NORM_MODULES, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                       nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax)
SAME_LAYOUT_FUNCTIONS = {
    *ACTIVATION_FUNCTIONS, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.batch_norm,
    F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm, F.softmax, F.log_softmax, F.normalize, torch.clone,
    torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip,
    torch.softmax, torch.log_softmax, torch.erf, torch.detach, torch.pow, operator.neg, torch.square,
}
SAME_LAYOUT_METHODS = {
    *ACTIVATION_METHODS, "clone", "contiguous", "detach", "to", "float", "double", "half", "bfloat16", "type",
    "type_as", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "square", "clamp", "clip", "clamp_", "softmax",
    "log_softmax", "pow", "masked_fill", "masked_fill_", "erf", "__neg__",
}
# Broadcasting elementwise binary ops (an in-place form returns its first argument).
BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.true_divide, torch.multiply, torch.subtract,
}
BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum", "where",
                  "true_divide", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
                  "__truediv__", "__rtruediv__", "__iadd__", "__imul__"}
RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten}
RESHAPE_METHODS = {"reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
TRANSPOSE_NAMES = {"transpose", "swapaxes", "swapdims"}
# Channel-first ops on the trailing `spatial` axes: features must all sit before them.
SPATIAL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                   nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd, nn.Upsample)
SPATIAL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                     F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                     F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pad}
REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "nanmean", "nansum"}


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def _norm_axis(axis, rank: int) -> int | None:
    if not isinstance(axis, int) or not -rank <= axis < max(rank, 1):
        return None
    return axis % rank


class _Layouts:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.of: dict[fx.Node, Layout] = {}

    def input_layout(self, node: fx.Node, i: int = 0) -> Layout:
        arg = node.args[i] if len(node.args) > i else None
        if isinstance(arg, fx.Node):
            return self.of.get(arg, f"{arg.name} has no recorded layout")
        return "its input is not a tensor computed by the model"

    def run(self) -> dict[fx.Node, Layout]:
        for node in self.gm.graph.nodes:
            try:
                self.of[node] = self.layout(node)
            except (TypeError, ValueError, IndexError, AttributeError, KeyError) as err:
                # An argument form this table does not model: not proven, and that is a reason.
                self.of[node] = f"bngraph could not follow the features through {op_label(self.gm, node)} ({err})"
        return self.of

    def layout(self, node: fx.Node) -> Layout:
        if node.op == "placeholder":
            return f"it comes from the model's input {node.name}, whose feature axis is not known"
        if node.op == "get_attr":
            return f"it comes from {node.target}, a tensor held by the model"
        if node.op == "output":
            return None
        shape = tensor_shape(node)
        if node.op == "call_module":
            return self.module_layout(node, self.modules[node.target], shape)
        name = _name(node)
        target = node.target
        if node.op == "call_function" and target is operator.getitem:
            return self.getitem(node, shape)
        if node.op == "call_function" and target is getattr:
            if shape is None:
                return None  # x.shape, x.dtype...: not a tensor
            return f"it comes from .{node.args[1]} at {node.name}, which is not followed"  # x.mT, x.T, x.real
        if shape is None and name not in {"chunk", "split", "tensor_split", "unbind"}:
            return f"no single tensor shape was recorded at {node.name}"
        rank = len(shape) if shape is not None else 0
        if target in CONV_FUNCTIONS:
            weight = tensor_shape(node.args[1]) if isinstance(node.args[1], fx.Node) else None
            if weight is None or len(weight) != rank:
                return f"{name} runs on an unbatched input, so axis 1 is not its channels"
            return Features(1, 2, node.name)
        if target in LINEAR_FUNCTIONS:
            if target is F.linear and self.weight_rank(node) != 2:
                return f"it comes from {node.name}, a linear map whose weight is not a matrix: its last axis is not a layer's features"
            return Features(rank - 1, rank, node.name)
        if target in {torch.matmul, operator.matmul, torch.mm, torch.bmm} or name in {"matmul", "mm", "bmm"}:
            right = node.args[1] if len(node.args) > 1 else None
            if isinstance(right, fx.Node) and right.op == "get_attr" and rank >= 1:
                if self.weight_rank(node) == 2:
                    return Features(rank - 1, rank, node.name)  # x @ W: the columns of a weight
                # x @ v with v a vector: one unit, its values spread over the axes left; a stack
                # of matrices (one per group or head): features on more than the last axis.
                return f"it comes from {node.name}, a product with {right.target}, a weight that is not a matrix: its last axis is not a layer's features"
            return f"it comes from {node.name}, a product of two computed tensors (attention-style), whose last axis is not a layer's features"
        if (node.op == "call_function" and target in SAME_LAYOUT_FUNCTIONS) or (
            node.op == "call_method" and target in SAME_LAYOUT_METHODS
        ):
            return self.same_shape(node, self.input_layout(node), shape)
        if (node.op == "call_function" and target in BINARY_FUNCTIONS) or (
            node.op == "call_method" and target in BINARY_METHODS
        ):
            return self.broadcast(node, shape)
        if target in {torch.cat, torch.concat, torch.concatenate, torch.stack}:
            return self.concatenate(node, shape)
        if name in TRANSPOSE_NAMES and node.op in ("call_function", "call_method"):
            dims = list(range(rank))
            a, b = (_norm_axis(d, rank) for d in node.args[1:3])
            dims[a], dims[b] = dims[b], dims[a]
            return self.permuted(node, dims, shape)
        if name == "t" and rank == 2:
            return self.permuted(node, [1, 0], shape)
        if name == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            dims = dims or node.kwargs.get("dims")
            return self.permuted(node, [_norm_axis(d, rank) for d in dims], shape)
        if name in {"movedim", "moveaxis"}:
            src, dst = _norm_axis(node.args[1], rank), _norm_axis(node.args[2], rank)
            dims = [d for d in range(rank) if d != src]
            dims.insert(dst, src)
            return self.permuted(node, dims, shape)
        if (node.op == "call_function" and target in RESHAPE_FUNCTIONS) or (
            node.op == "call_method" and target in RESHAPE_METHODS
        ):
            return self.reshaped(node, self.input_layout(node), shape)
        if node.op == "call_function" and target in SPATIAL_FUNCTIONS:
            spatial = rank - 2
            return self.spatial(node, self.input_layout(node), shape, spatial)
        if name in REDUCTIONS:
            return self.reduced(node, shape)
        if name in {"chunk", "split", "tensor_split", "unbind"}:
            return self.split(node, name)
        return f"it comes through {node.name} ({op_label(self.gm, node)}), whose effect on the feature axis bngraph does not know"

    def weight_rank(self, node: fx.Node) -> int | None:
        """The rank of the weight `node` (a matmul or F.linear) multiplies by: its second argument."""
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight", node.kwargs.get("other"))
        if not isinstance(weight, fx.Node):
            return None
        if weight.op == "get_attr":
            held = self.gm
            for part in weight.target.split("."):
                held = getattr(held, part, None)
            return held.dim() if isinstance(held, torch.Tensor) else None
        shape = tensor_shape(weight)
        return len(shape) if shape is not None else None

    def module_layout(self, node: fx.Node, module: nn.Module, shape) -> Layout:
        label = f"{node.target} ({type(module).__name__})"
        if isinstance(module, nn.modules.conv._ConvNd):
            if shape is None or len(shape) != module.weight.ndim:
                return f"{label} runs on an unbatched input, so axis 1 is not its channels"
            return Features(1, 2, node.target)
        if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
            # (output, attention weights) / (output, h_n) or (output, (h_n, c_n)): features last.
            meta = node.meta.get("tensor_meta")
            if not isinstance(meta, (tuple, list)):
                return f"no shapes were recorded for {label}'s outputs"
            out_rank = len(meta[0].shape)
            if isinstance(module, nn.MultiheadAttention):
                return (Features(out_rank - 1, out_rank, node.target), f"{label}'s attention weights are not features")
            state = meta[1]
            hidden = Features(len(state.shape) - 1, len(state.shape), node.target) if hasattr(state, "shape") else None
            if hidden is None:
                hidden = tuple(Features(len(s.shape) - 1, len(s.shape), node.target) for s in state)
            return (Features(out_rank - 1, out_rank, node.target), hidden)
        if shape is None:
            return f"no single tensor shape was recorded for {label}'s output"
        rank = len(shape)
        if isinstance(module, LAST_AXIS_LAYERS):
            return Features(rank - 1, rank, node.target)
        if isinstance(module, SAME_LAYOUT_MODULES):
            given = self.input_layout(node)
            if isinstance(given, str) and isinstance(module, NORM_MODULES):
                # A norm states its own feature axis: axis 1 for BatchNorm/GroupNorm/InstanceNorm.
                if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and rank >= 2:
                    return Features(1, 2, node.target)
                if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and len(module.normalized_shape) == 1:
                    return Features(rank - 1, rank, node.target)
            return self.same_shape(node, given, shape)
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return self.reshaped(node, self.input_layout(node), shape)
        if isinstance(module, SPATIAL_MODULES):
            return self.spatial(node, self.input_layout(node), shape, rank - 2)
        return f"it comes out of {label}, which bngraph cannot see into"

    def same_shape(self, node, given: Layout, shape) -> Layout:
        if not isinstance(given, Features):
            return given
        arg = node.args[0]
        if tensor_shape(arg) != shape:
            return f"{node.name} changes the shape of its input"
        return given

    def broadcast(self, node: fx.Node, shape) -> Layout:
        """Each tensor operand's features, right-aligned to the output (broadcasting); one layout
        must win: operands of unknown layout (the block input of a residual, a position table)
        add to the features in place, while two different known layouts mean no single axis."""
        found: set[tuple[int, int]] = set()
        sources, reasons = [], []
        for arg in [*node.args, *node.kwargs.values()]:
            if not isinstance(arg, fx.Node):
                continue
            given, arg_shape = self.of.get(arg), tensor_shape(arg)
            if isinstance(given, Features) and arg_shape is not None:
                shift = len(shape) - len(arg_shape)
                start, stop = given.start + shift, given.stop + shift
                if tuple(shape[start:stop]) != tuple(arg_shape[given.start : given.stop]):
                    return f"{node.name} broadcasts {arg.name}'s features against a larger tensor"
                found.add((start, stop))
                sources.append(given.source)
            elif isinstance(given, str):
                reasons.append(given)
        if len(found) > 1:
            return f"{node.name} combines tensors whose features lie on different axes"
        if not found:
            return reasons[0] if reasons else f"no operand of {node.name} has a known feature axis"
        start, stop = found.pop()
        return Features(start, stop, sources[0])

    def concatenate(self, node: fx.Node, shape) -> Layout:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        layouts = [self.of.get(t) for t in tensors]
        known = [(l, tensor_shape(t)) for l, t in zip(layouts, tensors) if isinstance(l, Features)]
        if not known:
            return next(
                (l for l in layouts if isinstance(l, str)), "no input of the concatenation has a known feature axis"
            )
        ranges = {(l.start, l.stop) for l, _ in known}
        if len(ranges) > 1:
            return f"{node.name} concatenates tensors whose features lie on different axes"
        start, stop = ranges.pop()
        in_rank = len(known[0][1])
        if _name(node) == "stack":
            d = _norm_axis(dim, in_rank + 1)
            if d <= start:
                start, stop = start + 1, stop + 1
            elif d < stop:
                return f"{node.name} stacks inside the features"
            return Features(start, stop, known[0][0].source)
        d = _norm_axis(dim, in_rank)
        if start <= d < stop:
            if len(known) != len(tensors):
                return f"{node.name} joins features with a tensor of unknown layout along the feature axis"
            if stop - start != 1:
                return f"{node.name} concatenates along one of several feature axes"
        return Features(start, stop, known[0][0].source)

    def permuted(self, node: fx.Node, dims: list[int], shape) -> Layout:
        given = self.input_layout(node)
        if not isinstance(given, Features):
            return given
        where = [dims.index(a) for a in range(given.start, given.stop)]
        if where != list(range(where[0], where[0] + len(where))):
            return f"{node.name} reorders the feature axes"
        return Features(where[0], where[0] + len(where), given.source)

    def reshaped(self, node: fx.Node, given: Layout, shape) -> Layout:
        """Row-major order is kept: the features are the output axes after the same number of
        leading elements (the product of the axes before them) spanning the same count."""
        if not isinstance(given, Features):
            return given
        arg = node.args[0]
        in_shape = tensor_shape(arg)
        if in_shape is None:
            return f"no shape was recorded for {arg.name}"
        before, count = math.prod(in_shape[: given.start]), given.count(in_shape)
        best = None
        for start in range(len(shape) + 1):
            if math.prod(shape[:start]) != before:
                continue
            for stop in range(start + 1, len(shape) + 1):
                if math.prod(shape[start:stop]) == count:
                    best = (start, stop)  # the last match drops leading size-1 axes
                    break
        if best is None:
            return f"{node.name} ({op_label(self.gm, node)}) merges {given.source}'s features with other axes"
        start, stop = best
        while stop - start > 1 and shape[stop - 1] == 1:
            stop -= 1
        return Features(start, stop, given.source)

    def spatial(self, node: fx.Node, given: Layout, shape, spatial: int) -> Layout:
        if not isinstance(given, Features):
            return given
        if given.stop > len(shape) - spatial or len(tensor_shape(node.args[0]) or ()) != len(shape):
            return f"{node.name} ({op_label(self.gm, node)}) pools or resizes over {given.source}'s features"
        if tuple(shape[given.start : given.stop]) != tuple(tensor_shape(node.args[0])[given.start : given.stop]):
            return f"{node.name} changes the number of features"
        return given

    def reduced(self, node: fx.Node, shape) -> Layout:
        given = self.input_layout(node)
        if not isinstance(given, Features):
            return given
        in_shape = tensor_shape(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return f"{node.name} reduces over every axis"
        dims = {_norm_axis(d, len(in_shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if any(given.start <= d < given.stop for d in dims):
            return f"{node.name} reduces over {given.source}'s features"
        if len(shape) == len(in_shape):  # keepdim
            return given
        shift = sum(1 for d in dims if d < given.start)
        return Features(given.start - shift, given.stop - shift, given.source)

    def split(self, node: fx.Node, name: str) -> Layout:
        given = self.input_layout(node)
        if not isinstance(given, Features):
            return given
        in_shape = tensor_shape(node.args[0])
        meta = node.meta.get("tensor_meta")
        pieces = len(meta) if isinstance(meta, (list, tuple)) else 0
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if name == "unbind":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        d = _norm_axis(dim, len(in_shape))
        if name == "unbind":
            if given.start <= d < given.stop:
                return f"{node.name} unbinds {given.source}'s features"
            shift = 1 if d < given.start else 0
            return tuple(Features(given.start - shift, given.stop - shift, given.source) for _ in range(pieces))
        if given.start <= d < given.stop and given.stop - given.start != 1:
            return f"{node.name} splits one of several feature axes"
        return tuple(given for _ in range(pieces))

    def getitem(self, node: fx.Node, shape) -> Layout:
        source, index = node.args
        given = self.of.get(source)
        if isinstance(given, tuple):
            return (
                given[index]
                if isinstance(index, int) and -len(given) <= index < len(given)
                else "an element of a tuple output"
            )
        if not isinstance(given, Features):
            return given
        in_shape = tensor_shape(source)
        if shape is None or in_shape is None:
            return f"no shape was recorded at {node.name}"
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in index):
            return f"{node.name} indexes with a tensor or a list"
        # Basic indexing: ints drop an axis, slices keep one, None adds one, ... fills the rest.
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        out_axis, in_axis, mapping = 0, 0, {}
        for i in index:
            if i is Ellipsis:
                for _ in range(len(in_shape) - consumed):
                    mapping[in_axis] = out_axis
                    in_axis, out_axis = in_axis + 1, out_axis + 1
            elif i is None:
                out_axis += 1
            elif isinstance(i, int):
                mapping[in_axis] = None
                in_axis += 1
            elif isinstance(i, slice):
                mapping[in_axis] = out_axis
                in_axis, out_axis = in_axis + 1, out_axis + 1
            else:
                return f"{node.name} indexes with {type(i).__name__}"
        while in_axis < len(in_shape):
            mapping[in_axis] = out_axis
            in_axis, out_axis = in_axis + 1, out_axis + 1
        axes = [mapping[a] for a in range(given.start, given.stop)]
        if any(a is None for a in axes):
            return f"{node.name} picks one of {given.source}'s features"
        return Features(axes[0], axes[-1] + 1, given.source)


def feature_layouts(gm: fx.GraphModule) -> dict[fx.Node, Layout]:
    """Every node's feature layout (needs recorded shapes: `bngraph.trace.record_shapes`)."""
    return _Layouts(gm).run()


__all__ = ["Features", "Layout", "feature_layouts"]
