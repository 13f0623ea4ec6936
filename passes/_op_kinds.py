"""What a traced node computes, as the passes need to know it: tables, not code.

A node is an activation, a normalization, a shape-only op or a layer with a known feature axis
in one of three forms: a module call (`nn.ReLU()`), a function call (`F.relu`, `torch.relu`) or a
method call (`x.relu()`). Everything here reads the graph and changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

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
    F.hardshrink: "hardshrink", F.threshold: "threshold",
}
ACTIVATION_METHODS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "tanh_": "tanh",
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
    torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.clone,
}
SHAPE_ONLY_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "view_as", "reshape_as", "clone", "t",
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
