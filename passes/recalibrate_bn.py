"""Replace each BatchNorm's moving averages by the population statistics of Algorithm 2, step 2.

Over training mini-batches B_1..B_n, each BN input x (per feature; for convolutions pooled over
the batch and every position, m = N*H*W values, Sec. 3.2) gives mu_B and the biased var_B, and

    E[x]   = mean_i mu_B_i
    Var[x] = m/(m-1) * mean_i var_B_i        (the unbiased estimate)

which become `running_mean` and `running_var`. (With batches of unequal size each var_B_i gets
its own m_i/(m_i-1), which is the same thing when all m_i are equal.) The inputs are those of
the training network, as in the paper: every BN normalizes with its batch statistics, while the
rest of the model is frozen in eval mode (no dropout). It takes any nn.Module, traced or not;
on images of another domain it re-targets the model to that domain (Sec. 5).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bngraph.errors import UserError
from bngraph.passes.base import PassResult, Skip, graph_pass
from bngraph.runners import fresh_inputs, training_copy

_BN = nn.modules.batchnorm._BatchNorm


class _Moments:
    """Running sums of mu_B and unbiased var_B of one BN's input, per feature, in float64."""

    def __init__(self):
        self.batches, self.mean_sum, self.var_sum = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        m = x.numel() // x.shape[1]
        if m < 2:
            raise UserError(f"a calibration batch gives {m} value per feature; Var[x] needs at least 2")
        x = x.detach().double()
        var_b, mu_b = torch.var_mean(x, dim=dims, correction=0)
        unbiased = var_b * (m / (m - 1))
        self.mean_sum = mu_b if self.mean_sum is None else self.mean_sum + mu_b
        self.var_sum = unbiased if self.var_sum is None else self.var_sum + unbiased
        self.batches += 1


class _NormalizedInputs(TorchFunctionMode):
    """Each BN's statistics from what F.batch_norm normalizes with its running statistics, not
    from the module's input: a subclass whose forward transposes (N, L, C) to (N, C, L) first,
    as transformer code writes it, had its positions' statistics stored as its channels'."""

    def __init__(self, moments: dict[int, _Moments]):
        super().__init__()
        self.moments = moments  # by the id of the BN's running_mean
        # Running statistics no nn.BatchNorm holds, by id: whether a call normalized with the
        # batch's statistics (training=True), which moves them.
        self.foreign: dict[int, bool] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm or func is torch.batch_norm:  # torch.batch_norm: (input, weight, bias, mean, var, ...)
            at = 1 if func is F.batch_norm else 3
            running_mean = args[at] if len(args) > at else kwargs.get("running_mean")
            if (moments := self.moments.get(id(running_mean))) is not None:
                moments.add(args[0] if args else kwargs["input"])
            elif running_mean is not None:
                training = bool(args[5] if len(args) > 5 else kwargs.get("training", False))
                self.foreign[id(running_mean)] = self.foreign.get(id(running_mean), False) or training
        return func(*args, **kwargs)


def _trained_in_training(model: nn.Module, batch: Sequence[torch.Tensor], names: Sequence[str]) -> list[str]:
    """Which of the buffers `names` (running means no nn.BatchNorm holds) a training forward of
    `model` normalizes with batch statistics: a hand-written BN, whose statistics training
    moves; the others are frozen (detectron2's FrozenBatchNorm2d calls with training=False). On
    a copy in train mode: the calls in eval mode say nothing (`training=self.training`)."""
    recorded = _NormalizedInputs({})
    with training_copy(model) as probe, recorded:
        probe(*fresh_inputs(batch))
    buffers = dict(probe.named_buffers())
    return [name for name in names if name not in buffers or recorded.foreign.get(id(buffers[name]), True)]


def hand_written_batchnorms(model: nn.Module, batch: Sequence[torch.Tensor]) -> list[str]:
    """The running means, by name, that a training forward of `model` (on a copy) normalizes
    with F.batch_norm on batch statistics though no nn.BatchNorm holds them: BatchNorms written
    by hand, which the passes that act on BatchNorm modules do not reach (`--sync-bn`)."""
    recorded = _NormalizedInputs({})
    with training_copy(model) as probe, recorded:
        probe(*fresh_inputs(batch))
    modules = {id(m.running_mean) for m in probe.modules() if isinstance(m, _BN) and m.running_mean is not None}
    names = {id(b): name for name, b in probe.named_buffers()}
    return [names.get(i, "a tensor the model does not register") for i, training in recorded.foreign.items()
            if training and i not in modules]


class RecalibrateBN:
    """Set every BN's running statistics to Algorithm 2's population statistics over `batches`
    (each a tuple of model inputs). The model's train/eval flags are restored."""

    name = "recalibrate_bn"
    in_place = True

    def __init__(self, batches: Iterable[Sequence[torch.Tensor]]):
        self.batches = batches

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> PassResult:
        result = PassResult(model)
        bns = {name: m for name, m in model.named_modules() if isinstance(m, _BN)}
        moments = {}
        for name, bn in bns.items():
            if bn.running_mean is None:
                result.skipped.append(Skip(name, "keeps no running statistics: it always uses batch statistics"))
            else:
                moments[name] = _Moments()
        if not moments:
            return result
        flags = {m: m.training for m in model.modules()}
        # The forward passes below also move the moving averages: keep the originals to compare.
        before = {n: (bns[n].running_mean.clone(), bns[n].running_var.clone(), bns[n].num_batches_tracked.clone())
                  for n in moments}
        try:
            model.eval()
            for name in moments:
                bns[name].train()  # batch statistics, as the training network computes them
            first = None
            with _NormalizedInputs({id(bns[n].running_mean): m for n, m in moments.items()}) as normalized:
                for batch in self.batches:
                    first = batch if first is None else first
                    model(*fresh_inputs(batch))  # a forward may write into its input
        finally:
            for module, training in flags.items():
                module.training = training  # this module only: train() would recurse
        held = {id(b): name for name, b in model.named_buffers()}
        foreign = [held.get(i, "a tensor the model does not register") for i in normalized.foreign]
        if foreign and first is not None:
            trained = _trained_in_training(model, first, foreign)
            for name in foreign:
                if name not in trained:  # its statistics are fixed: what it gives is what training saw
                    result.skipped.append(Skip(name.rpartition(".")[0] or name,
                                               "a frozen BatchNorm (F.batch_norm with training=False): kept as it is"))
            foreign = trained
        if foreign:
            # A hand-written BN (F.batch_norm on its own buffers) normalized with its old
            # statistics, and every BN after it was measured on what that gave: wrong, not skipped.
            for name, (mean, var, count) in before.items():
                bns[name].running_mean.copy_(mean)
                bns[name].running_var.copy_(var)
                bns[name].num_batches_tracked.copy_(count)
            raise UserError(f"the model calls F.batch_norm on running statistics no nn.BatchNorm holds ({foreign[0]}): "
                            "recalibrate recomputes those of nn.BatchNorm modules only, and the BNs after it would "
                            "be measured on what its old statistics give; make it an nn.BatchNorm")
        for name, m in moments.items():
            bn = bns[name]
            old_mean, old_var, count = before[name]
            bn.num_batches_tracked.copy_(count)
            if m.batches == 0:
                bn.running_mean.copy_(old_mean)
                bn.running_var.copy_(old_var)
                result.skipped.append(Skip(name, "never ran on the calibration batches (or normalized without "
                                                 "F.batch_norm on its running statistics)"))
                continue
            mean, var = m.mean_sum / m.batches, m.var_sum / m.batches
            result.details.append(
                {
                    "bn": name,
                    "features": mean.numel(),
                    "batches": m.batches,
                    "max_mean_change": (mean - old_mean.double()).abs().max().item(),
                    "max_var_ratio": (var / old_var.double().clamp_min(1e-12)).max().item(),
                }
            )
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            result.changed.append(name)
        return result


@graph_pass(in_place=True)
def recalibrate_bn(model: nn.Module, batches: Iterable[Sequence[torch.Tensor]]) -> PassResult:
    """Set every BN's running statistics to Algorithm 2's population statistics over `batches`
    (see `RecalibrateBN`)."""
    return RecalibrateBN(batches)(model)
