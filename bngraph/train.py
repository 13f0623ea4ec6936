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

from bngraph.atomic import check_writable, save_tensors, start_run_folder, write_atomically
from bngraph.distributed import SINGLE, Distributed, broadcast_buffers, from_main, gather_to_main, sum_over_ranks, wrap
from bngraph.errors import CheckFailed, UserError, model_raised, one_line
from bngraph.sync_bn import has_sync_bn
from bngraph.track import InputTracker, nonlinearity_names  # noqa: F401 (part of this API)

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"
CHECKPOINT_FORMAT = "bngraph-checkpoint-1"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> autocast dtype


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
    """Everything that decides a run's result: steps, batch, SGD and its schedule, evaluation and
    checkpoints (`--resume` refuses other values than the run had)."""

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
    format: str = "tensors"  # how it was read (bngraph.data_formats), for the run's metadata
    label_file: str = ""  # where the training labels come from, for errors

    @classmethod
    def from_dataset(cls, dataset, device: torch.device | str = "cpu") -> TensorData:
        return cls(*dataset.as_float(device), name=dataset.name, source=dataset.source, format="mnist-idx",
                   label_file=dataset.source)  # fmt: skip

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def example(self, n: int = 2) -> torch.Tensor:
        return self.x_train[:n]


@dataclass
class StreamData:
    """Data too large for the device: torch Datasets of (image, label), read by a DataLoader with
    worker processes (pinned memory on CUDA), in the batches `EpochSampler` picks."""

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    name: str = "data"
    source: str = "datasets"
    format: str = "stream"
    num_classes: int | None = None  # None: unknown until the model says (a factory's Datasets)
    example_shape: tuple[int, ...] | None = None
    label_file: str = ""
    workers: int | None = None  # None: one per core, less one, at most 8
    device: torch.device | str = "cpu"

    @property
    def n_train(self) -> int:
        return len(self.train)

    def example(self, n: int = 2) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.train[i][0], dtype=torch.float32) for i in range(n)])

    def loader(self, dataset, *, batch_sampler=None, batch_size: int = 1, pin: bool = False, persistent: bool = False):
        from bngraph.data_formats import default_workers

        workers = default_workers() if self.workers is None else self.workers
        batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
        return torch.utils.data.DataLoader(dataset, num_workers=workers, pin_memory=pin,
                                           persistent_workers=persistent and workers > 0, **batching)  # fmt: skip


class _StepBatches:
    """The index batches of steps [start, stop), for a DataLoader's batch_sampler."""

    def __init__(self, sampler: EpochSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.sampler(step).tolist()


def _user_error_from_worker(err: UserError) -> UserError:
    """A UserError raised in a DataLoader worker comes back wrapped in its traceback: keep its line."""
    last = str(err).strip().splitlines()[-1]
    return UserError(last.split("UserError: ", 1)[-1])


def _batches(data, sampler: EpochSampler, start: int, stop: int, dev: torch.device):
    """(x, y) of each step from `start`: an index into device tensors, or a DataLoader's batch."""
    if isinstance(data, TensorData):
        for step in range(start, stop):
            index = sampler(step)
            yield data.x_train[index], data.y_train[index]
        return
    loader = data.loader(data.train, batch_sampler=_StepBatches(sampler, start, stop), pin=dev.type == "cuda")
    batches = iter(loader)
    while True:
        try:
            x, y = next(batches)
        except StopIteration:
            return
        except UserError as err:
            raise _user_error_from_worker(err) from None
        yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)


def load_data(path, model: nn.Module | None = None, *, input_shape=None, device: str | torch.device = "cpu", **options):
    """`bngraph.data_formats.open_data` with the input shape a model declares (`example_input_shape`)."""
    from bngraph.data_formats import open_data

    if input_shape is None and model is not None:
        input_shape = getattr(model, "example_input_shape", None)
    return open_data(path, input_shape=input_shape, device=device, **options)


def check_model_fits(model: nn.Module, data: TensorData | StreamData) -> None:
    """Run two training images through `model`: a wrong input or output shape is the user's, and
    so is a label the model has no output for."""
    was_training = model.training
    example = data.example(2)
    device = next(iter(model.parameters()), example).device
    try:
        with torch.no_grad():
            logits = model.eval()(example.to(device))
    except Exception as err:
        shape = "x".join(map(str, example.shape[1:]))
        raise model_raised(err, failed=f"the model cannot take {data.name} images ({shape}) from {data.source}") from err
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"the model's output is {got}; training on {data.name} needs logits of shape (N, classes)")
    outputs = logits.shape[1]
    if data.num_classes is None:  # a factory's streamed labels: checked as they come
        data.train.num_classes = data.test.num_classes = outputs
    elif outputs < data.num_classes:
        raise UserError(
            f"{data.label_file or data.source}: label {data.num_classes - 1} is out of range for the model's "
            f"{outputs} outputs; training on {data.name} needs logits of shape (N, {data.num_classes})"
        )


# --- the loop --------------------------------------------------------------------------------


@dataclass
class TrainRun:
    """What `train` returns: the trained model, one metrics row per evaluation, the time taken."""

    model: nn.Module  # trained, on the CPU, in eval mode
    metrics: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    resumed_from: int | None = None
    device: str = "cpu"
    precision: str = "fp32"  # as resolved for the device
    channels_last: bool = False

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
    # A setting added since the checkpoint was written had its default then.
    then = {k: saved.get(k, TrainConfig.__dataclass_fields__[k].default) for k in now}
    return [
        f"{k}: {then[k]!r} then, {now[k]!r} now"
        for k in now
        if k not in TrainConfig.RESUMABLE_CHANGES and then[k] != now[k]
    ]


def _new_interval(dev: torch.device) -> dict:
    return {"loss": torch.zeros((), device=dev, dtype=torch.float64),
            "correct": torch.zeros((), device=dev, dtype=torch.int64), "steps": 0}  # fmt: skip


def _interval_means(interval: dict, batch_size: int, world_size: int = 1) -> tuple[float, float]:
    """(mean loss, accuracy) of the training batches since the last evaluation; with
    `world_size`, of sums over that many ranks."""
    steps = max(interval["steps"], 1) * world_size
    return interval["loss"].item() / steps, interval["correct"].item() / (steps * batch_size)


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
            with amp():
                logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
    except UserError as err:
        raise _user_error_from_worker(err) from None
    finally:
        model.train(was_training)
    return loss.item() / max(n, 1), correct.item() / max(n, 1), n


def _evaluate_shared(model: nn.Module, data, ctx: Distributed, amp, test_loader=None) -> tuple[float, float]:
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


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms for the run: on CUDA, what makes a resume exact."""
    if not enabled:
        yield
        return
    import os

    # cuBLAS reads this when it starts; without it deterministic mode refuses CUDA matmuls.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def write_metrics(path: Path, rows: Sequence[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomically(path, lambda tmp: tmp.write_text(text), replace_own=True)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per evaluation."""
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
    data: TensorData | StreamData | str | Path,
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

    `data` may be a path (any format of `bngraph.data_formats`, read for the model's declared
    `example_input_shape`). `config.precision` and `config.channels_last` default to bf16 autocast
    and channels_last on CUDA, fp32 and the default layout elsewhere; fp16 uses a GradScaler.
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
            start_run_folder(out_dir, resume=resume)  # new, empty or a run's: never a user's folder
    writes = out_dir is not None and ctx.is_main

    if isinstance(data, (str, Path)):
        data = load_data(data, model, device=dev)
    precision = config.precision or ("bf16" if on_gpu else "fp32")
    channels_last = (on_gpu if config.channels_last is None else config.channels_last) and data.example(1).dim() == 4
    model.to(dev, memory_format=torch.channels_last) if channels_last else model.to(dev)
    model.train()
    amp_dtype = PRECISIONS[precision]
    amp = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    # fp16's range is narrow: a loss scale keeps small gradients from flushing to zero.
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    # SGD's weight decay is L2 regularization, as the paper's "L2 weight regularization".
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    streamed = isinstance(data, StreamData)
    sampler = EpochSampler(data.n_train, config.batch_size, config.seed, "cpu" if streamed else dev, ctx.rank,
                           ctx.world_size)  # fmt: skip
    test_loader = None
    if streamed:
        shard = torch.utils.data.Subset(data.test, range(ctx.rank, len(data.test), ctx.world_size))
        test_loader = data.loader(shard, batch_size=max(config.batch_size, 256), pin=on_gpu, persistent=True)
    tracker = None
    if config.track_inputs is not None:  # two examples find the nonlinearities called as functions
        example = [data.example(2).to(dev)]
        tracker = InputTracker(model, config.track_inputs, config.track_unit, example_inputs=example)
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
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
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
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            **({"ranks": ranks} if ctx.is_distributed else {}),
        }
        write_atomically(checkpoint_path, lambda tmp: save_tensors(state, tmp), replace_own=True)

    started = time.perf_counter()
    window_start, window_steps = started, 0
    net = wrap(model, ctx, dev)  # DDP under torchrun: a step's gradients are the global batch's
    if config.compile:
        net = torch.compile(net)  # the training steps; evaluation runs the model as it is
    batches = _batches(data, sampler, start, config.steps, dev)
    checked_at = last_eval = start  # the loss is looked at where it reaches the CPU anyway
    saved_at = start if resume and out_dir is not None else None
    with _stop_requests(not ctx.is_distributed) as stop_requested, _progress(progress and ctx.is_main, label) as bar, \
            _deterministic(config.deterministic):  # fmt: skip
        task = bar.add_task("train", total=config.steps, completed=start, loss="-", acc="-", test="-", rate="-")
        for step in range(start, config.steps):
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = next(batches)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp():
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
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
                if not ctx.is_distributed:  # under torchrun all ranks stop together, below
                    _stop_if_diverged(train_loss, checked_at, done, config.lr, out_dir, saved_at)
                checked_at = done
                bar.update(task, completed=done, loss=f"{train_loss:.3f}", acc=f"{train_accuracy:.3f}",
                           rate=f"{rate:.0f}")  # fmt: skip
            if is_eval:
                broadcast_buffers(model, ctx)  # the running statistics rank 0 saves are the ones tested
                # Under torchrun each rank tests (and tracks) its share; rank 0's quantiles are written.
                with tracker.recording() if tracker else contextlib.nullcontext():
                    test_loss, test_accuracy = _evaluate_shared(model, data, ctx, amp, test_loader)
                loss_sum, correct = sum_over_ranks([interval["loss"], interval["correct"]], ctx)
                totals = {**interval, "loss": loss_sum, "correct": correct}
                train_loss, train_accuracy = _interval_means(totals, config.batch_size, ctx.world_size)
                _stop_if_diverged(train_loss, last_eval, done, config.lr, out_dir, saved_at)  # the same sum on every rank
                last_eval = done
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
                saved_at = done
            if stopping:
                where = f"; resume with --resume (checkpoint in {out_dir})" if out_dir is not None else ""
                raise KeyboardInterrupt(f"stopped after step {done}{where}")  # the CLI's one line
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return TrainRun(model, metrics, elapsed_before + time.perf_counter() - started, resumed_from, str(dev),
                    precision, channels_last)  # fmt: skip


def _stop_if_diverged(mean_loss: float, since: int, step: int, lr: float, out_dir, saved_at: int | None) -> None:
    """A loss that is not finite never comes back: stop before it reaches a checkpoint."""
    if math.isfinite(mean_loss):
        return
    steps = f"step {step}" if step - since == 1 else f"steps {since + 1}-{step}"
    if out_dir is None:
        kept = ""
    elif saved_at is None:
        kept = "; nothing of this run is kept"
    else:
        kept = f"; {out_dir} keeps the checkpoint of step {saved_at}, from before"
    raise CheckFailed(
        f"training diverged: the training loss is {mean_loss} (mean over {steps}) at --lr {lr:g}; lower --lr{kept}"
    )


def epochs_to_steps(epochs: float, n: int, batch_size: int) -> int:
    if epochs <= 0:
        raise UserError(f"--epochs must be positive, not {epochs}")
    return max(1, math.ceil(epochs * (n // max(batch_size, 1))))


__all__ = [
    "EpochSampler",
    "InputTracker",
    "StreamData",
    "TensorData",
    "TrainConfig",
    "TrainRun",
    "check_model_fits",
    "evaluate",
    "load_data",
    "nonlinearity_names",
    "pick_device",
    "read_metrics",
    "train",
]
