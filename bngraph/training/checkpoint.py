"""A run's folder and its checkpoint: what a stopped run needs to continue exactly.

A checkpoint holds everything a step depends on that is not a pure function of the step number:
weights, BN statistics, momentum buffers (and the fp16 loss scale), the RNG that dropout draws
from, the training sums since the last evaluation, and the metrics so far. Under torchrun rank 0
writes it, with what differs between ranks (RNG, sums) gathered into it, and sends it on resume.
It also holds what the model computes with those weights on a fixed probe (`function_probe`):
a model whose code changed (an activation swapped) loads the same state dict, and only its
outputs tell that a resume would continue another model's run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from bngraph.atomic import (
    MARKER, RUN, check_writable, foreign_entries, output_kind, refuse_if_running, refuse_symlinked_run,
    remove_left_by_kills, save_tensors, start_run_folder, write_atomically,
)
from bngraph.compare import ONNX_TOLERANCE, compare
from bngraph.errors import UserError, one_line
from bngraph.runners import named_tensors, random_tensor
from bngraph.spec import model_steps
from bngraph.training.config import TrainConfig
from bngraph.training.distributed import Distributed, from_main, gather_to_main
from bngraph.training.metrics import METRICS
from bngraph.training.sync_bn import has_sync_bn

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "bngraph-checkpoint-1"


def open_run_folder(out_dir: Path | None, resume: bool) -> None:
    """Check that `out_dir` can hold this run (a new one, or the one to resume) and prepare it.
    Rank 0's job: it alone reads and writes the run folder."""
    checkpoint_path = None if out_dir is None else out_dir / CHECKPOINT
    if out_dir is not None:
        refuse_symlinked_run(out_dir)
        if out_dir.exists() and not out_dir.is_dir():  # mkdir's FileExistsError; the file stays as it is
            raise UserError(f"{out_dir} is a file, not a folder: choose another -o (out_dir) for the run folder")
        check_writable(out_dir)
    if resume and out_dir is None:
        raise UserError(_nothing_to_resume(out_dir, checkpoint_path))
    if resume:
        refuse_if_running(out_dir)  # before its first checkpoint, "nothing to resume" sent the user to --force
        check_resumable(out_dir)
        remove_left_by_kills(out_dir, RUN)
    if not resume and checkpoint_path is not None and checkpoint_path.exists():
        raise UserError(f"{out_dir} holds a run already: add --resume to continue it (in Python: resume=True), or "
                        "choose another -o (out_dir)")
    if out_dir is not None:
        start_run_folder(out_dir, resume=resume)  # new, empty or a run's: never a user's folder


def remove_unstarted_run(out_dir: Path, made: Sequence[Path] = ()) -> None:
    """Undo `open_run_folder` for a run stopped before its first checkpoint: the files a run
    writes before it, then the folders in `made` (the run folder and the parents the call made),
    innermost first, each only where nothing else is in it."""
    if (out_dir / CHECKPOINT).exists():
        return  # resumable: kept
    for name in (METRICS, MARKER):
        (out_dir / name).unlink(missing_ok=True)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # something else in it: not bngraph's to delete
            return


def _nothing_to_resume(out_dir: Path | None, checkpoint_path: Path | None) -> str:
    """Why --resume has nothing to continue, and the way that works: a run folder stopped before
    its first checkpoint (a SIGKILL, the OOM killer) exists, so starting without --resume asks for
    --force; "start without --resume" sent the user back and forth between the two refusals."""
    if out_dir is not None and output_kind(out_dir) == RUN:
        return (f"nothing to resume: {out_dir} is a run stopped before its first checkpoint; "
                "start it again with --force instead of --resume")
    return f"nothing to resume: {checkpoint_path or 'no run folder'} does not exist (start without --resume)"


def check_resumable(out_dir: Path) -> None:
    """A resume rewrites the checkpoint, the metrics and model/: only in a run folder bngraph
    wrote, with a checkpoint, holding nothing else (a checkpoint copied into a user's folder is
    not a run), that this process can write (a read-only one failed after all the steps)."""
    checkpoint_path = out_dir / CHECKPOINT
    if not checkpoint_path.is_file():
        raise UserError(_nothing_to_resume(out_dir, checkpoint_path))
    if output_kind(out_dir) != RUN:
        raise UserError(f"cannot resume in {out_dir}: it is not a run folder bngraph wrote (no bngraph.json of a "
                        "run); it is left as it is: copy the whole run folder, or start a new run elsewhere")
    foreign = foreign_entries(out_dir, RUN)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"cannot resume in {out_dir}: it holds what bngraph did not write ({shown}), which resuming "
                        "could overwrite; it is left as it is: move that out, then resume")
    if not os.access(out_dir, os.W_OK):  # a read-only mount: root's access() says so too
        raise UserError(f"cannot resume in {out_dir}: the folder cannot be written (read-only)")


def saved_config(out_dir: Path) -> dict | None:
    """The settings the run in `out_dir` was started with, or None (no checkpoint, or unreadable:
    resuming reports that)."""
    return saved_field(out_dir, "config")


def saved_field(out_dir: Path, key: str, default=None):
    """One field of the checkpoint in `out_dir` (its "config", its "world_size"), or `default`
    where there is none (no checkpoint, or unreadable: resuming reports that)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return default
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get(key, default)
    except Exception:  # noqa: BLE001 (train() reports what is wrong with the checkpoint)
        return default


PROBE_VALUES = 4096  # at most this many output values are kept: a digest of the function


def function_probe(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode outputs (flattened, evenly thinned to PROBE_VALUES) on a fixed random
    batch shaped like `example`: what it computes with its present weights."""
    was_training = model.training
    try:  # a forward that draws random numbers must not move the run's generator
        with torch.no_grad(), torch.random.fork_rng(devices=_devices(example)):
            output = model.eval()(_probe_batch(example))
    finally:
        model.train(was_training)
    return _digest([t for _, t in named_tensors(output)])


def train_mode_probe(model: nn.Module, example: torch.Tensor) -> torch.Tensor | None:
    """What the eval-mode probe cannot see: the model's train-mode outputs on the probe batch
    under one random seed (its dropout masks), and the buffers that forward leaves (its
    BatchNorms' statistics, moved by their momentum). Run on a copy: a forward that writes its
    state in train mode (an EMA codebook, a step counter) must not move the run's. None where it
    does not run so (a batch of 1 into a BatchNorm, a model that cannot be copied), or where its
    forward is a collective (SyncBatchNorms) that the other ranks do not join here."""
    if has_sync_bn(model):
        return None
    try:
        copy = deepcopy(model).train()
        with torch.no_grad(), torch.random.fork_rng(devices=_devices(example)):
            torch.manual_seed(0)
            output = copy(_probe_batch(example))
        return _digest([t for _, t in named_tensors(output)] + [b for _, b in copy.named_buffers()])
    except Exception:  # noqa: BLE001 (the user's model, on a batch it may not take in train mode)
        return None


def _probe_batch(example: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if example.is_floating_point():
        return torch.randn(example.shape, generator=generator).to(example.device, example.dtype)
    return random_tensor(example.shape, example.dtype, generator).to(example.device)  # token ids: never -1


def _devices(example: torch.Tensor) -> list:
    return [example.device] if example.device.type == "cuda" else []


def _digest(tensors: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([t.detach().float().flatten().cpu() for t in tensors])
    return flat[:: max(1, len(flat) // PROBE_VALUES)][:PROBE_VALUES]


def _same_function(then: torch.Tensor, now: torch.Tensor) -> bool:
    """Equal to float rounding (another device or kernel may round differently): verify's rule at
    onnxruntime's tolerance."""
    if then.shape != now.shape:
        return False
    return compare("probe", [then.numpy()], [now.numpy()], ONNX_TOLERANCE, ONNX_TOLERANCE).passed


def save_checkpoint(path: Path, *, step: int, elapsed_s: float, config: TrainConfig, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scaler, interval: dict, metrics: list[dict],
                    ctx: Distributed, on_gpu: bool, data: dict, example: torch.Tensor) -> None:
    """Write the checkpoint of `step` (a collective: every rank calls it at the same step);
    `example`, a batch of the data, shapes `function_probe`'s probe."""
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if on_gpu else {})}
    # What differs between ranks goes in too.
    on_cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in interval.items()}
    ranks = gather_to_main({"rng": rng, "interval": on_cpu}, ctx)
    if not ctx.is_main:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": asdict(config),
        "data": data,  # `data_fingerprint`: a resume checks it finds the same data
        "model": model.state_dict(),
        "probe": function_probe(model, example),  # what `model` computes: a resume checks its model still does
        "probe_train": train_mode_probe(model, example),
        "probe_device": example.device.type,  # dropout draws other masks on another device
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "interval": interval,
        "metrics": metrics,
        "elapsed_s": elapsed_s,
        "world_size": ctx.world_size,
        "threads": torch.get_num_threads(),  # CPU kernels sum in an order that depends on it
        "sync_bn": has_sync_bn(model),
        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        **({"ranks": ranks} if ctx.is_distributed else {}),
    }
    write_atomically(path, lambda tmp: save_tensors(state, tmp), replace_own=True)


@dataclass
class Resumed:
    """Where a resumed run stands, beside the model, optimizer and RNG it restored."""

    step: int
    metrics: list[dict]
    elapsed_s: float  # the time the run had taken before
    interval: dict  # the training sums since its last evaluation, on the device
    notes: list[str] = field(default_factory=list)  # what the resumed run does otherwise than the run did


def resume_from_checkpoint(out_dir: Path, **run) -> Resumed:
    """Restore model, optimizer, loss scale and RNG from the checkpoint in `out_dir`, after
    checking it is of this run: the same model (its state dict's keys and shapes, and what it
    computes with the checkpoint's weights: `function_probe` on `example`'s shape), settings,
    data (its `data_fingerprint`), process count and --sync-bn (`_resume`'s arguments)."""
    try:
        return _resume(out_dir, **run)
    except UserError as err:
        # Each rank checks what rank 0 read and sent against the same arguments: under torchrun,
        # every rank printed the same line. Rank 0 alone says it (bngraph.cli).
        err.said_by_rank_0 = True
        raise


def _resume(out_dir: Path, *, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scaler,
            ctx: Distributed, dev: torch.device, data: dict, example: torch.Tensor, finish: bool = False) -> Resumed:
    path = None if out_dir is None else out_dir / CHECKPOINT  # rank 0 has refused a resume without one

    def load() -> dict:
        # Under torchrun rank 0 reads the file and sends it: other hosts need no copy of it.
        try:
            return torch.load(path, map_location="cpu" if ctx.is_distributed else dev, weights_only=True)
        except Exception as err:
            raise UserError(f"cannot read {path}: {one_line(err)}") from None

    state = from_main(load, ctx)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a bngraph training checkpoint")
    ran_as = state.get("world_size", 1)
    if ran_as != ctx.world_size:
        raise UserError(f"the run in {out_dir} ran as {ran_as} process(es), not {ctx.world_size}: "
                        "resume it with as many (they decide the batches)")
    if state.get("sync_bn", False) != has_sync_bn(model):
        was = "was" if state.get("sync_bn") else "was not"
        raise UserError(f"the run in {out_dir} {was} trained with --sync-bn; resume it the same way")
    changes = config_changes(state["config"], config)
    if changes:
        raise UserError(f"--resume with other settings than the run in {out_dir}: {'; '.join(changes)}")
    then = state.get("data", data)  # a checkpoint from before fingerprints: nothing to compare
    changed = [f"{k}: {then.get(k)} then, {v} now" for k, v in data.items() if k in then and then[k] != v]
    if changed:
        raise UserError(f"--resume with other data than the run in {out_dir}: {'; '.join(changed)}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"--resume: the checkpoint in {out_dir} is of another model: {one_line(err)}") from None
    if "probe" in state and not _same_function(state["probe"].cpu(), function_probe(model, example)):
        raise UserError(
            f"--resume: the model computes something else with the checkpoint's weights than the run in {out_dir} "
            "did (its code changed since, an activation or a forward): resume with the model the run started with, "
            "or start a new run"
        )
    then = state.get("probe_train")
    if then is not None and state.get("probe_device") == dev.type and (now := train_mode_probe(model, example)) is not None \
            and not _same_function(then.cpu(), now):
        raise UserError(
            f"--resume: the model trains otherwise with the checkpoint's weights than the run in {out_dir} did (its "
            "code changed since in what runs in train mode: a dropout rate, a BatchNorm's momentum): resume with the "
            "model the run started with, or start a new run"
        )
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    own = state["ranks"][ctx.rank] if ctx.is_distributed else state  # this rank's RNG and sums
    torch.set_rng_state(own["rng"]["cpu"].cpu())
    if dev.type == "cuda" and "cuda" in own["rng"]:
        torch.cuda.set_rng_state(own["rng"]["cuda"].cpu())
    step = int(state["step"])
    interval = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in own["interval"].items()}
    # With `finish`, a run folder stopped as it wrote its model (after the last checkpoint) is
    # finished: no step, and the caller writes the model.
    if step > config.steps or step == config.steps and not (finish and model_steps(out_dir) != step):
        raise UserError(f"the run in {out_dir} has done {step} steps already; ask for more with --steps")
    notes = []
    if dev.type == "cpu" and state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        # A silent difference of ~1e-6 from the uninterrupted run that the docs call bit-exact.
        notes.append(f"the run stopped with {state['threads']} CPU threads and resumes with {torch.get_num_threads()}: "
                     "its sums run in another order, so it matches an uninterrupted run to rounding, not bit for bit "
                     f"(OMP_NUM_THREADS={state['threads']} resumes it as it ran)")
    return Resumed(step, list(state["metrics"]), float(state["elapsed_s"]), interval, notes)


RESOLVED = ("precision", "channels_last")  # saved as the device resolved them (None: its default)


def config_changes(saved: dict, config: TrainConfig) -> list[str]:
    """The settings `config` changes from the run's, other than those a resume may change;
    `config` and the checkpoint's hold the RESOLVED settings as the run resolved them."""
    now = asdict(config)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    # A setting added since the checkpoint was written had its default then.
    then = {k: saved.get(k, TrainConfig.__dataclass_fields__[k].default) for k in now}
    return [
        f"{k}: {then[k]!r} then, {now[k]!r} now"
        for k in now
        if k not in TrainConfig.RESUMABLE_CHANGES and then[k] != now[k]
        and not (k in RESOLVED and then[k] is None)  # a checkpoint from before they were saved resolved
    ]
