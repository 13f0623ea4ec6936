"""The MNIST nets' worker processes and progress bar: one process per chunk of nets, each
single-threaded (at batch 60 a second thread buys less than it costs), reporting evaluations
through a queue to the parent's progress bar."""

from __future__ import annotations

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
    except CheckFailed as err:
        messages.put(("check_failed", rank, str(err)))
    except BaseException:  # noqa: BLE001 (the parent re-raises it with this text)
        messages.put(("error", rank, traceback.format_exc()))


def run_workers(train_stack: Callable, chunks, data: TensorData, cfg, on_eval: Callable) -> list[dict]:
    """One process per chunk of nets, each running `train_stack` on its chunk; their messages
    drive `on_eval`, their results return."""
    ctx = mp.get_context("spawn")  # fork after torch has started its threads can hang
    messages = ctx.Queue()
    shared = TensorData(*(t.share_memory_() for t in (data.x_train, data.y_train, data.x_test, data.y_test)))
    # Two processes hold the plain nets and the BN nets; BN's steps cost more (~1.4x on one
    # core), so the plain process also evaluates the BN nets, on states the other sends it.
    offload = len(chunks) == 2
    states = ctx.Queue() if offload else None
    extra = [{"evaluate_for": (chunks[1][0], states, 1)}, {"send_state": states}] if offload else [{}] * len(chunks)
    procs = [
        ctx.Process(target=_worker, args=(train_stack, rank, models, seeds, shared, cfg, messages), kwargs=extra[rank], daemon=True)
        for rank, (models, seeds) in enumerate(chunks)
    ]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    try:
        while len(results) < len(procs):
            try:
                message = messages.get(timeout=1.0)
            except queue.Empty:
                dead = [p for i, p in enumerate(procs) if i not in results and not p.is_alive()]
                if dead:
                    raise RuntimeError(
                        f"a training process died (exit code {dead[0].exitcode}); from a script, call "
                        "reproduce_mnist under `if __name__ == '__main__':` (workers are spawned), or pass workers=1"
                    ) from None
                continue
            kind, rank, *rest = message
            if kind == "eval":
                on_eval(rank, *rest)
            elif kind == "check_failed":
                raise CheckFailed(rest[0])
            elif kind == "error":
                raise RuntimeError(f"training process {rank} failed:\n{rest[0]}")
            else:
                results[rank] = rest[0]
    finally:
        for p in procs:
            if p.is_alive() and len(results) < len(procs):
                p.terminate()
            p.join(timeout=10)
    if offload:
        results[1].update(results[0].pop("offloaded"))
    return [results[i] for i in range(len(procs))]


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
