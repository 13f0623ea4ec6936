"""The paper's MNIST network (Sec. 4.1): 784-100-100-100-10, sigmoid, no BatchNorm.

BN comes from the insert pass, not from a second definition of the network.
"""

from collections import OrderedDict

import torch
from torch import nn

from bngraph.zoo.registry import register_model


class MnistMLP(nn.Sequential):
    def __init__(self, hidden=(100, 100, 100), act_layer=nn.Sigmoid, num_classes=10, init_std=None):
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        width = 28 * 28
        for i, features in enumerate(hidden, start=1):
            layers += [(f"fc{i}", nn.Linear(width, features)), (f"act{i}", act_layer())]
            width = features
        layers.append(("head", nn.Linear(width, num_classes)))
        super().__init__(OrderedDict(layers))
        if init_std is not None:
            # The paper: "weights initialized to small random Gaussian values".
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.Linear):
                        m.weight.normal_(0.0, init_std)
                        m.bias.zero_()


@register_model("mnist-mlp", input_shape=(2, 1, 28, 28))
def mnist_mlp(**kwargs) -> nn.Module:
    """The paper's MNIST MLP: 3 hidden layers of 100 sigmoid units, no BN (Sec. 4.1)."""
    return MnistMLP(**kwargs)
