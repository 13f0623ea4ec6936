"""What decides a training run's result (`TrainConfig`), and the device and length it runs at."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bngraph.errors import UserError, one_line

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> autocast dtype


def pick_device(name: str = "auto") -> torch.device:
    """'auto': CUDA when present, else the CPU; 'cuda' without a GPU is the user's to fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU (use --device cpu or auto)")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"bad --device {name!r}: {one_line(err)}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type not in ("cpu", "cuda"):  # mps, xla, meta: its data and checkpoints failed in torch's tracebacks
        raise UserError(f"--device {name}: bngraph trains on cpu or cuda only (use --device cpu, cuda or auto)")
    return device


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result: steps, batch, SGD and its schedule, evaluation and
    checkpoints (`--resume` refuses other values than the run had). `decay_every=None` keeps the
    learning rate constant; `bngraph train` passes `steps / 8` unless --decay-every says otherwise,
    so the same run from Python needs `decay_every=steps / 8` to match it."""

    steps: int
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay: float = 0.96  # the learning rate is multiplied by this ...
    decay_every: float | None = None  # ... every this many steps, smoothly (None: constant)
    seed: int = 0
    eval_every: int = 500
    checkpoint_every: int | None = None  # None: at every evaluation
    track_inputs: tuple[str, ...] | None = None  # nonlinearity module names; () = the last one
    track_unit: int = 0  # which feature (channel) of each tracked input
    precision: str | None = None  # fp32, bf16 or fp16 autocast; None: bf16 on CUDA, fp32 elsewhere
    channels_last: bool | None = None  # None: on CUDA for 4-d images
    compile: bool = False  # torch.compile the model for the training steps
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact resume on CUDA)

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be at least 1, not {self.checkpoint_every}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UserError(f"--lr must be a positive number, not {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise UserError("--momentum must be in [0, 1) and --weight-decay at least 0")
        if not 0 < self.lr_decay <= 1 or (self.decay_every is not None and self.decay_every <= 0):
            raise UserError("--lr-decay must be in (0, 1] and --decay-every positive")
        if self.precision not in (None, *PRECISIONS):
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): exponential decay, GoogLeNet's schedule
        made smooth, so that a 6x faster decay (Sec. 4.2.1) is `decay_every / 6`."""
        if self.decay_every is None:
            return self.lr
        return self.lr * self.lr_decay ** (step / self.decay_every)

    # What may change between a run and its resumption: more steps, more checkpoints.
    RESUMABLE_CHANGES = ("steps", "checkpoint_every")


def epochs_to_steps(epochs: float, n: int, batch_size: int) -> int:
    if epochs <= 0:
        raise UserError(f"--epochs must be positive, not {epochs}")
    return max(1, math.ceil(epochs * (n // max(batch_size, 1))))
