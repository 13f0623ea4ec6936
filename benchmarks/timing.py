"""Latency measured side by side, for the benchmarks: interleaved rounds and onnxruntime in a child.

    samples = interleave({"a": run_a, "b": run_b}, rounds=11, sample_s=0.05)
    median_ratio(samples, "a", "b")     # the median over rounds of a's time / b's time

On a shared machine the load drifts while a benchmark runs. Each round times every contender
once, starting from a different one each round, so drift hits all alike; the median of the
per-round ratios then drops the rounds a neighbour spoiled. onnxruntime's thread pool and
torch's slow each other down in one process, so onnxruntime is timed in a process of its own
that never imports torch:

    .venv/bin/python benchmarks/timing.py SPEC.json OUT.json

SPEC is {"threads": 1, "level": "ORT_ENABLE_ALL", "rounds": 11, "sample_s": 0.05, "seed": 0,
"groups": {group: {"batch": 8, "contenders": {name: "model.onnx", ...}}}}; each group's
contenders are interleaved with one another on the same random input. OUT gets, per group and
contender, the seconds per call of each round, or "error: <one line>" for a model that does
not load or run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable


def seconds_per_call(run: Callable[[], object], calls: int, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    for _ in range(calls):
        run()
    return (clock() - start) / calls


def interleave(
    contenders: dict[str, Callable[[], object]],
    rounds: int,
    sample_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each contender, one sample per round, in a rotating order.

    Each sample repeats its contender's call enough times to last about `sample_s`, so a fast
    model is not timed at the resolution of one call."""
    calls = {}
    for name, run in contenders.items():
        run()  # the first call pays for allocations and lazy initialization
        warm = min(seconds_per_call(run, 1, clock) for _ in range(3))
        calls[name] = max(1, round(sample_s / max(warm, 1e-9)))
    names = list(contenders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name].append(seconds_per_call(contenders[name], calls[name], clock))
    return samples


def median_ratio(samples: dict[str, list[float] | str], a: str, b: str) -> float | str:
    """Median over rounds of a's time / b's time, or the error that kept one of them from running."""
    for name in (a, b):
        if isinstance(samples.get(name), str):
            return samples[name]
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:120]


def time_onnxruntime(spec: dict) -> dict[str, dict[str, list[float] | str]]:
    """The child's work: each group's models in onnxruntime (CPU), interleaved."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, spec["level"])
    rng = np.random.default_rng(spec.get("seed", 0))
    # "cpu": this thread's CPU time, which other processes on a busy machine do not inflate; with
    # one intra-op thread onnxruntime computes in the calling thread, so nothing is missed.
    clock = time.thread_time if spec.get("clock") == "cpu" and spec["threads"] == 1 else time.perf_counter
    results = {}
    for group, job in spec["groups"].items():
        runs, results[group] = {}, {}
        feed = None
        for name, path in job["contenders"].items():
            try:
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                if feed is None:  # one input for the whole group: every contender computes the same
                    feed = {
                        i.name: rng.standard_normal(
                            [d if isinstance(d, int) else job["batch"] for d in i.shape]
                        ).astype(np.float32)
                        for i in session.get_inputs()
                    }
                session.run(None, feed)
                runs[name] = lambda session=session: session.run(None, feed)
            except Exception as err:
                results[group][name] = f"error: {one_line(err)}"
        if runs:
            results[group].update(interleave(runs, spec["rounds"], spec["sample_s"], clock))
    return results


def run_child(args: list[str], env: dict[str, str] | None = None) -> None:
    """Run a timing child (a Python script and its arguments) to completion, with `env` added to
    the environment; its output passes through, a failure raises."""
    import os
    import subprocess

    subprocess.run([sys.executable, *args], check=True, env={**os.environ, **(env or {})})


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path) as f:
        timings = time_onnxruntime(json.load(f))
    with open(out_path, "w") as f:
        json.dump(timings, f)
