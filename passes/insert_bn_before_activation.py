"""Put a BatchNorm in front of every elementwise nonlinearity: z = g(BN(Wu)) (paper, Sec. 3.2).

Cases, numbered as in the code:
  1. The input is already normalized (a norm, maybe behind shape-only ops or a Dropout), or no
     input of the model reaches it (an MLP over a table of coordinates: no batch to normalize
     over): skip.
  2. The features of the layer that made the input are found by following them through every
     op in between, on the recorded shapes (`_feature_axis`); where that is not proven, skip
     with the reason. No axis is guessed.
  3. One BatchNorm{1,2,3}d with one gamma/beta per feature and statistics over every other
     axis: per feature map for a conv, per activation for a Linear (Sec. 3.2). Features on
     another axis than 1 are moved there and back (`transpose`); features spread over several
     axes (a Linear's C*H*W reshaped to (N, C, H, W)) are flattened into one and unflattened.
  0. An activation inside an activation module or function written out of elementwise pieces
     (a user's Swish `x * torch.sigmoid(x)`, HuggingFace's NewGELUActivation, latent
     diffusion's `nonlinearity(x)`) is part of one nonlinearity: the BN goes on the call's input
     x, read by every part of it that read x (`composite_activation`), and the call's other
     activations find their input normalized. Written inline in a forward of layers, the same
     is an activation and arithmetic; the details name the ops that read x unnormalized.
  4. An in-place activation (`y.relu_()`, `F.relu(y, inplace=True)`, `ReLU(inplace=True)`)
     now writes into the BatchNorm's output, not into y: every later reader of y reads the
     activation instead. Where y shares memory with a view read later, or is the model's input
     or a view of another tensor, that cannot be kept exactly: skip.
An activation module called at several sites gets one BatchNorm per site. Dropping the bias
that BN makes redundant is a separate pass (`drop_bias_before_bn`).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from bngraph.passes._feature_axis import Features, feature_layouts
from bngraph.passes._fx_effects import aliases_of, mutates_first_argument
from bngraph.passes._fx_meta import has_submodule, tensor_dtype, tensor_shape
from bngraph.passes._op_kinds import (
    CONV_LINEAR_MODULES, activation_kind, composite_activation, elementwise_region, normalized_through_arithmetic,
    normalizer_behind, op_label,
)
from bngraph.passes.base import PassResult, Skip, graph_pass

BATCHNORM_BY_RANK: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def _free_name(gm: fx.GraphModule, wanted: str) -> str:
    name, i = wanted, 1
    while has_submodule(gm, name):
        name, i = f"{wanted}_{i}", i + 1
    return name



def _device(gm: fx.GraphModule) -> torch.device:
    return next((t.device for t in [*gm.parameters(), *gm.buffers()]), torch.device("cpu"))


def _later_readers(gm: fx.GraphModule, act: fx.Node, x: fx.Node) -> list[tuple[fx.Node, fx.Node]] | str:
    """4. For an in-place `act` on `x`: the (reader, name of x) pairs to point at `act`, or why not."""
    modules = dict(gm.named_modules())
    same = {x, act}  # names of the one tensor act writes into: x and in-place results on it
    root = x
    while (
        root.op not in ("placeholder", "get_attr")
        and root.args
        and isinstance(root.args[0], fx.Node)
        and mutates_first_argument(root, modules)
    ):
        root = root.args[0]
        same.add(root)
    if root.op in ("placeholder", "get_attr"):
        return f"it writes into {root.name}, {'an input of the model' if root.op == 'placeholder' else 'a tensor the model holds'}"
    base = root.args[0] if root.args and isinstance(root.args[0], fx.Node) else None
    if base is not None and root in aliases_of(base):
        return f"it writes into {root.name}, a view of {base.name}"
    todo = list(same)
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in same and user.args and user.args[0] is node and mutates_first_argument(user, modules):
                same.add(user)
                todo.append(user)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for name in same:
        for view in aliases_of(name) - same:
            if order[view] < order[act] and any(order[u] > order[act] for u in view.users):
                return f"{view.name} views the memory it writes into and is read after it"
    return [(user, name) for name in same - {act} for user in name.users if order[user] > order[act]]


def _meta(shape, dtype):
    # As bngraph.trace records it: no memory format (its check imports sympy).
    return _extract_tensor_metadata(torch.empty(shape, dtype=dtype, device="meta"), include_contiguity=False)


def _inline_arithmetic(gm: fx.GraphModule, act: fx.Node) -> list[fx.Node]:
    """The other readers of `act`'s input in the elementwise function of it that `act` is part
    of, where that function is not one call (`composite_activation`): x * sigmoid(x) in a
    block's forward gives [mul]; relu(l(x) * scale) none (the mul makes relu's input)."""
    found = elementwise_region(gm, act)
    if found is None or not act.args or not isinstance(act.args[0], fx.Node):
        return []
    _, region, _ = found
    return [u for u in act.args[0].users if u in region and u is not act]


# A nonlinearity whose input no model input reaches (an MLP over a table of coordinates, as Swin
# V2's position bias): the same tensor in every batch, so a BatchNorm would normalize over the
# table, not over examples.
NOT_FROM_THE_INPUT = (
    "its input is computed from parameters and buffers alone, not from the model's input: a BatchNorm "
    "there would take its statistics over that table, not over a batch"
)


def _computed_from_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes that the graph's inputs reach (one pass in graph order)."""
    reached: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in reached for a in node.all_input_nodes):
            reached.add(node)
    return reached


@graph_pass(in_place=True)
def insert_bn_before_activation(gm: fx.GraphModule) -> PassResult:
    """Insert a BatchNorm before each nonlinearity whose input is not normalized (needs shapes:
    `bngraph.trace.trace(module, example_inputs)`)."""
    result = PassResult(gm)
    device = _device(gm)
    layouts = feature_layouts(gm)
    from_input = _computed_from_inputs(gm)
    inputs_of: dict[str, fx.Node] = {}  # each changed activation's input x
    for act in list(gm.graph.nodes):
        kind = activation_kind(gm, act)
        if kind is None:
            continue
        composite = composite_activation(gm, act)
        x = composite[0] if composite else act.args[0] if act.args else act.kwargs.get("input")
        # x * sigmoid(x) written in a forward of layers counts as sigmoid and arithmetic (as
        # relu(y) + y is an activation and a skip): the report names what reads x unnormalized.
        inline = [] if composite else _inline_arithmetic(gm, act)
        if not isinstance(x, fx.Node):
            result.skipped.append(Skip(act.name, "its input is a constant, not a tensor computed by the model"))
            continue
        if x not in from_input:
            result.skipped.append(Skip(act.name, NOT_FROM_THE_INPUT))
            continue
        # 1. Already normalized.
        norm = normalizer_behind(gm, x) or (None if composite else normalized_through_arithmetic(gm, act))
        if norm is not None:
            part_of = f", in front of {composite[2].name}, the nonlinearity it is part of" if composite else ""
            result.skipped.append(Skip(act.name, f"input already normalized by {norm.name} ({op_label(gm, norm)}){part_of}"))
            continue
        shape, dtype = tensor_shape(x), tensor_dtype(x)
        if shape is None:
            result.skipped.append(Skip(act.name, "no shape recorded for its input (not a single tensor)"))
            continue
        if dtype is None or not dtype.is_floating_point:
            result.skipped.append(Skip(act.name, f"input has dtype {dtype}; BatchNorm needs floating point"))
            continue
        # 2. Where the features are.
        layout = layouts.get(x)
        if not isinstance(layout, Features):
            result.skipped.append(Skip(act.name, f"the feature axis of its input is not proven: {layout}"))
            continue
        span = layout.stop - layout.start
        rank = len(shape) - span + 1
        if rank not in BATCHNORM_BY_RANK or len(shape) < 2:
            why = "no batch axis besides the features" if len(shape) < 2 else f"no BatchNorm for rank-{rank} tensors"
            result.skipped.append(Skip(act.name, f"input of shape {shape}: {why}"))
            continue
        # 4. In place: who reads the written tensor afterwards.
        readers = _later_readers(gm, act, x) if mutates_first_argument(act) else []
        if isinstance(readers, str):
            result.skipped.append(Skip(act.name, f"in-place activation: {readers}"))
            continue
        # 3. The BatchNorm, on one feature axis moved to axis 1.
        features, axis = layout.count(shape), layout.start
        norm_cls = BATCHNORM_BY_RANK[rank]
        bn = norm_cls(features, device=device, dtype=dtype).train(gm.training)
        owner = act.target if act.op == "call_module" else act.name
        bn_path = _free_name(gm, f"{owner}_bn")
        gm.add_submodule(bn_path, bn)
        graph = gm.graph
        readers_of_x = composite[1] if composite else [act]
        order = {n: i for i, n in enumerate(graph.nodes)}
        with graph.inserting_before(min(readers_of_x, key=order.__getitem__)):
            value, flat_shape = x, list(shape)
            if span > 1:
                # A Linear's C*H*W outputs reshaped to (N, C, H, W) are C*H*W activations, each
                # from its own row of W: the paper pools positions only for a conv, whose weights
                # are shared across them (Sec. 3.2), so each keeps its own statistics and gamma.
                value = graph.call_method("flatten", (value, layout.start, layout.stop - 1))
                flat_shape[layout.start : layout.stop] = [features]
                value.meta["tensor_meta"] = _meta(flat_shape, dtype)
            moved_shape = list(flat_shape)
            if axis != 1:
                where = -1 if axis == rank - 1 else axis
                moved_shape[1], moved_shape[axis] = moved_shape[axis], moved_shape[1]
                value = graph.call_method("transpose", (value, 1, where))
                value.meta["tensor_meta"] = _meta(moved_shape, dtype)
            value = graph.call_module(bn_path, (value,))
            value.meta["tensor_meta"] = _meta(moved_shape, dtype)
            if axis != 1:
                value = graph.call_method("transpose", (value, 1, where))
                value.meta["tensor_meta"] = _meta(flat_shape, dtype)
            if span > 1:
                value = graph.call_method("unflatten", (value, layout.start, tuple(shape[layout.start : layout.stop])))
            value.meta["tensor_meta"] = x.meta["tensor_meta"]
        # The new nodes stand where x did for the activations still to come: computed from the
        # input as x is, and made in the calls x was made in (without them, tanh after relu's BN
        # read as part of one activation function of that BN, and was skipped as "not from the
        # model's input").
        for node in list(graph.nodes)[order[x] + 1 : list(graph.nodes).index(value) + 1]:
            if node not in order:
                from_input.add(node)
                node.meta.update({k: x.meta[k] for k in ("function_calls", "nn_module_stack") if k in x.meta})
        for reader in readers_of_x:
            reader.replace_input_with(x, value)
        for reader, name in readers:
            reader.replace_input_with(name, act)
        result.changed.append(act.name)
        result.details.append(
            {
                "node": act.name,
                "activation": f"{kind} in {composite[2].name}" if composite else kind,
                "norm": norm_cls.__name__,
                "features": features,
                "axis": list(range(layout.start, layout.stop)),
                "bn": bn_path,
                "input": x.name,
                "layer": layout.source,
                "unnormalized_readers": inline,  # named below: a later activation's BN may take one over
            }
        )
        inputs_of[act.name] = x
    for row in result.details:  # tanh(h) beside sigmoid(h) reads h through its own BN once it has one
        row["unnormalized_readers"] = [n.name for n in row["unnormalized_readers"] if inputs_of[row["node"]] in n.all_input_nodes]
    result.skipped += [Skip(n.name, f"{op_label(gm, n)} at 0 computes a ReLU, which insert does not take for an activation "
                            "(a clamp may as well bound a statistic): write F.relu for a BN in front of it")
                       for n in gm.graph.nodes if _clamps_at_zero(n)]
    result.skipped += [Skip(n.name, f"{op_label(gm, n)} gates one half of its input's features with the other, which "
                            "insert does not take for an activation: put a BatchNorm in front of it in the model")
                       for n in gm.graph.nodes if _is_glu(gm, n)]
    result.skipped += [Skip(n.name, f"{op_label(gm, n)} on {layer}'s output computes a nonlinearity by hand, which insert "
                            "does not take for an activation: write it as one (F.leaky_relu, ...) for a BatchNorm in front")
                       for n in gm.graph.nodes if (layer := _hand_written_on_a_layer(gm, n))]
    if result.changed:
        gm.graph.lint()
        gm.recompile()
    return result


def _is_glu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """`nn.GLU`, `F.glu`: a nonlinearity that halves its input, not elementwise, so none of the
    passes that move a BN across activations may take it for one; named, not passed over."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.GLU)
    return node.op == "call_function" and node.target is F.glu


_BY_HAND = {torch.where: 1, torch.maximum: 0, torch.minimum: 0, torch.sin: 0, torch.cos: 0,  # op: its input's index
            torch.exp: 0, torch.abs: 0, torch.log1p: 0}  # a softplus written log1p(exp(h)), a Snake's sin
_BY_HAND_METHODS = {"maximum": 0, "minimum": 0, "sin": 0, "cos": 0, "exp": 0, "abs": 0, "log1p": 0}
_COMPARISONS = {operator.gt, operator.ge, operator.lt, operator.le, torch.gt, torch.ge, torch.lt, torch.le,
                "gt", "ge", "lt", "le"}
_LAYER_FUNCTIONS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


def _hand_written_on_a_layer(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The conv or linear whose output `node` bends by hand (`torch.where(h > 0, h, 0.1 * h)`,
    `h * (h > 0)`, `torch.max(h, 0 * h)`, a SIREN's `torch.sin`), also through a position added to
    it, which the report should name rather than pass over; else None."""
    args = [a for a in node.args]
    if node.op == "call_function" and node.target in (torch.max, torch.min) or \
            node.op == "call_method" and node.target in ("max", "min"):
        index = 0 if len(args) > 1 and isinstance(args[1], fx.Node) else None  # elementwise, not a reduction
    elif node.op in ("call_function", "call_method") and node.target in (operator.mul, torch.mul, "mul"):
        # h * (h > 0): the input masked by a comparison of itself
        index = next((i for i in (0, 1) if len(args) == 2 and isinstance(args[1 - i], fx.Node)
                      and args[1 - i].target in _COMPARISONS and args[1 - i].args[:1] == (args[i],)), None)
    elif node.op == "call_function":
        index = _BY_HAND.get(node.target)
    elif node.op == "call_method":
        index = _BY_HAND_METHODS.get(node.target)
    else:
        return None
    value = args[index] if index is not None and len(args) > index else None
    return _layer_behind(gm, value)


def _layer_behind(gm: fx.GraphModule, value, through_an_add: bool = True) -> str | None:
    """The conv or linear (module, or F.linear/F.conv*) making `value`, or one side of an add."""
    if not isinstance(value, fx.Node):
        return None
    if value.op == "call_module" and isinstance(gm.get_submodule(value.target), CONV_LINEAR_MODULES):
        return value.target
    if value.op == "call_function" and value.target in _LAYER_FUNCTIONS:
        return value.name
    if through_an_add and value.target in (operator.add, torch.add, "add"):
        return next((layer for a in value.args[:2] if (layer := _layer_behind(gm, a, through_an_add=False))), None)
    return None


def _clamps_at_zero(node: fx.Node) -> bool:
    """`x.clamp(min=0)`, `torch.clamp(x, 0)`, `x.clamp_min(0)`, `x.clamp(0, 6)`: a ReLU (or ReLU6)
    written as a clamp, which the report should name rather than pass over in silence."""
    clamps = node.op == "call_method" and node.target in ("clamp", "clamp_", "clamp_min", "clamp_min_")
    clamps |= node.op == "call_function" and node.target in (torch.clamp, torch.clamp_min, torch.clip)
    if not clamps:
        return False
    low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    return isinstance(low, (int, float)) and not isinstance(low, bool) and low == 0
