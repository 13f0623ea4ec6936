"""The paper's MNIST experiment (Sec. 4.1, Figure 1).

    run = reproduce_mnist(data, MnistConfig(steps=10_000))
    write_mnist(run, Path("out"))     # fig1.png, summary.json, table.md, the trained nets
    run, report = mnist_experiment(data, cfg, "out")   # both, and the report of `bngraph reproduce mnist`

It trains the paper's MLP (`zoo:mnist-mlp`) and the same net after `bngraph.insert`, from the same
initial weights and on the same batches. The nets are small enough that bookkeeping, not
arithmetic, costs the time, so they go to `bngraph.training.fused_mlp` (hand-written gradients,
all nets of a process stacked) with one process per core (`bngraph.reproduce.workers`). Seeds
stack the same way.

One module past 300 lines: the experiment's settings, its training loop, its summary, table and
writer read the same record of a run (`MnistRun`), and change together when the paper's
measurements do.
"""

from __future__ import annotations

import functools
import json
import math
import queue
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bngraph.insert import insert
from bngraph.artifacts import save
from bngraph.atomic import REPRODUCE, write_dir_atomically
from bngraph.errors import CheckFailed, UserError
from bngraph.report import Report
from bngraph.reproduce.tables import cell, first_step_reaching
from bngraph.reproduce.workers import MnistProgress, Workers, cpu_processes, train_here
from bngraph.training.config import pick_device
from bngraph.training.data import UINT8_SCALE, EpochSampler, TensorData, check_model_fits
from bngraph.training.fused_mlp import NonzeroPixels, StackedMLP, feature_order, prefix_widths
from bngraph.training.plots import plot_fig1
from bngraph.zoo import create_model, get_entry

MNIST_NETS = ("without BN", "with BN")


# Weights drawn from N(0, std^2) reach 8 std among the MLP's ~10^5: finite in float32 below this.
_LARGEST_STD = float(np.finfo(np.float32).max) / 8


@dataclass(frozen=True)
class MnistConfig:
    """The settings of `reproduce_mnist`; the defaults are the paper's (Sec. 4.1)."""

    steps: int = 50_000  # Sec. 4.1
    batch_size: int = 60  # Sec. 4.1
    lr: float = 0.5
    eval_every: int = 500
    seeds: int = 1
    seed: int = 0  # the first seed; the others follow it
    init_std: float | None = 0.01  # "small random Gaussian values"; None: PyTorch's default
    track_unit: int = 0  # which sigmoid of the last hidden layer Figure 1(b, c) follows
    workers: int | None = None  # processes; None: one per core, at most one per net
    device: str = "auto"  # a GPU trains every net in one process; else CPU processes

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "seeds"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.batch_size < 2:  # the BN net's variance of one value: NaN statistics, and a NaN table
            raise UserError(f"--batch-size must be at least 2 (a BatchNorm's variance needs two values), not "
                            f"{self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1, not {self.workers}")
        if not 0 < self.lr < math.inf:
            raise UserError(f"--lr must be a positive number, not {self.lr}")
        if self.init_std is not None and not 0 < self.init_std < _LARGEST_STD:
            # Beyond float32 (inf, 1e39) the weights were inf, and the refusal spoke of outputs NaN everywhere.
            raise UserError(f"--init-std must be a positive number that float32 weights can hold (below "
                            f"{_LARGEST_STD:.0e}), not {self.init_std}")
        if not 0 <= self.track_unit < 100:
            raise UserError(f"--unit must be one of the 100 units of the last hidden layer, not {self.track_unit}")


def mnist_nets(seed: int, init_std: float | None) -> tuple[nn.Module, nn.Module]:
    """The paper's MLP and, from the same initial weights (bias aside), its BN version."""
    torch.manual_seed(seed)
    plain = create_model("mnist-mlp", seed=seed, init_std=init_std)
    bn_net, _ = insert(plain, [torch.zeros(get_entry("mnist-mlp").input_shape)])
    return plain, bn_net


@dataclass(frozen=True)
class _Widths:
    """The images reordered so that a step's first layer reads only the features its batch uses
    (see `bngraph.training.fused_mlp`): made once, in this process, and shared with the workers."""

    order: torch.Tensor  # the training images' `feature_order`: the data's images are flat and in it
    train: torch.Tensor  # each training image's `prefix_widths`

    @classmethod
    def reorder(cls, data: TensorData) -> tuple[TensorData, _Widths]:
        order = feature_order(data.x_train.flatten(1))
        x_train, x_test = (x.flatten(1).index_select(1, order) for x in (data.x_train, data.x_test))
        return replace(data, x_train=x_train, x_test=x_test), cls(order, prefix_widths(x_train))


def _batches(net_seeds, x_train, y_train, train_widths: torch.Tensor | None, cfg: MnistConfig):
    """Each step's (x, y, width) for nets drawing batches with `net_seeds` (see `StackedMLP.step`).

    With one seed every net takes the same batch, and each epoch's labels and batch widths are
    gathered once per epoch: a step gathers only its images (three ops fewer a step)."""
    device = x_train.device
    samplers = {s: EpochSampler(len(x_train), cfg.batch_size, s, device) for s in dict.fromkeys(net_seeds)}
    if len(samplers) > 1:
        rows = [list(samplers).index(s) for s in net_seeds]  # which sampler each net draws from
        for step in range(cfg.steps):
            index = torch.stack([sampler(step) for sampler in samplers.values()])[rows]
            width = None if train_widths is None else int(train_widths[index].max())
            yield x_train[index], y_train[index], width
        return
    (sampler,) = samplers.values()
    for step in range(cfg.steps):
        epoch, i = divmod(step, sampler.steps_per_epoch)
        if i == 0:
            epoch_batches = sampler.epoch(epoch)
            epoch_labels = y_train[epoch_batches]
            epoch_widths = None if train_widths is None else train_widths[epoch_batches].amax(1).tolist()
        index = epoch_batches[i]
        yield x_train.index_select(0, index), epoch_labels[i], None if epoch_widths is None else epoch_widths[i]


def _train_stack(models, net_seeds, data: TensorData, cfg: MnistConfig, report: Callable, *,
                 widths: _Widths | None = None, send_state=None, evaluate_for=None,
                 poll: Callable = lambda: None) -> dict:
    """Train `models` as one StackedMLP, evaluating every `eval_every` steps. With `widths`, the
    data is as `_Widths.reorder` left it, a step's first layer reads only what its batch uses, and
    an evaluation's reads the test images' `NonzeroPixels`.

    With `send_state` (a queue), the evaluations are another process's job: the stack's state
    goes there instead. With `evaluate_for` = (models, queue, report), this process also
    evaluates those models' states as they come, between its own steps and after them.
    `poll` runs at each evaluation and while waiting for states (it raises if a worker failed)."""
    torch.set_flush_denormal(True)  # saturated sigmoids make denormals, 2x slower on x86
    device = data.x_train.device
    x_train, x_test, y_test = data.x_train.flatten(1), data.x_test.flatten(1), data.y_test
    input_order = None if widths is None else widths.order
    if widths is not None and send_state is None:  # this process evaluates
        x_test = NonzeroPixels.of(x_test)
    stack = StackedMLP(models, device, input_order)
    if evaluate_for is not None:
        other_models, states, other_report = evaluate_for
        shadow = StackedMLP(other_models, device, input_order)
        offloaded = {"accuracy": [], "quantiles": []}

        def evaluate_states(until: int | None) -> None:
            """Evaluate the states waiting; with `until`, wait for that many in all."""
            while until is None or len(offloaded["accuracy"]) < until:
                try:
                    step, state = states.get(block=until is not None, timeout=1.0)
                except queue.Empty:
                    if until is None:
                        return
                    poll()
                    continue
                shadow.load_state(state)
                acc, q = shadow.evaluate(x_test, y_test, track_unit=cfg.track_unit)
                offloaded["accuracy"].append(acc.tolist())
                offloaded["quantiles"].append(q.tolist())
                other_report(step, acc.tolist())
    batches = _batches(net_seeds, x_train, data.y_train, None if widths is None else widths.train, cfg)
    steps, accuracy, quantiles = [], [], []
    started = time.perf_counter()
    for step, (x, y, width) in enumerate(batches):
        stack.step(x, y, cfg.lr, width)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            # The fused step computes no loss; non-finite weights are the same fact, and cost
            # nothing next to the evaluation.
            if not all(bool(torch.isfinite(w).all()) for w in stack.weights):
                raise CheckFailed(
                    f"training diverged: the weights are not finite at step {step + 1} (--lr {cfg.lr:g}); lower --lr"
                )
            steps.append(step + 1)
            poll()
            if send_state is not None:  # a copy: the queue pickles it later, in another thread
                send_state.put((step + 1, [t.cpu().numpy().copy() for t in stack.state()]))
                continue
            acc, q = stack.evaluate(x_test, y_test, track_unit=cfg.track_unit)
            accuracy.append(acc.tolist())
            quantiles.append(q.tolist())
            report(step + 1, acc.tolist())
            if evaluate_for is not None:
                evaluate_states(None)
    result = {}
    if evaluate_for is not None:
        evaluate_states(len(steps))  # the other process runs the same schedule
        result["offloaded"] = {"accuracy": np.asarray(offloaded["accuracy"]).T.tolist(),
                               "quantiles": np.asarray(offloaded["quantiles"]).transpose(1, 0, 2).tolist()}
    wall_s = time.perf_counter() - started
    stack.write_back(models)
    return {
        **result,
        "steps": steps,
        "accuracy": np.asarray(accuracy).T.tolist() if accuracy else None,  # [net][evaluation]
        "quantiles": np.asarray(quantiles).transpose(1, 0, 2).tolist() if quantiles else None,  # [net][evaluation][3]
        # numpy, not tensors: a tensor crosses processes as a file descriptor that dies with
        # the worker, which may exit before the parent has read it.
        "state_dicts": [{k: v.numpy().copy() for k, v in m.state_dict().items()} for m in models],
        "train_s": wall_s,
    }


@dataclass
class MnistRun:
    config: MnistConfig
    steps: list[int]
    accuracy: dict[str, np.ndarray]  # net -> [seed, evaluation]
    quantiles: dict[str, np.ndarray]  # net -> [seed, evaluation, 3]
    models: dict[str, list[nn.Module]]  # net -> one trained module per seed
    wall_s: float
    train_s: float
    workers: int
    data: str = ""
    summary: dict = field(default_factory=dict)
    data_format: str = "mnist-idx"
    input_scale: str | None = UINT8_SCALE  # how stored images became the nets' inputs (TensorData's)


def reproduce_mnist(data: TensorData, cfg: MnistConfig, *, progress: bool = True,
                    workers: Workers | None = None) -> MnistRun:
    """Train both nets for every seed and summarize (see `mnist_summary`). `workers`: processes
    the caller started early (`Workers(cpu_processes(cfg.workers, cfg.seeds) - 1)`); by default,
    or where their number is not the one this run needs (a GPU trains every net here), they
    are started here."""
    started = time.perf_counter()
    read_as = {"data_format": data.format, "input_scale": data.input_scale}  # before the copies below drop them
    device = pick_device(cfg.device)
    if device.type != "cpu":
        data = TensorData(*(t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test)),
                          data.name, data.source)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    net_seeds = seeds + seeds  # all plain nets, then all BN nets
    processes = 1 if device.type != "cpu" else cpu_processes(cfg.workers, cfg.seeds)
    if workers is None or len(workers) != processes - 1:
        workers = Workers(processes - 1)
    with MnistProgress(progress, cfg.steps) as bar, workers:
        pairs = [mnist_nets(s, cfg.init_std) for s in seeds]
        check_model_fits(pairs[0][0], data)  # data the MLP cannot take: one line, before any training
        widths = None
        if device.type == "cpu":  # on a GPU, each batch's width would cost a sync: it reads everything
            data, widths = _Widths.reorder(data)
        train_stack = functools.partial(_train_stack, widths=widths)
        nets = [p[0] for p in pairs] + [p[1] for p in pairs]
        bounds = np.linspace(0, len(nets), processes + 1).round().astype(int)
        chunks = [(nets[a:b], net_seeds[a:b]) for a, b in zip(bounds, bounds[1:])]
        if processes == 1:
            results = [train_here(train_stack, nets, net_seeds, data, cfg, lambda s, acc: bar.update(0, s, acc))]
        else:
            results = workers.run(train_stack, chunks, data, cfg, bar.update)
    for (models, _), result in zip(chunks, results):
        for model, state in zip(models, result["state_dicts"]):
            model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    accuracy = np.concatenate([np.asarray(r["accuracy"]) for r in results])
    quantiles = np.concatenate([np.asarray(r["quantiles"]) for r in results])
    S = len(seeds)
    run = MnistRun(
        config=cfg,
        steps=results[0]["steps"],
        accuracy={"without BN": accuracy[:S], "with BN": accuracy[S:]},
        quantiles={"without BN": quantiles[:S], "with BN": quantiles[S:]},
        models={"without BN": nets[:S], "with BN": nets[S:]},
        wall_s=time.perf_counter() - started,
        train_s=max(r["train_s"] for r in results),
        workers=processes,
        data=f"{data.name} ({data.source})", **read_as,
    )
    run.summary = mnist_summary(run)
    return run


def _speedup(steps, plain, bn) -> dict:
    target = float(np.max(plain))
    plain_steps = first_step_reaching(steps, plain, target)
    bn_steps = first_step_reaching(steps, bn, target)
    return {
        "target_accuracy": target,
        "steps_without_bn": plain_steps,
        "steps_with_bn": bn_steps,
        "speedup": None if bn_steps is None else plain_steps / bn_steps,
    }


def mnist_summary(run: MnistRun) -> dict:
    """Best accuracies, curves and speedup (the steps the plain net needs to reach its best test
    accuracy over the steps the BN net needs to reach the same), on the seed-mean curves and
    per seed; and whether the BN net is ahead at every evaluation."""
    plain, bn = run.accuracy["without BN"], run.accuracy["with BN"]
    per_seed = [_speedup(run.steps, p, b) for p, b in zip(plain, bn)]
    mean = _speedup(run.steps, plain.mean(0), bn.mean(0))
    ahead = bn > plain
    return {
        "experiment": "mnist",
        "config": asdict(run.config),
        "data": run.data,
        "steps": run.steps,
        "nets": {
            name: {
                "best_test_accuracy": float(run.accuracy[name].mean(0).max()),
                "best_test_accuracy_per_seed": run.accuracy[name].max(1).tolist(),
                "final_test_accuracy": float(run.accuracy[name].mean(0)[-1]),
                "test_accuracy": run.accuracy[name].mean(0).tolist(),
                "test_accuracy_per_seed": run.accuracy[name].tolist(),
            }
            for name in MNIST_NETS
        },
        **mean,
        "speedup_per_seed": [s["speedup"] for s in per_seed],
        "bn_ahead_at_every_evaluation": bool(ahead.all()),
        "evaluations_bn_ahead": int(ahead.all(0).sum()),
        "evaluations": len(run.steps),
        "wall_s": round(run.wall_s, 2),
        "train_s": round(run.train_s, 2),
        "workers": run.workers,
    }


def mnist_table(summary: dict) -> str:
    nets = summary["nets"]
    rows = [
        "| net | best test accuracy | final test accuracy | steps to reach the plain net's best |",
        "|---|---|---|---|",
    ]
    for name, key in (("without BN", "steps_without_bn"), ("with BN", "steps_with_bn")):
        rows.append(
            f"| {name} | {nets[name]['best_test_accuracy']:.2%} | {nets[name]['final_test_accuracy']:.2%} "
            f"| {cell(summary[key], 'd')} |"
        )
    seeds = summary["config"]["seeds"]
    # Counted where it is ahead in every seed (`evaluations_bn_ahead`), not on the mean curves.
    ahead = f"{summary['evaluations_bn_ahead']} of {summary['evaluations']} evaluations" + \
        (f" in each of the {seeds} seeds" if seeds > 1 else "")
    # With seeds, the figures are the seed-mean curves': each seed's own speed-up beside them.
    each = (f" on the seed-mean curves (each seed's: {', '.join(f'{cell(s)}x' for s in summary['speedup_per_seed'])})"
            if seeds > 1 else "")
    return "\n".join(rows) + (
        f"\n\nSpeed-up (steps to {summary['target_accuracy']:.2%}): {cell(summary['speedup'])}x{each}. "
        f"The BN net is ahead at {ahead}. {summary['config']['steps']} steps, batch "
        f"{summary['config']['batch_size']}, {summary['config']['seeds']} seed(s), {summary['wall_s']:.1f} s.\n"
    )


def write_mnist(run: MnistRun, out: Path, *, save_models: bool = True, force: bool = False) -> Path:
    """OUT/fig1.png, summary.json, table.md and models/{mnist-mlp,mnist-mlp-bn} (first seed).

    `force` replaces an old reproduce folder at `out` (nothing else: see bngraph.atomic)."""
    def write(folder: Path) -> None:
        plot_fig1(run.steps, run.accuracy, {k: v[0] for k, v in run.quantiles.items()}, folder / "fig1.png",
                  unit=run.config.track_unit, seeds=run.config.seeds)
        (folder / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n", encoding="utf-8")
        (folder / "table.md").write_text(mnist_table(run.summary), encoding="utf-8")
        if save_models:
            (folder / "models").mkdir()
            example = [torch.zeros(get_entry("mnist-mlp").input_shape)]
            # What the nets take, as train records it (MNIST's uint8 pixels / 255).
            entry = {"command": "reproduce mnist", "config": asdict(run.config), "data": run.data,
                     "data_format": run.data_format, "input_scale": run.input_scale}
            for name, folder_name in (("without BN", "mnist-mlp"), ("with BN", "mnist-mlp-bn")):
                save(run.models[name][0], folder / "models" / folder_name, example_inputs=example,
                     history=[entry], source="zoo:mnist-mlp")

    return write_dir_atomically(out, write, kind=REPRODUCE, force=force)


def mnist_experiment(data: TensorData, cfg: MnistConfig, output: str, *, progress: bool = True,
                     force: bool = False, workers: Workers | None = None) -> tuple[MnistRun, Report]:
    """`bngraph reproduce mnist`: both nets trained (`reproduce_mnist`), written to `output`
    (`write_mnist`), and the report: each net's accuracies and steps to the plain net's best, the
    speed-up."""
    run = reproduce_mnist(data, cfg, progress=progress, workers=workers)
    write_mnist(run, Path(output), force=force)
    summary = run.summary
    facts = {
        "data": summary["data"],
        "speedup": summary["speedup"],
        "bn_ahead_at_every_evaluation": summary["bn_ahead_at_every_evaluation"],
        "wall_s": summary["wall_s"],
        "output": output,
    }
    rows = [
        {"net": name, "best_test_accuracy": net["best_test_accuracy"],
         "final_test_accuracy": net["final_test_accuracy"],
         "steps_to_target": summary["steps_without_bn" if name == "without BN" else "steps_with_bn"]}
        for name, net in summary["nets"].items()
    ]
    notes = [f"target: the plain net's best test accuracy, {summary['target_accuracy']:.4f}"]
    if cfg.seeds > 1:  # as table.md says it: the figures are the seed-mean curves', each seed's speed-up beside them
        facts["speedup_per_seed"] = summary["speedup_per_seed"]
        notes.append(f"the accuracies and the speed-up are those of the accuracy curves averaged over the {cfg.seeds} "
                     "seeds; speedup_per_seed has each seed's own")
    return run, Report("bngraph reproduce mnist", sections={"results": rows}, facts=facts, notes=notes)
