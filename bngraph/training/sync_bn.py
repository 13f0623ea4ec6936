"""SyncBatchNorm for CPU tensors: the statistics torch 2.13 computes only on GPUs.

torch's nn.SyncBatchNorm cannot train on the CPU: its forward raises ValueError for a CPU tensor
once a process group exists, its kernels (aten::batch_norm_stats and the rest) are CUDA-only,
and DistributedDataParallel refuses a CPU module holding one. `bngraph train --sync-bn` on the
CPU therefore swaps the SyncBatchNorms that the convert_bn_to_sync_bn pass made for
`SyncBatchNormCPU`, which computes the same numbers with two all-reduces:

    n    = sum over ranks of the examples x positions per channel
    mean = (sum over ranks of sum(x)) / n
    var  = (sum over ranks of sum((x - mean)^2)) / n         centred: E[x^2] - E[x]^2 cancels in fp32
    y    = (x - mean) / sqrt(var + eps) * weight + bias
    running_mean, running_var <- lerp towards mean, var * n / (n - 1), by the momentum

The all-reduce is differentiable (`_AllReduceSum`), so autograd gives each rank the gradient of
the global batch's loss, as torch's SyncBatchNorm backward does. Parameter and buffer names are
those of BatchNorm, so checkpoints load into the plain model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x. Every rank's loss depends on every rank's x through y, so the
    gradient of x is the sum over ranks of dL_r/dy: an all-reduce again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """nn.SyncBatchNorm's training statistics for CPU tensors (see the module docstring). In eval
    mode, or without a process group of two or more, it is plain BatchNorm."""

    process_group = None  # the whole job, as for nn.SyncBatchNorm

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
        if not (self.training and group is not None and dist.get_world_size(group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        given_dtype = input.dtype
        # Statistics in float32 whatever autocast hands it (bf16 sums lose digits, and the running
        # statistics are float32), the output in the dtype given, as BatchNorm's under autocast.
        input = input.float()
        per_channel = [1, -1] + [1] * (input.dim() - 2)
        dims = [0, *range(2, input.dim())]
        count = input.new_full((1,), input.numel() // input.shape[1])  # ranks' batches may differ
        sums = _AllReduceSum.apply(torch.cat([input.sum(dims), count]), group)
        n = sums[-1]
        mean = sums[:-1] / n
        centred = input - mean.view(per_channel)
        var = _AllReduceSum.apply(centred.square().sum(dims), group) / n
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
            with torch.no_grad():
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / (n - 1), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(per_channel)
        if self.weight is not None:
            out = out * self.weight.view(per_channel)
        if self.bias is not None:
            out = out + self.bias.view(per_channel)
        return out.to(given_dtype)


def has_sync_bn(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.SyncBatchNorm, SyncBatchNormCPU)) for m in model.modules())


def use_cpu_sync_bn(model: nn.Module) -> nn.Module:
    """Swap each nn.SyncBatchNorm of `model` for a `SyncBatchNormCPU` holding the same parameters
    and buffers (in place, as torch's converter works); returns `model`."""
    swapped: dict[int, SyncBatchNormCPU] = {}  # one per BatchNorm, at each name it is reached by
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if type(module) is not nn.SyncBatchNorm:
            continue
        if (cpu := swapped.get(id(module))) is None:
            cpu = swapped[id(module)] = SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                                                         module.track_running_stats, bias=module.bias is not None)
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                setattr(cpu, name, tensor)
            cpu.train(module.training)
        if not path:
            return cpu  # `model` is itself the BatchNorm
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, cpu)
    return model


__all__ = ["SyncBatchNormCPU", "has_sync_bn", "use_cpu_sync_bn"]
