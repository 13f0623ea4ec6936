"""What a traced node computes, as the passes need to know it: tables, not code.

A node is an activation, a normalization, a shape-only op or a layer with a known feature axis
in one of three forms: a module call (`nn.ReLU()`), a function call (`F.relu`, `torch.relu`) or a
method call (`x.relu()`). Everything here reads the graph and changes nothing.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

# Elementwise nonlinearities. Softmax and log-softmax mix features, so they are not here.
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Threshold,
)  # fmt: skip
ACTIVATION_FUNCTIONS: dict[object, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
    F.leaky_relu: "leaky_relu", F.prelu: "prelu", torch.prelu: "prelu", F.rrelu: "rrelu",
    F.elu: "elu", F.selu: "selu", torch.selu: "selu", F.celu: "celu", torch.celu: "celu",
    F.gelu: "gelu", F.silu: "silu", F.mish: "mish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", F.hardtanh: "hardtanh", F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid", F.softplus: "softplus", F.softsign: "softsign",
    F.logsigmoid: "logsigmoid", F.tanhshrink: "tanhshrink", F.softshrink: "softshrink",
    F.hardshrink: "hardshrink", F.threshold: "threshold",
}  # fmt: skip
ACTIVATION_METHODS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "tanh_": "tanh",
}  # fmt: skip

NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
)  # _NormBase covers BatchNorm*, SyncBatchNorm, InstanceNorm* and their lazy forms
NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm}

# Ops that move or drop values without mixing features: a normalized input stays normalized.
SHAPE_ONLY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                      nn.Identity, nn.Flatten, nn.Unflatten)  # fmt: skip
SHAPE_ONLY_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.flatten, torch.reshape,
    torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.clone,
}  # fmt: skip
SHAPE_ONLY_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "view_as", "reshape_as", "clone", "t",
}  # fmt: skip

# Layers whose output features sit in the last axis (Linear on (N, T, C)) or in axis 1 (conv).
LAST_AXIS_MODULES = (nn.Linear, nn.Bilinear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)
LAST_AXIS_FUNCTIONS = {F.linear, torch.matmul, operator.matmul, torch.bmm, F.layer_norm, F.embedding}
CHANNEL_AXIS_MODULES = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)  # fmt: skip
CHANNEL_AXIS_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.batch_norm, F.group_norm, F.instance_norm, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool2d, torch.cat,
}  # fmt: skip

CONV_LINEAR_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


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


def features_last(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node`'s features sit in the last axis: the nearest layer behind it, through
    ops that keep the layout (elementwise math, activations, dropout), is a Linear-like one."""
    seen = 0
    while node is not None and seen < 64:  # bounded: a chain of elementwise ops, not the graph
        if _is(gm, node, LAST_AXIS_MODULES, LAST_AXIS_FUNCTIONS):
            return True
        if _is(gm, node, CHANNEL_AXIS_MODULES, CHANNEL_AXIS_FUNCTIONS) or node.op == "placeholder":
            return False
        if node.op == "call_method" and node.target in {"view", "reshape", "flatten", "permute", "transpose", "t"}:
            return False  # the user re-laid the tensor out: fall back to PyTorch's (N, C, ...) rule
        node, seen = first_node_arg(node), seen + 1
    return False
