"""Train a classifier on in-memory images: SGD with momentum, checkpoints that resume exactly.

    data = TensorData.from_dataset(resolve_dataset(None), device)
    run = train(model, data, TrainConfig(steps=2000, lr=0.01), out_dir=Path("run"))

Everything a step depends on is either saved in the checkpoint (`bngraph.training.checkpoint`) or
a pure function of the step number (the batch, `EpochSampler`; the learning rate,
`TrainConfig.lr_at`). So a run stopped at any checkpoint and resumed performs the same operations
on the same values and ends with bit-identical weights (tests/test_train.py kills one and checks
with torch.equal). That holds on the CPU; on a GPU, only as far as its kernels are deterministic
(`torch.use_deterministic_algorithms`), since some backward kernels accumulate with atomics.

`out_dir` holds `checkpoint.pt` and `metrics.jsonl`, each rewritten atomically: one JSON object
per evaluation (step, learning rate, train/test loss and accuracy, steps per second and, with
`track_inputs`, the 15/50/85th percentiles of chosen nonlinearities' inputs, Figure 1(b, c)).

`train` reads as its steps: open the run folder, set up (precision, optimizer, batches), resume or
seed, then the loop, whose step and evaluation are functions of their own. The module stays one
(over 300 lines) so that the loop and everything it calls read in one place.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from bngraph.atomic import absolute_output, held_run_folder
from bngraph.errors import CheckFailed, ModelRaised, UserError, model_raised, one_line, user_frame
from bngraph.library_call import library_call
from bngraph.training.checkpoint import (
    CHECKPOINT, open_run_folder, remove_unstarted_run, resume_from_checkpoint, save_checkpoint,
)
from bngraph.training.config import PRECISIONS, TrainConfig, pick_device
from bngraph.training.data import (
    EpochSampler, StreamData, TensorData, check_finite, check_model_fits, data_fingerprint, logits_of,
    refuse_what_is_not_logits, step_batches, streamed_test_loader,
)
from bngraph.training.data_formats import check_input_scale, load_data, with_model_classes
from bngraph.training.distributed import SINGLE, Distributed, broadcast_buffers, sum_over_ranks, wrap
from bngraph.training.metrics import METRICS, evaluate_shared, interval_means, new_interval, write_metrics
from bngraph.training.track import InputTracker
from bngraph.trace import check_model


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
    notes: list[str] = field(default_factory=list)  # what a resumed run did otherwise than the run had

    @property
    def best_test_accuracy(self) -> float:
        return max((row["test_accuracy"] for row in self.metrics), default=float("nan"))


@dataclass
class _Setup:
    """What the loop works with, resolved for the device and the data."""

    precision: str
    channels_last: bool
    amp: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    optimizer: torch.optim.SGD
    sampler: EpochSampler
    test_loader: torch.utils.data.DataLoader | None
    tracker: InputTracker | None


@library_call(refuse_inference_mode=True)
def train(
    model: nn.Module,
    data: TensorData | StreamData | str | Path | tuple,
    config: TrainConfig,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    label: str = "train",
    on_eval: Callable[[dict], None] | None = None,
    distributed: Distributed = SINGLE,
    finish: bool = False,
) -> TrainRun:
    """Train `model` in place on `data` (moved to the device when it is elsewhere) and return it on the CPU, in eval mode.

    `data` may be a path (any format of `bngraph.training.data_formats`, read for the input the
    model declares: `example_input_shapes`, as `bngraph.load` gives it, or `example_input_shape`),
    or a tuple (train, test) of Datasets, read as a factory's.
    `config.precision` and `config.channels_last` default to bf16 autocast and channels_last on
    CUDA, fp32 and the default layout elsewhere; fp16 uses a GradScaler. With `out_dir`,
    checkpoints and metrics go there, and `resume=True` continues from its checkpoint.
    `on_eval(row)` sees a copy of each metrics row once it and its checkpoint are written (and may raise to
    stop: the run resumes from there). Under torchrun
    (`distributed` from `bngraph.training.distributed.join`), every rank calls this with the same
    arguments; rank 0 alone reads and writes `out_dir` (see bngraph.training.distributed). With
    `finish`, resuming a run whose steps are all done but whose model/ is not yet written (or
    older) is no error: no step runs (`bngraph.training.run_folder` writes the model).
    """
    check_model(model, "train")
    if not any(p.requires_grad for p in model.parameters()):  # torch's words came at the first backward
        raise UserError(f"{type(model).__name__} has no parameter to train (none, or each with requires_grad=False): "
                        "nothing to train")
    made_in_inference_mode = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_inference()]
    if made_in_inference_mode:  # torch's words came at the first backward, or the first running-mean update
        raise UserError(f"{type(model).__name__}'s {made_in_inference_mode[0]} was made inside torch.inference_mode(), "
                        "and such tensors take no gradient: build the model outside that block")
    dev = pick_device(device)
    ctx = distributed
    out_dir = None if out_dir is None else absolute_output(out_dir)
    if not isinstance(config, TrainConfig):  # a dict of its fields: an AttributeError deep in the loop
        raise UserError(f"config is a {type(config).__name__}; give a TrainConfig(steps=..., batch_size=...) "
                        "(bngraph.training.TrainConfig)")
    if isinstance(data, TensorData) and data.format == "tensors":  # the caller's own; readers check theirs
        for name in ("x_train", "x_test"):
            check_finite(getattr(data, name), f"the data's {name}")
    if not isinstance(data, (str, Path, tuple, TensorData, StreamData)):
        raise UserError(f"data is a {type(data).__name__}; expected a path (a folder, an .npz, FILE.py:make), a tuple "
                        "(train, test) of Datasets, or TensorData / StreamData")
    # What this call makes, the run folder and the parents it lacks, is removed again where the run
    # stops before its first checkpoint (bad data, a model that fails its first step).
    # An empty folder given to it keeps no bngraph.json either (the folder itself stays: not bngraph's).
    starts = out_dir is not None and not resume and ctx.is_main
    made = [p for p in (out_dir, *out_dir.parents) if not os.path.lexists(p)] if starts else []
    was_empty = starts and not made and out_dir.is_dir() and not any(out_dir.iterdir())
    if ctx.is_main:  # rank 0 alone reads and writes the run folder
        open_run_folder(out_dir, resume)
    # Held before the cleanup below is armed: a second process refused here leaves the first's folder.
    with held_run_folder(out_dir) if out_dir is not None and ctx.is_main else contextlib.nullcontext():
        try:
            return _train_in_folder(model, data, config, out_dir, resume, dev, ctx, progress, label, on_eval, finish)
        except BaseException:
            if made or was_empty:  # not a run folder made by another (the CLI's run_folder): its maker's to clean
                remove_unstarted_run(out_dir, made)
            raise


def _train_in_folder(model: nn.Module, data, config: TrainConfig, out_dir: Path | None, resume: bool,
                     dev: torch.device, ctx: Distributed, progress: bool, label: str, on_eval, finish: bool) -> TrainRun:
    """`train` once its arguments are checked and its run folder is open."""
    if isinstance(data, (str, Path, tuple)):  # a path, or (train, test) Datasets
        data = load_data(data, model, device=dev)
    elif isinstance(data, TensorData):  # tensors made on the CPU, a run on CUDA: found on a GPU
        data = data.to(dev)
    # A model bngraph.load gave from a run knows its classes: a folder lacking one of them must
    # not shift the others' labels (the CLI maps them before it calls this).
    data = with_model_classes(data, getattr(model, "bngraph_classes", None), model)
    check_input_scale(data, getattr(model, "bngraph_input_scale", None))  # as the CLI's fine-tune does
    # Before the first step: data the model cannot take is one line naming it (train_run checks
    # too; an API caller's model and data meet here first).
    check_model_fits(model, data)
    setup = _set_up(model, data, config, dev, ctx)
    # As resolved for this device and data, for the checkpoint: a default bf16 run on CUDA resumed
    # on the CPU (fp32 there) is another run, and --precision fp32 on the CPU is the default's.
    resolved = replace(config, precision=setup.precision, channels_last=setup.channels_last)
    fingerprint, example = data_fingerprint(data), data.example(2).to(dev)
    if resume:
        resumed = resume_from_checkpoint(out_dir, config=resolved, model=model, optimizer=setup.optimizer,
                                         scaler=setup.scaler, ctx=ctx, dev=dev, data=fingerprint, example=example,
                                         finish=finish)
        start, metrics, elapsed_before, interval = resumed.step, resumed.metrics, resumed.elapsed_s, resumed.interval
    else:
        # Dropout draws from the global generator; other ranks' masks must differ from rank 0's.
        torch.manual_seed(config.seed if ctx.is_main else zlib.crc32(f"{config.seed}:rank{ctx.rank}".encode()))
        start, metrics, elapsed_before, interval = 0, [], 0.0, new_interval(dev)
    checkpoint_every = config.checkpoint_every or config.eval_every

    started = time.perf_counter()
    window_start, window_steps = started, 0
    net = wrap(model, ctx, dev, example)  # DDP under torchrun: a step's gradients are the global batch's
    if config.compile:
        net = torch.compile(net)  # the training steps; evaluation runs the model as it is
    batches = step_batches(data, setup.sampler, start, config.steps, dev)
    checked_at = last_eval = start  # the loss is looked at where it reaches the CPU anyway
    finite = _FiniteWatch(model, ctx)
    saved_at = start if resume and out_dir is not None else None
    # Gradients on whatever the caller's mode (a `bngraph.train` inside their torch.no_grad()).
    try:
        with _stop_requests(not ctx.is_distributed) as stop_requested, torch.enable_grad(), \
                _progress_bar(progress and ctx.is_main, label) as bar, _deterministic(config.deterministic), \
                _compile_logs_quiet(config.compile):
            task = bar.add_task("train", total=config.steps, completed=start, loss="-", acc="-", test="-", rate="-")
            for step in range(start, config.steps):
                lr = config.lr_at(step)
                _train_step(net, next(batches), lr, setup, interval, check_outputs=step == start)
                done, window_steps = step + 1, window_steps + 1

                is_eval = done % config.eval_every == 0 or done == config.steps
                if is_eval or done % 25 == 0:
                    now = time.perf_counter()
                    rate = window_steps / max(now - window_start, 1e-9)
                    train_loss, train_accuracy = interval_means(interval, config.batch_size)
                    if not ctx.is_distributed:  # under torchrun all ranks stop together, below
                        _stop_if_diverged(train_loss, checked_at, done, config.lr, out_dir, saved_at)
                    checked_at = done
                    bar.update(task, completed=done, loss=f"{train_loss:.3f}", acc=f"{train_accuracy:.3f}",
                               rate=f"{rate:.0f}")
                if is_eval:
                    row = _evaluation_row(model, data, config, setup, ctx, interval, done, lr, rate,
                                          elapsed_before + time.perf_counter() - started)
                    _stop_if_diverged(row["train_loss"], last_eval, done, config.lr, out_dir, saved_at)  # the same on every rank
                    finite.stop_if_broken(row["test_loss"], done, config.lr, out_dir, saved_at)
                    last_eval = done
                    metrics.append(row)
                    interval = new_interval(dev)
                    bar.update(task, test=f"{row['test_accuracy']:.4f}")
                    window_start, window_steps = time.perf_counter(), 0
                    if out_dir is not None and ctx.is_main:
                        write_metrics(out_dir / METRICS, metrics)
                stopping = stop_requested()
                if out_dir is not None and (done % checkpoint_every == 0 or done == config.steps or stopping):
                    if not is_eval:  # checked above at an evaluation
                        finite.stop_if_broken(None, done, config.lr, out_dir, saved_at)
                    save_checkpoint(out_dir / CHECKPOINT, step=done, elapsed_s=elapsed_before + time.perf_counter() - started,
                                    config=resolved, model=model, optimizer=setup.optimizer, scaler=setup.scaler,
                                    interval=interval, metrics=metrics, ctx=ctx, on_gpu=dev.type == "cuda",
                                    data=fingerprint, example=example)
                    saved_at = done
                if is_eval and on_eval is not None:  # after its checkpoint: a callback that raises to stop keeps it
                    on_eval(dict(row))  # its own copy: a logger that pops "step" must not edit the history
                if stopping:
                    where = f"; resume with --resume (checkpoint in {out_dir})" if out_dir is not None else ""
                    stop = KeyboardInterrupt(f"stopped after step {done}{where}")  # the CLI's one line
                    stop.signum = stopping  # the CLI's exit code: 128 + the signal, as a shell reports it
                    raise stop
    except KeyboardInterrupt as stop:
        if not ctx.is_distributed:  # stopped after a whole step, above, and says where to resume
            raise
        raise _job_stopped(stop, out_dir, saved_at) from None
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    # What its outputs and inputs now mean, as `bngraph.load` gives a run's model: fine-tuned on
    # a folder lacking a class, the classes it has keep their outputs (labels b, c were 0, 1).
    if data.class_names is not None:
        model.bngraph_classes = tuple(data.class_names)
    if data.input_scale:
        model.bngraph_input_scale = data.input_scale
    return TrainRun(model, metrics, elapsed_before + time.perf_counter() - started, start if resume else None,
                    str(dev), setup.precision, setup.channels_last, resumed.notes if resume else [])


def _set_up(model: nn.Module, data: TensorData | StreamData, config: TrainConfig, dev: torch.device,
            ctx: Distributed) -> _Setup:
    """Put the model on the device in its training layout, and make the optimizer, the loss
    scaler, the batch sampler, the streamed test loader and the input tracker."""
    on_gpu = dev.type == "cuda"
    rank = data.example(1).dim()
    if config.channels_last and rank != 4:  # asked for, it would do nothing: said
        raise UserError(f"--channels-last is a layout of 4-d image batches (N, C, H, W); this model's inputs are "
                        f"{rank}-d: leave it out")
    precision = config.precision or ("bf16" if on_gpu else "fp32")
    channels_last = (on_gpu if config.channels_last is None else config.channels_last) and rank == 4
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
                           ctx.world_size)
    test_loader = None
    if streamed:
        test_loader = streamed_test_loader(data, config.seed, ctx.rank, ctx.world_size, max(config.batch_size, 256),
                                           on_gpu)
    tracker = None
    if config.track_inputs is not None:  # two examples find the nonlinearities called as functions
        example = [data.example(2).to(dev)]
        tracker = InputTracker(model, config.track_inputs, config.track_unit, example_inputs=example)
    return _Setup(precision, channels_last, amp, scaler, optimizer, sampler, test_loader, tracker)


def _train_step(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], lr: float, setup: _Setup,
                interval: dict, check_outputs: bool = False) -> None:
    """One SGD step at `lr` on `batch`, its loss and hits added to `interval`; with `check_outputs`
    (the first step), refused before any update where the outputs are not logits."""
    for group in setup.optimizer.param_groups:
        group["lr"] = lr
    x, y = batch
    if setup.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with setup.amp():
            logits = logits_of(net(x), mode="training")
        if check_outputs:
            refuse_what_is_not_logits(logits)
        loss = F.cross_entropy(logits.float(), y)
        setup.optimizer.zero_grad(set_to_none=True)
        _backward(setup.scaler.scale(loss) if setup.scaler is not None else loss)
        if setup.scaler is not None:
            setup.scaler.step(setup.optimizer)
            setup.scaler.update()
        else:
            setup.optimizer.step()
    except Exception as err:
        if type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise _compile_failed(net, x, setup, err) from err
        failed = _model_failed(net, x, setup, err)
        if failed is None:
            raise
        raise failed from err
    interval["loss"] += loss.detach().double()
    interval["correct"] += (logits.detach().argmax(1) == y).sum()
    interval["steps"] += 1


def _compile_failed(net: nn.Module, x: torch.Tensor, setup: _Setup, err: Exception) -> UserError:
    """The one line for a step torch.compile failed: the model's own error where a copy of it,
    not compiled, fails on the same batch (dynamo reports a forward's shape error as its own
    TorchRuntimeError), else torch.compile's (no C++ compiler in a slim image, an op it cannot
    build), for an option the user can leave out; either way not inductor's 100-line traceback."""
    model = getattr(net, "_orig_mod", net)
    model = getattr(model, "module", model)  # DDP's
    way_out = "train without --compile (in Python: TrainConfig(compile=False))"
    try:
        copy, kept = deepcopy(model), contextlib.nullcontext()
    except Exception:  # a model holding a lock: the model itself, its state put back after
        copy, kept = model, _state_kept(model)
    try:
        # With gradients, and their backward, as the step: an in-place write to a leaf fails only so.
        with kept, setup.amp():
            logits_of(copy(x), mode="training").float().sum().backward()
    except Exception as own:
        if isinstance(own, UserError) or user_frame(own) is not None:
            return own if isinstance(own, UserError) else model_raised(own, failed=_IN_TRAINING)
    return UserError(f"--compile: torch.compile could not build the training step ({one_line(err)}); {way_out}")


@contextlib.contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Run `model` and leave its parameters, buffers, gradients and the random state as they were.
    By value, from its state dict: BatchNorm's kernel moves its running statistics without a
    version bump (`buffers_kept` would miss them), and a forward may rebind a buffer or write a
    parameter in place; backward adds into existing gradients in place."""
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    devices = sorted({t.device.index or 0 for t in state.values() if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        model.load_state_dict(state)
        for p, grad in grads:
            p.grad = grad


@contextlib.contextmanager
def _compile_logs_quiet(enabled: bool) -> Iterator[None]:
    """torch.compile's fake-tensor pass logs a model's error on stderr before raising it: the
    error's one line says it (`_compile_failed`)."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    if enabled:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _backward(loss: torch.Tensor) -> None:
    """loss.backward(), where autograd's own failure is the model's: a forward that wrote in place
    into a tensor its backward needs (`h = sigmoid(a); h *= b`) fails here, in no frame of its code."""
    try:
        loss.backward()
    except RuntimeError as err:
        # Under torchrun the backward also all-reduces: a peer's failure surfaces here, and the
        # job's own handling names it (bngraph.training.distributed).
        if user_frame(err) is not None or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise
        raise ModelRaised(f"the model's backward failed on a training batch: {one_line(err)}") from err


def _model_failed(net: nn.Module, x: torch.Tensor, setup: _Setup, err: Exception) -> UserError | None:
    """The one line for the user's code raising in a training step (check_model_fits ran it only
    in eval mode, on contiguous inputs), or None when no frame of the user's code raised (a bug)."""
    if isinstance(err, (UserError, CheckFailed)) or user_frame(err) is None:
        return None
    if setup.channels_last:
        # x.view(x.size(0), -1) cannot view a channels_last tensor: if the same batch passes
        # through a copy in the default layout (weights too: a channels_last conv weight makes
        # channels_last outputs from any input), the layout is what the model does not take.
        model = getattr(net, "_orig_mod", net)  # torch.compile's wrapper
        model = getattr(model, "module", model)  # DDP's
        hint = "train with --no-channels-last (in Python: TrainConfig(channels_last=False))"
        try:
            copy = deepcopy(model).to(memory_format=torch.contiguous_format)
            with torch.no_grad(), setup.amp():
                copy(x.contiguous())
        except Exception as contiguous_err:
            frame = user_frame(err)
            if user_frame(contiguous_err) is not None and frame is not None:
                # It fails in the default layout too, further on (CUDA's default layout is
                # channels_last, so this was the first error a GPU user saw): both, that one first.
                raised = str(model_raised(contiguous_err, failed=_IN_TRAINING)).rstrip(".")
                return ModelRaised(f"{raised}; on channels_last inputs it fails before that, at "
                                   f"{frame.filename}:{frame.lineno}: {hint}")
        else:
            raised = str(model_raised(err, failed="the model fails on channels_last inputs")).rstrip(".")
            return ModelRaised(f"{raised}; {hint}")
    return model_raised(err, failed=_IN_TRAINING)


_IN_TRAINING = "the model failed on a training batch (in training mode)"


def _evaluation_row(model: nn.Module, data: TensorData | StreamData, config: TrainConfig, setup: _Setup,
                    ctx: Distributed, interval: dict, done: int, lr: float, rate: float, elapsed_s: float) -> dict:
    """The metrics row of step `done`: the test set's loss and accuracy, the training batches'
    since the last evaluation (over all ranks) and, with a tracker, the tracked quantiles."""
    broadcast_buffers(model, ctx)  # the running statistics rank 0 saves are the ones tested
    # Under torchrun each rank tests (and tracks) its share; rank 0's quantiles are written.
    with setup.tracker.recording() if setup.tracker else contextlib.nullcontext():
        test_loss, test_accuracy = evaluate_shared(model, data, ctx, setup.amp, setup.test_loader)
    loss_sum, correct = sum_over_ranks([interval["loss"], interval["correct"]], ctx)
    totals = {**interval, "loss": loss_sum, "correct": correct}
    train_loss, train_accuracy = interval_means(totals, config.batch_size, ctx.world_size)
    row = {
        "step": done,
        "epoch": round(done / setup.sampler.steps_per_epoch, 4),
        "lr": lr,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "steps_per_s": round(rate, 2),
        "elapsed_s": round(elapsed_s, 3),
    }
    if setup.tracker:
        row["inputs"] = setup.tracker.quantiles()
    return row


def _job_stopped(stop: KeyboardInterrupt, out_dir: Path | None, saved_at: int | None) -> KeyboardInterrupt:
    """What a rank of a job stopped by a signal says: where the job resumes (its last scheduled
    checkpoint: see _stop_requests)."""
    if out_dir is None:
        where = ""
    elif saved_at is None:
        where = f"; no checkpoint yet in {out_dir}: start the run again"
    else:
        where = f"; resume with --resume from the checkpoint of step {saved_at} in {out_dir}"
    stopped = KeyboardInterrupt(f"{stop}{where}" if str(stop) else where.removeprefix("; "))
    if hasattr(stop, "signum"):
        stopped.signum = stop.signum
    return stopped


@contextlib.contextmanager
def _stop_requests(enabled: bool = True) -> Iterator[Callable[[], int]]:
    """SIGINT/SIGTERM ask the loop to stop after the current step, so that the checkpoint it
    writes then is of a whole step (an exception in the middle of `optimizer.step` is not). The
    function yielded says which signal asked (0: none).
    Not under torchrun: a signal reaches the ranks at different steps, and a checkpoint needs
    them all; a stopped job resumes from its last scheduled checkpoint."""
    requested = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def ask(signum, frame):
        if requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        requested.append(signum)

    for s in previous:
        signal.signal(s, ask)
    try:
        yield lambda: requested[0] if requested else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms for the run: on CUDA, what makes a resume exact."""
    if not enabled:
        yield
        return
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


def _progress_bar(enabled: bool, label: str) -> Progress:
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


def _stop_if_diverged(mean_loss: float, since: int, step: int, lr: float, out_dir, saved_at: int | None) -> None:
    """A loss that is not finite never comes back: stop before it reaches a checkpoint."""
    if math.isfinite(mean_loss):
        return
    steps = f"step {step}" if step - since == 1 else f"steps {since + 1}-{step}"
    raise _diverged(f"the training loss is {mean_loss} (mean over {steps})", lr, out_dir, saved_at)


class _FiniteWatch:
    """The model's weights and floating buffers that were finite when the run started (a causal
    mask of -inf is the model's own), checked for NaN and infinities: what breaks one of them
    stops the run before a checkpoint or the model holds it. The training loss is looked at only
    every few steps (where it reaches the CPU), and is finite when the step that blew up was the
    last before a checkpoint, or when inputs of 1e19 overflow a BatchNorm's variance while the
    loss stays put: a run written so exited 0 and reported the accuracy of always guessing class 0."""

    def __init__(self, model: nn.Module, ctx: Distributed):
        self.model, self.ctx = model, ctx
        self.parameters = {name for name, _ in model.named_parameters()}
        floating = {name: t for name, t in self._tensors().items() if t.is_floating_point()}
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in floating.values()]).tolist() \
            if floating else []  # one look at the device, not one per tensor
        self.watched = [name for name, ok in zip(floating, finite) if ok]

    def _tensors(self) -> dict[str, torch.Tensor]:  # by name each time: moving a model replaces its buffers
        return {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    def stop_if_broken(self, test_loss: float | None, step: int, lr: float, out_dir, saved_at: int | None) -> None:
        """Collective under torchrun (each rank has its own BN statistics): every rank stops together."""
        if test_loss is not None and not math.isfinite(test_loss):
            raise _diverged(f"the test loss is {test_loss} after step {step}", lr, out_dir, saved_at)
        if not self.watched:
            return
        tensors = self._tensors()  # a buffer the forward dropped (`self.cache = None`) is no longer watched
        watched = [name for name in self.watched if name in tensors]
        finite = [torch.isfinite(tensors[name].detach()).all() for name in watched] or [torch.tensor(True)]
        (broken,) = sum_over_ranks([(~torch.stack(finite)).int()], self.ctx)
        if bool(broken.any()):
            name = watched[int(broken.nonzero()[0])]
            # A running statistic overflows from inputs float32 cannot square (1e19), whatever the lr.
            fix = "lower --lr" if name in self.parameters else \
                "lower --lr (or scale the data down, if its values reach 1e19: float32 cannot square them)"
            raise _diverged(f"the model's {name} is no longer finite after step {step}", lr, out_dir, saved_at, fix)


def _diverged(what: str, lr: float, out_dir, saved_at: int | None, fix: str = "lower --lr") -> CheckFailed:
    if out_dir is None:
        kept = ""
    elif saved_at is None:
        kept = "; nothing of this run is kept"
    else:
        kept = f"; {out_dir} keeps the checkpoint of step {saved_at}, from before"
    return CheckFailed(f"training diverged: {what} at --lr {lr:g}; {fix}{kept}")
