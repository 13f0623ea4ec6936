"""Train a classifier on in-memory images: SGD with momentum, checkpoints that resume exactly.

    data = TensorData.from_dataset(resolve_dataset(None), device)
    run = train(model, data, TrainConfig(steps=2000, lr=0.01), out_dir=Path("run"))

MNIST-sized data lives on the device as whole tensors and a batch is an index into them, so a
step does no Python data loading. Everything a step depends on is either saved in the
checkpoint (weights, BN statistics, momentum buffers, the RNG that dropout draws from) or a pure
function of the step number (the batch, `EpochSampler`; the learning rate, `TrainConfig.lr_at`).
So a run stopped at any checkpoint and resumed performs the same operations on the same values
and ends with bit-identical weights (tests/test_train.py kills one and checks with torch.equal).
That holds on the CPU; on a GPU, only as far as its kernels are deterministic
(`torch.use_deterministic_algorithms`), since some backward kernels accumulate with atomics.

`out_dir` holds `checkpoint.pt` and `metrics.jsonl`, each rewritten atomically: one JSON object
per evaluation (step, learning rate, train/test loss and accuracy, steps per second and, with
`track_inputs`, the 15/50/85th percentiles of chosen nonlinearities' inputs, Figure 1(b, c)).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bngraph.atomic import check_writable, write_atomically
from bngraph.distributed import SINGLE, Distributed, broadcast_buffers, from_main, gather_to_main, sum_over_ranks, wrap
from bngraph.errors import UserError
from bngraph.sync_bn import has_sync_bn
from bngraph.trace import one_line
from bngraph.track import InputTracker, nonlinearity_names  # noqa: F401 (part of this API)

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"
CHECKPOINT_FORMAT = "bngraph-checkpoint-1"


def pick_device(name: str = "auto") -> torch.device:
    """'auto': CUDA when present, else the CPU; 'cuda' without a GPU is the user's to fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"bad --device {name!r}: {one_line(err)}") from None


@dataclass(frozen=True)
class TrainConfig:
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

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): exponential decay, GoogLeNet's schedule
        made smooth, so that a 6x faster decay (Sec. 4.2.1) is `decay_every / 6`."""
        if self.decay_every is None:
            return self.lr
        return self.lr * self.lr_decay ** (step / self.decay_every)

    # What may change between a run and its resumption: more steps, more checkpoints.
    RESUMABLE_CHANGES = ("steps", "checkpoint_every")


class EpochSampler:
    """Batch `step` of a run that reshuffles the training set every epoch (Sec. 4.2.1: "shuffle
    training examples more thoroughly"). A pure function of (seed, step): resuming needs no
    sampler state, and two nets given the same seed see the same batches.

    With `world_size` processes, step s is the global batch of `batch_size * world_size` that
    one process would take, and `rank` gets its rank-th slice: the ranks' batches are disjoint,
    each example comes once per epoch, and their union is the one-process batch."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        if batch_size * world_size > n:
            times = f" x {world_size} processes" if world_size > 1 else ""
            raise UserError(f"--batch-size {batch_size}{times} is larger than the {n} training examples")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // (batch_size * world_size)  # the last partial batch is dropped
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> torch.Tensor:
        # The CPU generator keeps 32 bits of a seed: mix seed and epoch into those 32.
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{epoch}".encode()))
        return torch.randperm(self.n, generator=gen).to(self.device)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.order(epoch)
        lo = (i * self.world_size + self.rank) * self.batch_size
        return self._order[lo : lo + self.batch_size]


@dataclass
class TensorData:
    """A whole image-classification dataset as tensors on one device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str = "data"
    source: str = "tensors"

    @classmethod
    def from_dataset(cls, dataset, device: torch.device | str = "cpu") -> TensorData:
        return cls(*dataset.as_float(device), name=dataset.name, source=dataset.source)

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def check_model_fits(model: nn.Module, data: TensorData) -> None:
    """Run two training images through `model`: a wrong input or output shape is the user's."""
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(data.x_train[:2])
    except Exception as err:
        shape = "x".join(map(str, data.x_train.shape[1:]))
        raise UserError(f"the model cannot take {data.name} images ({shape}): {one_line(err)}") from err
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < data.num_classes:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(
            f"the model's output is {got}; training on {data.name} needs logits of shape (N, {data.num_classes})"
        )


# --- the loop --------------------------------------------------------------------------------


@dataclass
class TrainRun:
    model: nn.Module  # trained, on the CPU, in eval mode
    metrics: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    resumed_from: int | None = None
    device: str = "cpu"

    @property
    def best_test_accuracy(self) -> float:
        return max((row["test_accuracy"] for row in self.metrics), default=float("nan"))


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int = 1000, amp=contextlib.nullcontext
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` in eval mode."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    try:
        for lo in range(0, len(x), batch):
            with amp():
                logits = model(x[lo : lo + batch]).float()
            loss += F.cross_entropy(logits, y[lo : lo + batch], reduction="sum").double()
            correct += (logits.argmax(1) == y[lo : lo + batch]).sum()
    finally:
        model.train(was_training)
    return loss.item() / len(x), correct.item() / len(x)


@contextlib.contextmanager
def _stop_requests(enabled: bool = True) -> Iterator[Callable[[], bool]]:
    """SIGINT/SIGTERM ask the loop to stop after the current step, so that the checkpoint it
    writes then is of a whole step (an exception in the middle of `optimizer.step` is not).
    Not under torchrun: a signal reaches the ranks at different steps, and a checkpoint needs
    them all; a stopped job resumes from its last scheduled checkpoint."""
    requested = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def ask(signum, frame):
        if requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        requested.append(signum)

    for s in previous:
        signal.signal(s, ask)
    try:
        yield lambda: bool(requested)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _config_changes(saved: dict, config: TrainConfig) -> list[str]:
    now = asdict(config)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return [
        f"{k}: {saved.get(k)!r} then, {now[k]!r} now"
        for k in now
        if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != now[k]
    ]


def _new_interval(dev: torch.device) -> dict:
    return {"loss": torch.zeros((), device=dev, dtype=torch.float64),
            "correct": torch.zeros((), device=dev, dtype=torch.int64), "steps": 0}  # fmt: skip


def _interval_means(interval: dict, batch_size: int, world_size: int = 1) -> tuple[float, float]:
    """(mean loss, accuracy) of the training batches since the last evaluation; with
    `world_size`, of sums over that many ranks."""
    steps = max(interval["steps"], 1) * world_size
    return interval["loss"].item() / steps, interval["correct"].item() / (steps * batch_size)


def _evaluate_shared(model: nn.Module, data: TensorData, ctx: Distributed, amp) -> tuple[float, float]:
    """`evaluate` on the test set, each rank taking every world_size-th example; sums combined."""
    x, y = data.x_test[ctx.rank :: ctx.world_size], data.y_test[ctx.rank :: ctx.world_size]
    loss, accuracy = evaluate(model, x, y, amp=amp)
    if not ctx.is_distributed:
        return loss, accuracy
    sums = torch.tensor([loss * len(x), accuracy * len(x)], dtype=torch.float64, device=x.device)
    loss_sum, correct = sum_over_ranks([sums], ctx)[0].tolist()
    return loss_sum / len(data.x_test), round(correct) / len(data.x_test)


def write_metrics(path: Path, rows: Sequence[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomically(path, lambda tmp: tmp.write_text(text))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _progress(enabled: bool, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  test {task.fields[test]}"),
        TextColumn("{task.fields[rate]} steps/s"),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        disable=not enabled,
        transient=False,
    )


def train(
    model: nn.Module,
    data: TensorData,
    config: TrainConfig,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    label: str = "train",
    on_eval: Callable[[dict], None] | None = None,
    distributed: Distributed = SINGLE,
) -> TrainRun:
    """Train `model` in place on `data` (on its device) and return it on the CPU, in eval mode.

    With `out_dir`, checkpoints and metrics go there, and `resume=True` continues from its
    checkpoint. `on_eval(row)` sees each metrics row as it is written (and may raise to stop).
    Under torchrun (`distributed` from `bngraph.distributed.join`), every rank calls this with
    the same arguments; rank 0 alone reads and writes `out_dir` (see bngraph.distributed).
    """
    dev = pick_device(device)
    on_gpu = dev.type == "cuda"
    ctx = distributed
    checkpoint_path = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        checkpoint_path = out_dir / CHECKPOINT
    if ctx.is_main:  # rank 0 alone reads and writes the run folder
        if out_dir is not None:
            check_writable(out_dir)
        if resume and (checkpoint_path is None or not checkpoint_path.is_file()):
            missing = checkpoint_path or "no run folder"
            raise UserError(f"nothing to resume: {missing} does not exist (start without --resume)")
        if not resume and checkpoint_path is not None and checkpoint_path.exists():
            raise UserError(f"{out_dir} holds a run already: add --resume to continue it, or choose another -o")
        if out_dir is not None:
            out_dir.mkdir(exist_ok=True)
    writes = out_dir is not None and ctx.is_main

    channels_last = on_gpu and data.x_train.dim() == 4
    model.to(dev, memory_format=torch.channels_last) if channels_last else model.to(dev)
    model.train()
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
    # SGD's weight decay is L2 regularization, as the paper's "L2 weight regularization".
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    sampler = EpochSampler(len(data.x_train), config.batch_size, config.seed, dev, ctx.rank, ctx.world_size)
    tracker = InputTracker(model, config.track_inputs, config.track_unit) if config.track_inputs is not None else None
    checkpoint_every = config.checkpoint_every or config.eval_every

    start, metrics, resumed_from, elapsed_before = 0, [], None, 0.0
    interval = _new_interval(dev)  # sums since the last evaluation, kept on the device
    if resume:

        def load() -> dict:
            # Under torchrun rank 0 reads the file and sends it: other hosts need no copy of it.
            try:
                return torch.load(checkpoint_path, map_location="cpu" if ctx.is_distributed else dev, weights_only=True)
            except Exception as err:
                raise UserError(f"cannot read {checkpoint_path}: {one_line(err)}") from None

        state = from_main(load, ctx)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{checkpoint_path} is not a bngraph training checkpoint")
        ran_as = state.get("world_size", 1)
        if ran_as != ctx.world_size:
            raise UserError(f"the run in {out_dir} ran as {ran_as} process(es), not {ctx.world_size}: "
                            "resume it with as many (they decide the batches)")  # fmt: skip
        if state.get("sync_bn", False) != has_sync_bn(model):
            was = "was" if state.get("sync_bn") else "was not"
            raise UserError(f"the run in {out_dir} {was} trained with --sync-bn; resume it the same way")
        changes = _config_changes(state["config"], config)
        if changes:
            raise UserError(f"--resume with other settings than the run in {out_dir}: {'; '.join(changes)}")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise UserError(f"--resume: the checkpoint in {out_dir} is of another model: {one_line(err)}") from None
        optimizer.load_state_dict(state["optimizer"])
        own = state["ranks"][ctx.rank] if ctx.is_distributed else state  # this rank's RNG and sums
        torch.set_rng_state(own["rng"]["cpu"].cpu())
        if on_gpu and "cuda" in own["rng"]:
            torch.cuda.set_rng_state(own["rng"]["cuda"].cpu())
        start = resumed_from = int(state["step"])
        metrics, elapsed_before = list(state["metrics"]), float(state["elapsed_s"])
        interval = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in own["interval"].items()}
        if start >= config.steps:
            raise UserError(f"the run in {out_dir} has done {start} steps already; ask for more with --steps")
    else:
        # Dropout draws from the global generator; other ranks' masks must differ from rank 0's.
        torch.manual_seed(config.seed if ctx.is_main else zlib.crc32(f"{config.seed}:rank{ctx.rank}".encode()))

    def checkpoint(step: int, elapsed: float) -> None:
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if on_gpu else {})}
        # What differs between ranks goes in too (a collective: every rank gets here together).
        ranks = gather_to_main({"rng": rng, "interval": {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                                         for k, v in interval.items()}}, ctx)  # fmt: skip
        if not ctx.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config": asdict(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "interval": interval,
            "metrics": metrics,
            "elapsed_s": elapsed,
            "world_size": ctx.world_size,
            "sync_bn": has_sync_bn(model),
            **({"ranks": ranks} if ctx.is_distributed else {}),
        }
        write_atomically(checkpoint_path, lambda tmp: torch.save(state, tmp))

    started = time.perf_counter()
    window_start, window_steps = started, 0
    net = wrap(model, ctx, dev)  # DDP under torchrun: a step's gradients are the global batch's
    with _stop_requests(not ctx.is_distributed) as stop_requested, _progress(progress and ctx.is_main, label) as bar:
        task = bar.add_task("train", total=config.steps, completed=start, loss="-", acc="-", test="-", rate="-")
        for step in range(start, config.steps):
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = sampler(step)
            x, y = data.x_train[index], data.y_train[index]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp():
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            interval["loss"] += loss.detach().double()
            interval["correct"] += (logits.detach().argmax(1) == y).sum()
            interval["steps"] += 1
            done, window_steps = step + 1, window_steps + 1

            is_eval = done % config.eval_every == 0 or done == config.steps
            if is_eval or done % 25 == 0:
                now = time.perf_counter()
                rate = window_steps / max(now - window_start, 1e-9)
                train_loss, train_accuracy = _interval_means(interval, config.batch_size)
                bar.update(task, completed=done, loss=f"{train_loss:.3f}", acc=f"{train_accuracy:.3f}",
                           rate=f"{rate:.0f}")  # fmt: skip
            if is_eval:
                broadcast_buffers(model, ctx)  # the running statistics rank 0 saves are the ones tested
                # Under torchrun each rank tests (and tracks) its share; rank 0's quantiles are written.
                with tracker.recording() if tracker else contextlib.nullcontext():
                    test_loss, test_accuracy = _evaluate_shared(model, data, ctx, amp)
                loss_sum, correct = sum_over_ranks([interval["loss"], interval["correct"]], ctx)
                totals = {**interval, "loss": loss_sum, "correct": correct}
                train_loss, train_accuracy = _interval_means(totals, config.batch_size, ctx.world_size)
                row = {
                    "step": done,
                    "epoch": round(done / sampler.steps_per_epoch, 4),
                    "lr": lr,
                    "train_loss": train_loss,
                    "train_accuracy": train_accuracy,
                    "test_loss": test_loss,
                    "test_accuracy": test_accuracy,
                    "steps_per_s": round(rate, 2),
                    "elapsed_s": round(elapsed_before + time.perf_counter() - started, 3),
                }
                if tracker:
                    row["inputs"] = tracker.quantiles()
                metrics.append(row)
                interval = _new_interval(dev)
                bar.update(task, test=f"{test_accuracy:.4f}")
                window_start, window_steps = time.perf_counter(), 0
                if writes:
                    write_metrics(out_dir / METRICS, metrics)
                if on_eval is not None:
                    on_eval(row)
            stopping = stop_requested()
            if out_dir is not None and (done % checkpoint_every == 0 or done == config.steps or stopping):
                checkpoint(done, elapsed_before + time.perf_counter() - started)
            if stopping:
                where = f"; resume with --resume (checkpoint in {out_dir})" if out_dir is not None else ""
                print(f"bngraph: stopped after step {done}{where}", file=sys.stderr)
                raise KeyboardInterrupt
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return TrainRun(model, metrics, elapsed_before + time.perf_counter() - started, resumed_from, str(dev))


def epochs_to_steps(epochs: float, n: int, batch_size: int) -> int:
    if epochs <= 0:
        raise UserError(f"--epochs must be positive, not {epochs}")
    return max(1, math.ceil(epochs * (n // max(batch_size, 1))))


__all__ = [
    "EpochSampler",
    "InputTracker",
    "TensorData",
    "TrainConfig",
    "TrainRun",
    "check_model_fits",
    "evaluate",
    "nonlinearity_names",
    "pick_device",
    "read_metrics",
    "train",
]
