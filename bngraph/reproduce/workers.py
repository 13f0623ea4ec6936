"""The MNIST nets' worker processes and progress bar: the last chunk of nets trains in the
command's own process (torch is loaded there already), each other chunk in a process of its
own, all single-threaded (at batch 60 a second thread buys less than it costs), the workers
reporting evaluations through a queue to the parent's progress bar."""

from __future__ import annotations

import gc
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import torch
import torch.multiprocessing as mp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bngraph.errors import CheckFailed
from bngraph.training.data import TensorData


def _worker(train_stack, rank, models, net_seeds, data, cfg, messages, send_state=None, evaluate_for=None) -> None:
    torch.set_num_threads(1)
    try:
        if evaluate_for is not None:
            other_models, states, other_rank = evaluate_for
            evaluate_for = (other_models, states, lambda step, acc: messages.put(("eval", other_rank, step, acc)))
        result = train_stack(models, net_seeds, data, cfg, lambda step, acc: messages.put(("eval", rank, step, acc)),
                             send_state=send_state, evaluate_for=evaluate_for)
        messages.put(("done", rank, result))
        # This process ends next, and Python's exit would walk every object torch made (~1 s on
        # one core, while the other trains or writes); frozen, they are left to the OS.
        gc.freeze()
    except CheckFailed as err:
        messages.put(("check_failed", rank, str(err)))
    except BaseException:  # noqa: BLE001 (the parent re-raises it with this text)
        messages.put(("error", rank, traceback.format_exc()))


def run_workers(train_stack: Callable, chunks, data: TensorData, cfg, on_eval: Callable) -> list[dict]:
    """`train_stack` on each chunk of nets: the last chunk in this process, each other chunk in a
    process of its own, started first; their messages drive `on_eval`, their results return.

    The last chunk holds the BN nets, whose steps cost the most (~1.2x on one core): this
    process starts training them at once, while a spawned worker is still importing torch."""
    ctx = mp.get_context("spawn")  # fork after torch has started its threads can hang
    messages = ctx.Queue()
    shared = TensorData(*(t.share_memory_() for t in (data.x_train, data.y_train, data.x_test, data.y_test)))
    here = len(chunks) - 1
    # Two chunks hold the plain nets and the BN nets: the plain chunk's worker also evaluates the
    # BN nets, on states this process sends, so that the two processes finish together.
    offload = len(chunks) == 2
    states = ctx.Queue() if offload else None
    if states is not None:
        # This process feeds it: stopped (Ctrl-C, SIGTERM, a failed worker) with states not yet
        # read, its exit would wait for the pipe to drain into a worker that is gone. A finished
        # run has had every state read (the worker's result waits for them).
        states.cancel_join_thread()
    procs = {
        rank: ctx.Process(target=_worker, args=(train_stack, rank, models, seeds, shared, cfg, messages),
                          kwargs={"evaluate_for": (chunks[here][0], states, here)} if offload else {}, daemon=True)
        for rank, (models, seeds) in enumerate(chunks)
        if rank != here
    }
    for p in procs.values():
        p.start()
    results: dict[int, dict] = {}

    def poll(block: bool = False) -> None:
        """Handle the workers' waiting messages (with `block`, until a result); raise if one failed or died."""
        while True:
            try:
                kind, rank, *rest = messages.get(block=block, timeout=1.0)
            except queue.Empty:
                dead = [p for rank, p in procs.items() if rank not in results and not p.is_alive()]
                if dead:
                    raise RuntimeError(
                        f"a training process died (exit code {dead[0].exitcode}); from a script, call "
                        "reproduce_mnist under `if __name__ == '__main__':` (workers are spawned), or pass workers=1"
                    ) from None
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
                results[rank] = rest[0]
                return

    try:
        models, seeds = chunks[here]
        results[here] = train_here(train_stack, models, seeds, shared, cfg, lambda step, acc: on_eval(here, step, acc),
                                   send_state=states, poll=poll)
        while len(results) < len(chunks):
            poll(block=True)
    finally:
        for rank, p in procs.items():  # one that sent its result exits on its own (reaped at exit)
            if rank not in results and p.is_alive():
                p.terminate()
                p.join(timeout=10)
    if offload:
        results[here].update(results[0].pop("offloaded"))
    return [results[i] for i in range(len(chunks))]


def train_here(train_stack: Callable, *args, **kwargs) -> dict:
    """`train_stack(*args, **kwargs)` in this process, single-threaded as the workers are, with
    torch's settings restored after."""
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
