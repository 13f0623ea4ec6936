"""What a traced node computes, as the passes need to know it: tables, not code.

A node is an activation, a normalization, a shape-only op or a layer with a known feature axis
in one of three forms: a module call (`nn.ReLU()`), a function call (`F.relu`, `torch.relu`) or a
method call (`x.relu()`). Everything here reads the graph and changes nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from bngraph.passes._fx_effects import mutates_first_argument

# Elementwise nonlinearities. Softmax and log-softmax mix features, so they are not here.
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Threshold,
)
ACTIVATION_FUNCTIONS: dict[object, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
    F.leaky_relu: "leaky_relu", F.prelu: "prelu", torch.prelu: "prelu", F.rrelu: "rrelu",
    F.elu: "elu", F.selu: "selu", torch.selu: "selu", F.celu: "celu", torch.celu: "celu",
    F.gelu: "gelu", F.silu: "silu", F.mish: "mish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", F.hardtanh: "hardtanh", F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid", F.softplus: "softplus", F.softsign: "softsign",
    F.logsigmoid: "logsigmoid", F.tanhshrink: "tanhshrink", F.softshrink: "softshrink",
    F.hardshrink: "hardshrink", F.threshold: "threshold", torch.special.expit: "sigmoid",
    # The erf GELU written out (BERT's original `x * 0.5 * (1 + erf(x / sqrt(2)))`, HuggingFace's
    # gelu_python): erf is the nonlinearity of that composite, as tanh is of the tanh GELU.
    torch.erf: "erf", torch.special.erf: "erf",
    # In-place forms: the insert pass gives them what it gives F.relu_ (a BN where the value they
    # overwrite is read nowhere else, a reason where it is).
    F.leaky_relu_: "leaky_relu", F.rrelu_: "rrelu", torch.rrelu_: "rrelu", F.elu_: "elu", F.selu_: "selu",
    torch.selu_: "selu", F.celu_: "celu", torch.celu_: "celu", F.hardtanh_: "hardtanh", F.threshold_: "threshold",
    torch.sigmoid_: "sigmoid", torch.tanh_: "tanh",
}
ACTIVATION_METHODS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "tanh_": "tanh", "erf": "erf",
}

NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
)  # _NormBase covers BatchNorm*, SyncBatchNorm, InstanceNorm* and their lazy forms
NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm}

# Ops that move or drop values without mixing features: a normalized input stays normalized.
SHAPE_ONLY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                      nn.Identity, nn.Flatten, nn.Unflatten)
SHAPE_ONLY_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.flatten, torch.reshape,
    torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.clone, torch.unflatten,
}
SHAPE_ONLY_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "view_as", "reshape_as", "clone", "t", "unflatten",
}

CONV_LINEAR_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def _is(gm: fx.GraphModule, node: fx.Node, modules, functions, methods=()) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu', 'sigmoid', ... when `node` applies an elementwise nonlinearity, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module).__name__ if isinstance(module, ACTIVATION_MODULES) else None
    if node.op == "call_function":
        return ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(node.target)
    return None


# Elementwise arithmetic and math, besides the activations: what composite activations are made
# of (x * sigmoid(x), the tanh form of GELU, x * tanh(softplus(x))). In-place forms are not here.
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.exp, torch.log, torch.erf,
    torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.log1p, torch.expm1,
    *ACTIVATION_FUNCTIONS,
}
ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "erf", "abs", "sqrt", "rsqrt", "square", "clamp",
    "log1p", "expm1", *ACTIVATION_METHODS,
}


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` computes each output value from the same place of its inputs alone, without
    writing into one."""
    if node.op == "call_module":
        elementwise = isinstance(gm.get_submodule(node.target), ACTIVATION_MODULES)
    elif node.op == "call_function":
        elementwise = node.target in ELEMENTWISE_FUNCTIONS
    else:
        elementwise = node.op == "call_method" and node.target in ELEMENTWISE_METHODS
    return elementwise and not mutates_first_argument(node)


def elementwise_region(gm: fx.GraphModule, act: fx.Node, inside: Callable[[fx.Node], bool] | None = None):
    """(x, region, results) where `act` is part of an elementwise function of one tensor x: the
    region is every node computed elementwise from x alone (among the nodes `inside` accepts,
    when given), its results the region's nodes read outside it. None where `act` reads more
    than one tensor the model computed (get_attr tensors, such as a learned beta, are constants)."""
    sources: dict[fx.Node, frozenset] = {}

    def source(node: fx.Node) -> frozenset:
        if node not in sources:
            if node.op == "get_attr":
                sources[node] = frozenset()
            elif not is_elementwise(gm, node):
                sources[node] = frozenset([node])
            else:
                inputs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
                sources[node] = frozenset().union(*(source(a) for a in inputs))
        return sources[node]

    if not is_elementwise(gm, act):
        return None
    (x, *rest) = source(act) or (None,)
    if x is None or rest:
        return None
    region, todo = set(), [x]
    while todo:
        for user in todo.pop().users:
            if user not in region and (inside is None or inside(user)) and is_elementwise(gm, user) and source(user) == {x}:
                region.add(user)
                todo.append(user)
    if act not in region:
        return None
    return x, region, [n for n in region if not n.users or any(u not in region for u in n.users)]


def _made_in(node: fx.Node, module: str) -> bool:
    """Whether `node` comes from a call of submodule `module` (torch.fx's nn_module_stack)."""
    return any(path == module for path, _ in (node.meta.get("nn_module_stack") or {}).values())


def _calls_around(act: fx.Node) -> list[Callable[[fx.Node], bool]]:
    """Tests of whether a node comes from the same call as `act`, innermost call first: each
    call of a plain function of the user's (`function_calls`, recorded by insert's tracer), then
    the innermost module's."""
    tests = [lambda n, call=call: call in n.meta.get("function_calls", ())
             for call in reversed(act.meta.get("function_calls", ()))]
    stack = act.meta.get("nn_module_stack") or {}
    if stack:
        module = next(reversed(stack.values()))[0]
        tests.append(lambda n: _made_in(n, module))
    return tests


def composite_activation(gm: fx.GraphModule, act: fx.Node) -> tuple[fx.Node, list[fx.Node], fx.Node] | None:
    """For an activation inside an activation written out of elementwise pieces, as a module or
    a plain function (a user's Swish `x * torch.sigmoid(x)`, HuggingFace's NewGELUActivation, a
    learned-beta swish, latent diffusion's `nonlinearity(x)`): (x, the call's nodes that read x,
    its result). The paper's BN goes on x, in front of the whole nonlinearity, not in front of
    the part of it that happens to be an activation.

    Only a whole call counts as one nonlinearity, from its input to its output: in a forward
    (the model's, or a block's around its own layers), `F.relu(y) + y` is an activation and a
    skip connection, and `tanh(relu(y))` two activations. None where `act` is a nonlinearity on
    its own."""
    for inside in _calls_around(act):
        found = elementwise_region(gm, act, inside)
        if found is None or len(found[2]) != 1 or found[1] == {act}:
            continue
        x, region, (result,) = found
        if inside(x) or any(inside(user) for user in result.users):
            continue  # the call computes more than this function: a block, not an activation
        return x, [u for u in x.users if u in region], result
    return None


def normalized_through_arithmetic(gm: fx.GraphModule, act: fx.Node) -> fx.Node | None:
    """The norm behind x where `act` is part of an elementwise function of x that does more than
    activations (arithmetic: x * sigmoid(x), 0.5 * x * (1 + tanh(...)), an affine 3 * x + 1): the
    nonlinearity reads a normalized tensor. What a composite's inner activations find once its
    module is flattened into a graph (insert run again on insert's artifact). Activations in a
    row, tanh(relu(x)), are separate nonlinearities, scaled or not (2 * sigmoid(relu(x))): None
    where all the region is activations, or where `act` reads x through another activation and
    no arithmetic combines two values of x (as Mish's x * tanh(softplus(x)) does)."""
    found = elementwise_region(gm, act)
    if found is None or all(activation_kind(gm, n) for n in found[1]):
        return None
    x, region, _ = found
    before, todo = set(), [act]
    while todo:  # the region's nodes `act` reads from
        for arg in todo.pop().all_input_nodes:
            if arg in region and arg not in before:
                before.add(arg)
                todo.append(arg)
    combines = any(sum(a is x or a in region for a in n.all_input_nodes) >= 2 for n in region)
    if not combines and any(activation_kind(gm, n) for n in before):
        return None
    return normalizer_behind(gm, x)


def op_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """How a user would name what `node` calls: 'Conv2d', 'F.batch_norm', '.relu()'."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _is(gm, node, NORM_MODULES, NORM_FUNCTIONS)


def is_shape_only(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _is(gm, node, SHAPE_ONLY_MODULES, SHAPE_ONLY_FUNCTIONS, SHAPE_ONLY_METHODS)


def first_node_arg(node: fx.Node) -> fx.Node | None:
    return next((a for a in node.args if isinstance(a, fx.Node)), None)


def normalizer_behind(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The norm that `node`'s value comes from, looking through shape-only ops, or None."""
    while node is not None:
        if is_norm(gm, node):
            return node
        if not is_shape_only(gm, node):
            return None
        node = first_node_arg(node)
    return None
