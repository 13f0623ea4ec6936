"""Make new BatchNorms compute the identity in eval mode, with statistics from real inputs.

For function-preserving insertion into a pretrained model (`bngraph insert --preserve`). In eval
mode BN(x) = gamma * (x - running_mean) / sqrt(running_var + eps) + beta, which is x for any
statistics once gamma = sqrt(running_var + eps) and beta = running_mean. So:
  1. set gamma and beta that way for the default statistics: the model computes what it did;
  2. run the calibration batches and measure each BN's input per feature (mean, unbiased var,
     as Algorithm 2 estimates the population statistics), accumulated in float64;
  3. store those statistics and set gamma and beta again from them.
The model is then the original function in eval mode, and in train mode each BN starts out
undoing its own normalization, so training continues from the pretrained function.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import torch
from torch import fx, nn

from bngraph.passes.base import PassResult, Skip, graph_pass
from bngraph.runners import fresh_inputs


def _set_identity(bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        bn.weight.copy_(torch.sqrt(bn.running_var.double() + bn.eps))
        bn.bias.copy_(bn.running_mean)


class CalibrateBnAsIdentity:
    """Calibrate the BatchNorms at module paths `bn_paths` on `batches` (each a tuple of inputs)."""

    name = "calibrate_bn_as_identity"
    in_place = True

    def __init__(self, bn_paths: Collection[str], batches: Iterable[Sequence[torch.Tensor]]):
        self.bn_paths = list(bn_paths)
        self.batches = batches

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(gm)
        bns = {}
        for path in self.bn_paths:
            bn = gm.get_submodule(path)
            if not bn.affine or bn.running_var is None:
                result.skipped.append(Skip(path, "has no affine parameters or no running statistics to set"))
                continue
            bns[path] = bn
            _set_identity(bn)  # 1.
        sums: dict[str, list] = {}

        def measure(path):
            def hook(module, inputs):
                x = inputs[0].detach()
                others = [d for d in range(x.dim()) if d != 1]  # every axis but the features'
                s = sums.setdefault(path, [0, 0.0, 0.0])
                s[0] += x.numel() // x.shape[1]
                # In float64, without a transposed copy of the activations (a large share of
                # --preserve's time on 224x224 images).
                s[1] = s[1] + x.sum(others, dtype=torch.float64)
                s[2] = s[2] + x.double().square_().sum(others)

            return hook

        handles = [bn.register_forward_pre_hook(measure(p)) for p, bn in bns.items()]
        was_training = gm.training
        try:
            gm.eval()
            with torch.no_grad():
                for batch in self.batches:  # 2.
                    gm(*fresh_inputs(batch))  # a forward may write into its input
        finally:
            gm.train(was_training)
            for h in handles:
                h.remove()
        for path, bn in bns.items():
            if path not in sums or sums[path][0] < 2:
                result.skipped.append(Skip(path, "saw fewer than 2 values in the calibration batches"))
                continue
            count, total, total_sq = sums[path]
            mean = total / count
            var = (total_sq - count * mean * mean).clamp_min(0) / (count - 1)
            with torch.no_grad():  # 3.
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.fill_(1)
            _set_identity(bn)
            result.changed.append(path)
            result.details.append({"bn": path, "samples": int(count)})
        return result


@graph_pass(in_place=True)
def calibrate_bn_as_identity(
    gm: fx.GraphModule, bn_paths: Collection[str], batches: Iterable[Sequence[torch.Tensor]]
) -> PassResult:
    """Calibrate the BatchNorms at `bn_paths` on `batches` so that, in eval mode, each computes
    what the model computed without it (see `CalibrateBnAsIdentity`)."""
    return CalibrateBnAsIdentity(bn_paths, batches)(gm)
