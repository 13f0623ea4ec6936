"""Models with BatchNorm for the export, verify and ONNX fold tests; the CLI loads them as
tests/onnx_models.py:NAME. Each builder seeds its weights, so two loads are the same model, and
randomizes the BN statistics: a fresh BN is almost the identity, so a broken fold would pass.
"""

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tests.util import randomize_bn


class ConvBnNet(nn.Module):
    """A BN after a bias-free conv, after a grouped conv, after a pool and before a ReLU (no layer
    to fold into) and after a linear: a classifier with 10 outputs."""

    example_input_shape = (2, 3, 12, 12)

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.pool, self.bn3 = nn.MaxPool2d(2), nn.BatchNorm2d(8)
        self.fc1, self.bn4 = nn.Linear(8 * 5 * 5, 16), nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.pool(x))).flatten(1)
        return self.fc2(torch.relu(self.bn4(self.fc1(x))))


class MlpBn(nn.Module):
    """The paper's MNIST net in small: 28x28 images, one BN'd sigmoid layer, 10 classes."""

    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(784, 32), nn.BatchNorm1d(32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.bn(self.fc1(x.flatten(1)))))


class ConvOutputShared(nn.Module):
    """A conv output that feeds the BN and an Add: folding into the conv would change the Add's input."""

    def __init__(self, cin: int = 3, cout: int = 4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def seeded(build, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build(), seed)


def conv_bn_net() -> nn.Module:
    return seeded(ConvBnNet)


def conv_bn_net_batch1() -> nn.Module:
    """The same net declaring a batch-1 example, which torch.export would specialize."""
    model = seeded(ConvBnNet)
    model.example_input_shape = (1, 3, 12, 12)
    return model


def conv_bn_net_perturbed() -> nn.Module:
    """The same net with one running mean moved: what a wrong fold looks like."""
    model = seeded(ConvBnNet)
    with torch.no_grad():
        model.bn4.running_mean[3] += 0.5
    return model


def mlp_bn_net() -> nn.Module:
    return seeded(MlpBn)


# ---- ONNX files written the way other and older exporters write them (onnx.helper) ------------
# Each has one Conv (or Gemm) and a BatchNormalization with random statistics.

BN_STATS = ("bn_scale", "bn_bias", "bn_mean", "bn_var")


def random_bn_stats(shape, seed: int, dtype=np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scale, bias, mean = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    return [scale, bias, mean, (rng.random(shape) + 0.5).astype(dtype)]  # variance away from zero


def onnx_file(nodes, inputs, outputs, arrays: dict, *, opset: int, ir_version: int, initializers_as_inputs=False):
    """A model from helper nodes; IR version 3 files list every initializer as an input too."""
    initializers = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    if initializers_as_inputs:
        inputs = inputs + [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in initializers]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)  # valid input: a crash would be ours
    return model


def conv_bn_file(
    *,
    opset: int = 13,
    ir_version: int = 7,
    spatial: int | None = None,
    initializers_as_inputs: bool = False,
    dtype=np.float32,
    stats_dtype=None,
    batch_dim="N",
    pool: bool = False,
    scalar_input: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x (batch, 3, 8, 8) -> [x * gain, a scalar input] -> Conv 3x3 -> [MaxPool 2] -> BN.

    `spatial=0` (opsets 7, 8) gives the BN statistics per channel and position, (4, H, W)."""
    rng = np.random.default_rng(seed)
    channels, size = 4, 3 if pool else 6
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    stats_shape = (channels, size, size) if spatial == 0 else (channels,)
    arrays = {
        "W": (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(dtype),
        "B": rng.standard_normal(channels).astype(dtype),
    }
    arrays.update(zip(BN_STATS, random_bn_stats(stats_shape, seed + 1, stats_dtype or dtype)))
    inputs = [helper.make_tensor_value_info("x", elem, [batch_dim, 3, 8, 8])]
    nodes, x = [], "x"
    if scalar_input:
        inputs.append(helper.make_tensor_value_info("gain", elem, []))
        nodes.append(helper.make_node("Mul", ["x", "gain"], ["scaled"]))
        x = "scaled"
    nodes.append(helper.make_node("Conv", [x, "W", "B"], ["conv"], kernel_shape=[3, 3]))
    if pool:
        nodes.append(helper.make_node("MaxPool", ["conv"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]))
    attrs = {} if spatial is None else {"spatial": spatial}
    nodes.append(helper.make_node("BatchNormalization", [nodes[-1].output[0], *BN_STATS], ["y"], epsilon=1e-3, **attrs))
    outputs = [helper.make_tensor_value_info("y", elem, [batch_dim, channels, size, size])]
    return onnx_file(
        nodes, inputs, outputs, arrays, opset=opset, ir_version=ir_version, initializers_as_inputs=initializers_as_inputs
    )


def gemm_bn_file(*, opset: int = 8, ir_version: int = 3, spatial: int = 0, seed: int = 0) -> onnx.ModelProto:
    """x (N, 6) -> Gemm -> BN on (N, 5): with spatial=0 the statistics are per feature all the same."""
    rng = np.random.default_rng(seed)
    arrays = {"W": rng.standard_normal((5, 6)).astype(np.float32), "B": rng.standard_normal(5).astype(np.float32)}
    arrays.update(zip(BN_STATS, random_bn_stats((5,), seed + 1)))
    nodes = [
        helper.make_node("Gemm", ["x", "W", "B"], ["fc"], transB=1),
        helper.make_node("BatchNormalization", ["fc", *BN_STATS], ["y"], spatial=spatial),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])]
    return onnx_file(nodes, inputs, outputs, arrays, opset=opset, ir_version=ir_version, initializers_as_inputs=ir_version < 4)
