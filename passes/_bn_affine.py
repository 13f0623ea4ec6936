"""BatchNorm in eval mode as a fixed affine map, and its merge into a neighbouring layer.

Tensors in, tensors out: the FX fold passes adapt graph nodes to these functions. All of it is
computed in float64 and cast back to each weight's own dtype. Paper, Algorithm 2 step 3:

    BN(z) = s * z + t    per channel,   s = gamma / sqrt(Var + eps),   t = beta - s * E[z]

1. Into the layer before it, z = W x + b:  W' = diag(s) W,  b' = s * b + t  (per output channel).
   torch.nn.utils.fusion computes exactly this (`fuse_conv_bn_weights`, `fuse_linear_bn_weights`).
2. Into the layer after it, y = W BN(x) + b:  W' = W diag(s),  b' = b + sum over inputs and
   kernel taps of W t  (per input channel). torch has no function for this direction. It is
   exact only if every output sums whole kernels of BN'd values: zero padding would let the
   folded layer see 0 where the original saw BN(0) = t at the border.
3. On its own: s and t are torch's fold of the BN into a 1x1 identity layer (y = 1 * x + 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

# Rounding error of the BN's input is magnified by (|E[z]| + std z) / sqrt(Var + eps): the folded
# weights and bias are that much larger than the values they compute, and cancel. Beyond this
# factor a fold costs three of float32's seven digits, and the report says so.
PRECISION_LOSS_GAIN = 1e3


@dataclass(frozen=True)
class BatchNormStats:
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None  # gamma; None when affine=False
    bias: torch.Tensor | None  # beta
    eps: float

    def named(self) -> dict[str, torch.Tensor | None]:
        return {"running_mean": self.running_mean, "running_var": self.running_var, "weight": self.weight, "bias": self.bias}

    def per_position(self, positions: int) -> BatchNormStats:
        """These statistics for each of a channel's `positions` values in turn: the BN of a
        (N, C, *spatial) tensor seen after flattening it to (N, C * positions)."""
        def spread(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(positions)

        return BatchNormStats(spread(self.running_mean), spread(self.running_var), spread(self.weight),
                              spread(self.bias), self.eps)

    @cached_property
    def as_float64(self) -> dict:
        """The keyword arguments of torch's fuse_*_bn_weights, in float64, gamma/beta filled in."""
        mean = self.running_mean.detach().double()
        ones, zeros = torch.ones_like(mean), torch.zeros_like(mean)
        return {
            "bn_rm": mean,
            "bn_rv": self.running_var.detach().double(),
            "bn_eps": self.eps,
            "bn_w": ones if self.weight is None else self.weight.detach().double(),
            "bn_b": zeros if self.bias is None else self.bias.detach().double(),
        }


def regroup(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(A, B/groups, *k) -> (B, A/groups, *k): swap which channel axis is the full one.

    A conv weight is (out, in/groups, *k) and a transposed conv's is (in, out/groups, *k);
    this turns one layout into the other, group by group (it is its own inverse).
    """
    a, b_per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, a // groups, b_per_group, *kernel).transpose(1, 2)
    return grouped.reshape(groups * b_per_group, a // groups, *kernel)


def scale_shift(stats: BatchNormStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Case 3: s and t in float64, each of shape (C,)."""
    channels = stats.running_mean.shape[0]
    identity = torch.ones(channels, 1, dtype=torch.float64, device=stats.running_mean.device)
    scale, shift = fuse_linear_bn_weights(identity, None, **stats.as_float64)
    return scale.detach().reshape(channels), shift.detach()


def fold_into_producer(
    kind: str, weight: torch.Tensor, bias: torch.Tensor | None, groups: int, stats: BatchNormStats
) -> tuple[torch.Tensor, torch.Tensor]:
    """Case 1 for a `kind` in {"conv", "conv_transpose", "linear"}: the new (weight, bias)."""
    w64 = weight.detach().double()
    b64 = None if bias is None else bias.detach().double()
    with torch.no_grad():
        if kind == "linear":
            w, b = fuse_linear_bn_weights(w64, b64, **stats.as_float64)
        elif kind == "conv":
            w, b = fuse_conv_bn_weights(w64, b64, **stats.as_float64)
        else:
            # torch's `transpose=True` scales weight axis 1, which holds out/groups channels: right
            # for groups=1 only (a shape error otherwise). Put the output channels first instead.
            w, b = fuse_conv_bn_weights(regroup(w64, groups), b64, **stats.as_float64)
            w = regroup(w, groups)
    return _cast(w, weight), _cast(b, weight if bias is None else bias)


def fold_into_consumer(
    weight: torch.Tensor, bias: torch.Tensor | None, groups: int, stats: BatchNormStats
) -> tuple[torch.Tensor, torch.Tensor]:
    """Case 2 for a conv (out, in/groups, *k) or a linear (out, in) weight: the new (weight, bias)."""
    scale, shift = scale_shift(stats)
    out_channels, in_per_group, *kernel = weight.shape
    ones = [1] * len(kernel)
    # Input channel c is column c % (in/groups) of the weights of group c // (in/groups).
    w64 = weight.detach().double().reshape(groups, out_channels // groups, in_per_group, *kernel)
    folded = w64 * scale.reshape(groups, 1, in_per_group, *ones)
    # b' = b + W t: the layer's response to the constant map t, summed over every kernel tap.
    per_tap_sum = w64.flatten(3).sum(3) if kernel else w64
    added = (per_tap_sum @ shift.reshape(groups, in_per_group, 1)).reshape(out_channels)
    b64 = added if bias is None else bias.detach().double() + added
    return _cast(folded.reshape(weight.shape), weight), _cast(b64, weight if bias is None else bias)


def rounding_gain(stats: BatchNormStats) -> float:
    """How much the fold magnifies rounding, worst channel: (|E[z]| + std z) / sqrt(Var + eps)."""
    params = stats.as_float64
    spread = params["bn_rm"].abs() + params["bn_rv"].clamp(min=0).sqrt()
    return float((spread / (params["bn_rv"] + params["bn_eps"]).sqrt()).max()) if spread.numel() else 0.0


def _cast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` in `like`'s dtype, device and memory format: a channels_last model's conv
    weights stay channels_last (contiguous, each call of the folded layer would convert them)."""
    value = value.detach().to(dtype=like.dtype, device=like.device)
    if value.shape == like.shape and value.dim() in (4, 5) and not like.is_contiguous():
        layout = torch.channels_last if value.dim() == 4 else torch.channels_last_3d
        if like.is_contiguous(memory_format=layout):
            return value.contiguous(memory_format=layout)
    return value.contiguous()
