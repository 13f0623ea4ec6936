"""The MNIST nets' worker processes and progress bar: the last chunk of nets trains in the
command's own process (torch is loaded there already), each other chunk in a process of its
own, all single-threaded (at batch 60 a second thread buys less than it costs), the workers
reporting evaluations through a queue to the parent's progress bar.

This module imports no torch: `bngraph reproduce mnist` starts the workers before it imports
torch itself, so that theirs and its own load at the same time (~1.3 s each)."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bngraph.errors import CheckFailed, UserError

if TYPE_CHECKING:
    from bngraph.training.data import TensorData


def cpu_processes(workers: int | None, seeds: int) -> int:
    """How many processes train the nets of `seeds` seeds on the CPU: `workers`, by default one
    per core, at most one per net."""
    return min(workers or os.cpu_count() or 1, 2 * seeds)


def _worker(rank, jobs, messages, states) -> None:
    """Wait for this process's job (it starts before the job is ready, see `Workers`), then run
    it; with `states` (a queue), also evaluate the nets whose states come through it."""
    import torch

    import bngraph.reproduce.mnist  # noqa: F401  (what the job's pickle names: ~0.2 s, loaded while the job is made)

    torch.set_num_threads(1)
    train_stack, models, net_seeds, data, cfg, evaluated_models, evaluated_rank = pickle.loads(jobs.get())
    try:
        evaluate_for = None
        if states is not None:
            evaluate_for = (evaluated_models, states,
                            lambda step, acc: messages.put(("eval", evaluated_rank, step, acc)))
        result = train_stack(models, net_seeds, data, cfg, lambda step, acc: messages.put(("eval", rank, step, acc)),
                             evaluate_for=evaluate_for)
        messages.put(("done", rank, result))
        # This process ends next, and Python's exit would walk every object torch made (~1 s on
        # one core, while the other trains or writes); frozen, they are left to the OS.
        gc.freeze()
    except CheckFailed as err:
        messages.put(("check_failed", rank, str(err)))
    except BaseException:  # noqa: BLE001 (the parent re-raises it with this text)
        messages.put(("error", rank, traceback.format_exc()))


@contextlib.contextmanager
def _ctrl_c_left_to_this_process():
    """Start workers with SIGINT ignored, which they keep (Python leaves an inherited SIG_IGN):
    a terminal's Ctrl-C reaches the whole process group, and a worker still starting (importing
    torch, reading its job) printed its KeyboardInterrupt traceback beside this process's one
    line. This process stops them itself (`__exit__`). Outside the main thread, as it was."""
    try:
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not this call's to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


class Workers:
    """`count` spawned training processes, started before their work is ready: each spends ~1.3 s
    starting Python and importing torch, while this process does the same, reads the data and
    builds the nets. `run` hands them their chunks of nets; leaving the `with` block ends any
    still running (one left without work, too).

        with Workers(1) as workers:
            ...                                   # import torch, read the data, build the nets
            results = workers.run(train_stack, chunks, data, cfg, on_eval)
    """

    def __init__(self, count: int):
        ctx = multiprocessing.get_context("spawn")  # fork after torch has started its threads can hang
        self.messages = ctx.Queue()
        # Two chunks (the plain nets and the BN nets): the plain chunk's worker also evaluates
        # the BN nets, on states this process sends, so that the two processes finish together.
        self.states = ctx.Queue() if count == 1 else None
        if self.states is not None:
            # This process feeds it: stopped (Ctrl-C, SIGTERM, a failed worker) with states not
            # yet read, its exit would wait for the pipe to drain into a worker that is gone. A
            # finished run has had every state read (the worker's result waits for them).
            self.states.cancel_join_thread()
        self.jobs = {rank: ctx.Queue() for rank in range(count)}
        # Queues reach a process only as its arguments, so each one is made here, before it starts.
        self.procs = {rank: ctx.Process(target=_worker, args=(rank, jobs, self.messages, self.states), daemon=True)
                      for rank, jobs in self.jobs.items()}
        self.results: dict[int, dict] = {}
        with _ctrl_c_left_to_this_process():
            for p in self.procs.values():
                p.start()

    def __len__(self) -> int:
        return len(self.procs)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        for rank, p in self.procs.items():  # one that sent its result exits on its own (reaped at exit)
            if rank not in self.results and p.is_alive():
                p.terminate()
                p.join(timeout=10)

    def run(self, train_stack: Callable, chunks, data: TensorData, cfg, on_eval: Callable) -> list[dict]:
        """`train_stack` on each chunk of nets: the last chunk in this process, each other chunk
        in a worker; their messages drive `on_eval`, their results return.

        The last chunk holds the BN nets, whose steps cost the most (~1.2x on one core): this
        process starts training them at once, while a worker may still be importing torch."""
        from bngraph.training.data import TensorData

        if len(chunks) != len(self.procs) + 1:
            raise ValueError(f"{len(chunks)} chunks of nets for {len(self.procs)} workers and this process")
        shared = TensorData(*(t.share_memory_() for t in (data.x_train, data.y_train, data.x_test, data.y_test)))
        _quiet_handle_sharer()
        here = len(chunks) - 1
        for rank, (models, seeds) in enumerate(chunks[:here]):
            # Pickled here, not in the queue's thread, where an error would leave the worker waiting.
            job = bytes(ForkingPickler.dumps((train_stack, models, seeds, shared, cfg, chunks[here][0], here)))
            self.jobs[rank].put(job)
        models, seeds = chunks[here]
        self.results[here] = train_here(train_stack, models, seeds, shared, cfg,
                                        lambda step, acc: on_eval(here, step, acc),
                                        send_state=self.states, poll=lambda: self._poll(on_eval))
        while len(self.results) < len(chunks):
            self._poll(on_eval, block=True)
        if self.states is not None:
            self.results[here].update(self.results[0].pop("offloaded"))
        return [self.results[i] for i in range(len(chunks))]

    def _poll(self, on_eval: Callable, block: bool = False) -> None:
        """Handle the workers' waiting messages (with `block`, until a result); raise if one failed or died."""
        while True:
            try:
                kind, rank, *rest = self.messages.get(block=block, timeout=1.0)
            except queue.Empty:
                dead = [p for rank, p in self.procs.items() if rank not in self.results and not p.is_alive()]
                if dead:  # the machine's to fix, not a bug of ours: one line, no traceback
                    raise UserError(_death(dead[0].exitcode)) from None
                if not block:
                    return
                continue
            if kind == "eval":
                on_eval(rank, *rest)
            elif kind == "check_failed":
                raise CheckFailed(rest[0])
            elif kind == "error":
                raise RuntimeError(f"training process {rank} failed:\n{rest[0]}")
            else:
                self.results[rank] = rest[0]
                return


def _quiet_handle_sharer() -> None:
    """Keep multiprocessing's handle-sharing thread from printing a traceback for a worker that
    died while fetching the shared tensors' file descriptors (the command stopped by a signal
    during the worker's start): it prints through `sys.excepthook`, never raises, and the
    worker's death already reaches the user as one line (`_death`). Other errors pass."""
    from multiprocessing import resource_sharer

    shown = sys.excepthook
    if getattr(shown, "quiets_handle_sharer", False):
        return

    def excepthook(kind, value, tb):
        sharer_thread = getattr(resource_sharer._resource_sharer, "_thread", None)
        if issubclass(kind, (OSError, EOFError)) and threading.current_thread() is sharer_thread:
            return
        shown(kind, value, tb)

    excepthook.quiets_handle_sharer = True
    sys.excepthook = excepthook


def _death(exitcode: int) -> str:
    """Why a worker that sent no result is gone, from its exit code."""
    if exitcode < 0:  # a signal: another process's or the kernel's (SIGKILL: most often out of memory)
        name = signal.Signals(-exitcode).name
        oom = " (out of memory? --workers 1 trains every net in one process)" if name == "SIGKILL" else ""
        return f"a training process was killed by {name}{oom}; nothing was written"
    # Spawned from a script without a main guard, a worker runs the script again and fails.
    return (f"a training process exited with code {exitcode}; from a script, call reproduce_mnist under "
            "`if __name__ == '__main__':` (workers are spawned), or pass workers=1")


def train_here(train_stack: Callable, *args, **kwargs) -> dict:
    """`train_stack(*args, **kwargs)` in this process, single-threaded as the workers are, with
    torch's settings restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_stack(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


class MnistProgress:
    """A rich bar over steps, with each net's latest test accuracy (workers report evaluations)."""

    def __init__(self, enabled: bool, steps: int):
        self.progress = Progress(
            TextColumn("[bold]reproduce mnist"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[acc]}"), TextColumn("{task.fields[rate]} steps/s"), TimeElapsedColumn(),
            console=Console(file=sys.stderr), disable=not enabled,
        )
        self.steps, self.latest, self.started = steps, {}, time.perf_counter()
        self.task = self.progress.add_task("train", total=steps, acc="", rate="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, rank: int, step: int, accuracy: Sequence[float]) -> None:
        self.latest[rank] = (step, accuracy)
        done = min(s for s, _ in self.latest.values())
        shown = " ".join(f"{a:.4f}" for r in sorted(self.latest) for a in self.latest[r][1])
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, completed=done, acc=f"test acc {shown}", rate=f"{rate:.0f}")
