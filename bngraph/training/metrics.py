"""What a run measures: test loss and accuracy, the training sums between evaluations, and
`metrics.jsonl`, one JSON object per evaluation."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bngraph.atomic import write_atomically
from bngraph.errors import UserError, running_user_model
from bngraph.training.data import StreamData, TensorData, logits_of, user_error_from_worker
from bngraph.training.distributed import Distributed, sum_over_ranks

METRICS = "metrics.jsonl"
# A model may fail on test batches only: another batch size (the last one), or eval mode's branch.
_ON_TEST_BATCH = "the model failed on a test batch (in eval mode)"


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int = 1000, amp=contextlib.nullcontext,
    probabilities: bool = False,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` in eval mode; with `probabilities`, of outputs
    that are a softmax's already (recalibrate takes such models): -log p of each label."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    try:
        for lo in range(0, len(x), batch):
            # a copy: a forward that writes into its input (x.sub_(mean)) would shift the test set
            with amp(), running_user_model(failed=_ON_TEST_BATCH):
                logits = logits_of(model(x[lo : lo + batch].clone())).float()
            if probabilities:
                log_p = logits.double().clamp_min(torch.finfo(torch.float64).tiny).log()
                loss += F.nll_loss(log_p, y[lo : lo + batch], reduction="sum")
            else:
                loss += F.cross_entropy(logits, y[lo : lo + batch], reduction="sum").double()
            correct += (logits.argmax(1) == y[lo : lo + batch]).sum()
    finally:
        model.train(was_training)
    n = max(len(x), 1)  # a rank's share of a test set smaller than the job is empty
    return loss.item() / n, correct.item() / n


@torch.no_grad()
def _evaluate_loader(model: nn.Module, loader, dev: torch.device, amp) -> tuple[float, float, int]:
    """(mean cross-entropy, accuracy, examples) of `model` in eval mode over a DataLoader."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=dev, dtype=torch.float64)
    correct = torch.zeros((), device=dev, dtype=torch.int64)
    n = 0
    try:
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with amp(), running_user_model(failed=_ON_TEST_BATCH):
                logits = logits_of(model(x)).float()
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
    except UserError as err:
        raise user_error_from_worker(err) from None
    finally:
        model.train(was_training)
    return loss.item() / max(n, 1), correct.item() / max(n, 1), n


def evaluate_shared(model: nn.Module, data: TensorData | StreamData, ctx: Distributed, amp,
                    test_loader=None) -> tuple[float, float]:
    """`evaluate` on the test set, each rank taking every world_size-th example; sums combined."""
    if test_loader is not None:
        dev = next(iter(model.parameters())).device
        loss, accuracy, n = _evaluate_loader(model, test_loader, dev, amp)
        total = len(data.test)
    else:
        x, y = data.x_test[ctx.rank :: ctx.world_size], data.y_test[ctx.rank :: ctx.world_size]
        loss, accuracy = evaluate(model, x, y, amp=amp)
        n, dev, total = len(x), x.device, len(data.x_test)
    if not ctx.is_distributed:
        return loss, accuracy
    sums = torch.tensor([loss * n, accuracy * n], dtype=torch.float64, device=dev)
    loss_sum, correct = sum_over_ranks([sums], ctx)[0].tolist()
    return loss_sum / total, round(correct) / total


def new_interval(dev: torch.device) -> dict:
    """The training sums since the last evaluation, kept on the device (a checkpoint holds them)."""
    return {"loss": torch.zeros((), device=dev, dtype=torch.float64),
            "correct": torch.zeros((), device=dev, dtype=torch.int64), "steps": 0}


def interval_means(interval: dict, batch_size: int, world_size: int = 1) -> tuple[float, float]:
    """(mean loss, accuracy) of the training batches since the last evaluation; with
    `world_size`, of sums over that many ranks."""
    steps = max(interval["steps"], 1) * world_size
    return interval["loss"].item() / steps, interval["correct"].item() / (steps * batch_size)


def write_metrics(path: Path, rows: Sequence[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), replace_own=True)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per evaluation."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
