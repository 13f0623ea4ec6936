"""Data-parallel training under torchrun: the process group, the rank's share of the work, DDP.

bngraph has no launcher of its own. `torchrun` starts one process per device (or per CPU share)
and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `join` reads them and
initializes torch.distributed (nccl for CUDA, gloo for the CPU). Several hosts are torchrun's
rendezvous (`--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT`), not ours.

What each rank does (bngraph.training.loop calls these; one process is `SINGLE` and takes no branch):
  1. data      every rank holds the data set; batch `step` is one global permutation's slice of
               batch_size x world_size examples, and rank r takes its r-th batch_size part
               (`EpochSampler(rank=, world_size=)`), so each example is seen once per epoch.
  2. gradients DistributedDataParallel averages them: a step is one SGD step on the global batch.
  3. BN        each rank normalizes over its own batch (the paper's setting), unless the model's
               BatchNorms were made SyncBatchNorms (`bngraph train --sync-bn`): then the mean and
               variance are over the global batch. Running statistics and other buffers are
               rank 0's (DDP broadcasts them before each forward, `broadcast_buffers` before a
               test); each rank tests its share of the test set and the sums are combined.
  4. outputs   rank 0 alone writes checkpoints, metrics and plots, and reads the checkpoint a
               resume starts from (`from_main`); what differs between ranks (RNG, running sums)
               is gathered into its checkpoint, so a resume is exact.

A rank that raises exits non-zero; torchrun then stops the others (it watches its workers), and a
peer waiting on the dead one fails its collective or, at the latest, when PROCESS_GROUP_TIMEOUT_S
runs out. torch 2.13 cannot run SyncBatchNorm on the CPU: bngraph.training.sync_bn fills in.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bngraph.errors import UserError
from bngraph.runners import training_copy

# A collective that waits longer than this fails instead of hanging: a rank's step, evaluation
# shard or rank 0's checkpoint write must fit in it.
PROCESS_GROUP_TIMEOUT_S = 300
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the job. `SINGLE`: no job, one process, no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Distributed()


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARS)


def _device_for(device: torch.device, local_rank: int) -> torch.device:
    """Each process of a node takes the GPU of its local rank; the CPU is shared."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK (--device cuda)")
    if local_rank >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"local rank {local_rank} has no GPU ({count} here): start fewer processes per node")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def join(
    device: torch.device, timeout_s: float = PROCESS_GROUP_TIMEOUT_S
) -> Iterator[tuple[Distributed, torch.device]]:
    """Join torchrun's job for the duration: (this process's place, its device).

    Outside torchrun, or in a job of one process, this is (`SINGLE`, device) and does nothing.
    The process group is left as it is on an error: the process is about to exit, and tearing
    down collectives that wait on a dead peer can itself wait.
    """
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield SINGLE, device
        return
    rank, world, local = (int(os.environ[name]) for name in TORCHRUN_VARS)
    device = _device_for(device, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None
    )
    yield Distributed(rank, world, local, backend), device
    # Every rank leaves together: a rank that tears gloo down while rank 0 is still writing the
    # run folder can abort in gloo's own threads ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


# --- what ranks exchange -----------------------------------------------------------------------


def wrap(model: nn.Module, ctx: Distributed, device: torch.device, example: torch.Tensor) -> nn.Module:
    """The module a training step calls: `model` itself, or DDP around it (same parameters).

    Checkpoints and outputs use `model`, never the wrapper, so no `module.` prefix reaches them.
    DDP waits for a gradient of every parameter; one the training forward leaves unused (an
    auxiliary head run in eval mode only) failed the job's second step in DDP's words: such a
    model is wrapped to look for them (`find_unused_parameters`, a graph walk per step). Every
    rank must wrap alike (the flag changes the collectives): the ranks' probes are combined.
    """
    if not ctx.is_distributed:
        return model
    unused = torch.tensor([int(_unused_in_training(model, example))], device=example.device)
    (unused,) = sum_over_ranks([unused], ctx)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=bool(unused.item()))


def _unused_in_training(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether a training step of `model` on `example` leaves a trainable parameter without a
    gradient (on a copy: the step moves BN statistics), or cannot tell (the model does not run
    on a batch of two in train mode: it is then looked for at every step, which always works).
    A model that skips layers at random (LayerDrop) may use them all in this one step."""
    from bngraph.training.data import logits_of  # here: data imports this module

    with training_copy(model) as probe, torch.enable_grad():  # whatever the caller's mode
        try:
            logits_of(probe(example), mode="training").float().sum().backward()
        except Exception:  # noqa: BLE001 (the training step itself says what is wrong, on its real batch)
            return True
        return any(p.requires_grad and p.grad is None for p in probe.parameters())


def sum_over_ranks(tensors: Sequence[torch.Tensor], ctx: Distributed) -> list[torch.Tensor]:
    """Elementwise sums over the ranks, as new tensors (the inputs are left alone)."""
    summed = [t.clone() for t in tensors]
    if ctx.is_distributed:
        for t in summed:
            dist.all_reduce(t)
    return summed


def gather_to_main(obj: Any, ctx: Distributed) -> list[Any]:
    """Every rank's `obj` (picklable, tensors on the CPU), in rank order; collective."""
    if not ctx.is_distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(make: Callable[[], Any], ctx: Distributed) -> Any:
    """`make()` run on rank 0 alone and sent to every rank, so that only rank 0's files matter
    (hosts need not share a filesystem). If it raises there, rank 0 exits and torchrun ends the
    job; the others are waiting in the broadcast, not doing work."""
    if not ctx.is_distributed:
        return make()
    box = [make() if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: nn.Module, ctx: Distributed) -> None:
    """Rank 0's buffers (BN running statistics) to every rank: the model it saves is the one tested."""
    if ctx.is_distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def local_main_first(ctx: Distributed) -> contextlib.AbstractContextManager:
    """Local rank 0 goes first (say, to download data into the node's cache), then the others."""

    @contextlib.contextmanager
    def ordered():
        if ctx.is_distributed and ctx.local_rank != 0:
            dist.barrier()
        yield
        if ctx.is_distributed and ctx.local_rank == 0:
            dist.barrier()

    return ordered()


# --- bngraph train --nproc N -------------------------------------------------------------------


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` less `option VALUE` and `option=VALUE`, abbreviated or not (argparse accepts both)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if len(name) > 2 and name.startswith("--") and option.startswith(name):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def exec_torchrun(nproc: int, argv: Sequence[str], stdout=None) -> NoReturn:
    """Replace this process by torchrun (`bngraph.training.torchrun`, its launcher with bngraph's
    way out) running `--standalone --nproc-per-node=N -m bngraph ARGV`: a job on this host, on a
    free port, that torchrun supervises (Ctrl-C and failures included). `stdout`, a stream on a
    file descriptor, becomes the job's standard output (the command's own, where fd 1 was moved)."""
    command = [sys.executable, "-m", "bngraph.training.torchrun", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bngraph", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(AttributeError, ValueError, OSError):  # a stream in memory has no descriptor
        stdout.flush()
        os.dup2(stdout.fileno(), 1)
    # `python -m` puts the working folder first on sys.path, where the `bngraph` command does not:
    # a user's profile.py there replaced the standard library's in torchrun and in every rank.
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    # torchrun sets 1 thread per process, with a banner saying so; the host's cores shared out
    # instead (a 16-core host with 2 processes ran each on one core).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.execve(sys.executable, command, env)


__all__ = [
    "PROCESS_GROUP_TIMEOUT_S",
    "SINGLE",
    "Distributed",
    "broadcast_buffers",
    "exec_torchrun",
    "from_main",
    "gather_to_main",
    "join",
    "local_main_first",
    "sum_over_ranks",
    "under_torchrun",
    "without_option",
    "wrap",
]
