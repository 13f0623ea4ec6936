"""The paper's experiments: MNIST (Sec. 4.1, Figure 1) and the Inception variants (Sec. 4.2.2).

    run = reproduce_mnist(data, MnistConfig(steps=10_000))
    write_mnist(run, Path("out"))     # fig1.png, summary.json, table.md, the trained nets

MNIST trains the paper's MLP (`zoo:mnist-mlp`) and the same net after `bngraph.insert`, from
the same initial weights and on the same batches. The nets are small enough that bookkeeping,
not arithmetic, costs the time, so they go to `bngraph.fused_mlp` (hand-written gradients, all
nets of a process stacked) with one process per core, each single-threaded: at batch 60 a
second thread buys less than it costs. Seeds stack the same way.
Inception trains each variant with `bngraph.train` after `bngraph.recipes` builds it.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bngraph.errors import CheckFailed, UserError
from bngraph.train import EpochSampler, TensorData

MNIST_NETS = ("without BN", "with BN")


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
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, not {self.lr}")
        if self.init_std is not None and not self.init_std > 0:
            raise UserError(f"--init-std must be positive, not {self.init_std}")
        if not 0 <= self.track_unit < 100:
            raise UserError(f"--unit must be one of the 100 units of the last hidden layer, not {self.track_unit}")


def mnist_nets(seed: int, init_std: float | None) -> tuple[nn.Module, nn.Module]:
    """The paper's MLP and, from the same initial weights (bias aside), its BN version."""
    from bngraph.api import insert
    from bngraph.zoo import create_model, get_entry

    torch.manual_seed(seed)
    plain = create_model("mnist-mlp", init_std=init_std)
    bn_net, _ = insert(plain, [torch.zeros(get_entry("mnist-mlp").input_shape)])
    return plain, bn_net


# --- training, in worker processes --------------------------------------------------------


def _train_stack(models, net_seeds, data: TensorData, cfg: MnistConfig, report: Callable, *,
                 send_state=None, evaluate_for=None, poll: Callable = lambda: None) -> dict:  # fmt: skip
    """Train `models` as one StackedMLP, evaluating every `eval_every` steps.

    With `send_state` (a queue), the evaluations are another process's job: the stack's state
    goes there instead. With `evaluate_for` = (models, queue, report), this process also
    evaluates those models' states as they come, between its own steps and after them.
    `poll` runs at each evaluation and while waiting for states (it raises if a worker failed)."""
    from bngraph.fused_mlp import StackedMLP

    torch.set_flush_denormal(True)  # saturated sigmoids make denormals, 2x slower on x86
    device = data.x_train.device
    stack = StackedMLP(models, device)
    if evaluate_for is not None:
        other_models, states, other_report = evaluate_for
        shadow = StackedMLP(other_models, device)
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
                acc, q = shadow.evaluate(data.x_test, data.y_test, track_unit=cfg.track_unit)
                offloaded["accuracy"].append(acc.tolist())
                offloaded["quantiles"].append(q.tolist())
                other_report(step, acc.tolist())
    x_train = data.x_train.flatten(1)
    samplers = {s: EpochSampler(len(x_train), cfg.batch_size, s, device) for s in dict.fromkeys(net_seeds)}
    rows = [list(samplers).index(s) for s in net_seeds]  # which sampler each net draws from
    steps, accuracy, quantiles = [], [], []
    started = time.perf_counter()
    for step in range(cfg.steps):
        if len(samplers) == 1:  # one batch for every net: no copy per net
            index = next(iter(samplers.values()))(step)
            x, y = x_train.index_select(0, index), data.y_train.index_select(0, index)
        else:
            index = torch.stack([sampler(step) for sampler in samplers.values()])[rows]
            x, y = x_train[index], data.y_train[index]
        stack.step(x, y, cfg.lr)
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
            acc, q = stack.evaluate(data.x_test, data.y_test, track_unit=cfg.track_unit)
            accuracy.append(acc.tolist())
            quantiles.append(q.tolist())
            report(step + 1, acc.tolist())
            if evaluate_for is not None:
                evaluate_states(None)
    result = {}
    if evaluate_for is not None:
        evaluate_states(len(steps))  # the other process runs the same schedule
        result["offloaded"] = {"accuracy": np.asarray(offloaded["accuracy"]).T.tolist(),
                               "quantiles": np.asarray(offloaded["quantiles"]).transpose(1, 0, 2).tolist()}  # fmt: skip
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


def _worker(rank, models, net_seeds, data, cfg, messages, send_state=None, evaluate_for=None) -> None:
    torch.set_num_threads(1)
    try:
        if evaluate_for is not None:
            other_models, states, other_rank = evaluate_for
            evaluate_for = (other_models, states, lambda step, acc: messages.put(("eval", other_rank, step, acc)))
        result = _train_stack(models, net_seeds, data, cfg, lambda step, acc: messages.put(("eval", rank, step, acc)),
                              send_state=send_state, evaluate_for=evaluate_for)  # fmt: skip
        messages.put(("done", rank, result))
        # This process ends next, and Python's exit would walk every object torch made (~1 s on
        # one core, while the other trains or writes); frozen, they are left to the OS.
        gc.freeze()
    except CheckFailed as err:
        messages.put(("check_failed", rank, str(err)))
    except BaseException:  # noqa: BLE001 (the parent re-raises it with this text)
        messages.put(("error", rank, traceback.format_exc()))


def _run_workers(chunks, data: TensorData, cfg: MnistConfig, on_eval: Callable) -> list[dict]:
    """Chunk 0 trains in this process, which has torch loaded already, and each other chunk in a
    process of its own, started first; their messages drive `on_eval`, their results return."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch has started its threads can hang
    messages = ctx.Queue()
    shared = TensorData(*(t.share_memory_() for t in (data.x_train, data.y_train, data.x_test, data.y_test)))
    # Two processes hold the plain nets and the BN nets; BN's steps cost more (~1.2x on one
    # core), so the plain process (this one) also evaluates the BN nets, on states the other sends.
    offload = len(chunks) == 2
    states = ctx.Queue() if offload else None
    extra = [{"evaluate_for": (chunks[1][0], states, 1)}, {"send_state": states}] if offload else [{}] * len(chunks)
    procs = {
        rank: ctx.Process(target=_worker, args=(rank, models, seeds, shared, cfg, messages), kwargs=extra[rank], daemon=True)
        for rank, (models, seeds) in enumerate(chunks)
        if rank > 0
    }
    for p in procs.values():
        p.start()
    results: dict[int, dict] = {}

    def poll(block: bool = False) -> None:
        """Handle the workers' messages waiting (with `block`, at least one); raise if one failed or died."""
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
                return
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
        models, seeds = chunks[0]
        evaluate_for = (chunks[1][0], states, lambda step, acc: on_eval(1, step, acc)) if offload else None
        results[0] = _train_here(models, seeds, shared, cfg, lambda step, acc: on_eval(0, step, acc),
                                 evaluate_for=evaluate_for, poll=poll)  # fmt: skip
        while len(results) < len(chunks):
            poll(block=True)
    finally:
        for rank, p in procs.items():  # one that sent its result exits on its own (reaped at exit)
            if rank not in results and p.is_alive():
                p.terminate()
                p.join(timeout=10)
    if offload:
        results[1].update(results[0].pop("offloaded"))
    return [results[i] for i in range(len(chunks))]


def _train_here(*args, **kwargs) -> dict:
    """`_train_stack` in this process, single-threaded as the workers are (at batch 60 a second
    thread buys less than it costs), with torch's settings restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_stack(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


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


def reproduce_mnist(data: TensorData, cfg: MnistConfig, *, progress: bool = True) -> MnistRun:
    """Train both nets for every seed and summarize (see `mnist_summary`)."""
    from bngraph.train import pick_device

    started = time.perf_counter()
    device = pick_device(cfg.device)
    if device.type != "cpu":
        data = TensorData(*(t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test)),
                          data.name, data.source)  # fmt: skip
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    pairs = [mnist_nets(s, cfg.init_std) for s in seeds]
    nets = [p[0] for p in pairs] + [p[1] for p in pairs]  # all plain nets, then all BN nets
    net_seeds = seeds + seeds
    workers = 1 if device.type != "cpu" else min(cfg.workers or os.cpu_count() or 1, len(nets))
    bounds = np.linspace(0, len(nets), workers + 1).round().astype(int)
    chunks = [(nets[a:b], net_seeds[a:b]) for a, b in zip(bounds, bounds[1:])]

    with _Progress(progress, cfg.steps) as bar:
        if workers == 1:
            results = [_train_here(nets, net_seeds, data, cfg, lambda s, acc: bar.update(0, s, acc))]
        else:
            results = _run_workers(chunks, data, cfg, bar.update)
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
        workers=workers,
        data=f"{data.name} ({data.source})",
    )
    run.summary = mnist_summary(run)
    return run


class _Progress:
    """A rich bar over steps, with each net's latest test accuracy (workers report evaluations)."""

    def __init__(self, enabled: bool, steps: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]reproduce mnist"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[acc]}"), TextColumn("{task.fields[rate]} steps/s"), TimeElapsedColumn(),
            console=Console(file=sys.stderr), disable=not enabled,
        )  # fmt: skip
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


# --- summaries, tables, figures -------------------------------------------------------------


def first_step_reaching(steps: Sequence[int], curve: Sequence[float], target: float) -> int | None:
    hits = [s for s, a in zip(steps, curve) if a >= target - 1e-12]
    return hits[0] if hits else None


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


def _fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def mnist_table(summary: dict) -> str:
    nets = summary["nets"]
    rows = [
        "| net | best test accuracy | final test accuracy | steps to reach the plain net's best |",
        "|---|---|---|---|",
    ]
    for name, key in (("without BN", "steps_without_bn"), ("with BN", "steps_with_bn")):
        rows.append(
            f"| {name} | {nets[name]['best_test_accuracy']:.2%} | {nets[name]['final_test_accuracy']:.2%} "
            f"| {_fmt(summary[key], 'd')} |"
        )
    ahead = f"{summary['evaluations_bn_ahead']} of {summary['evaluations']}"
    return "\n".join(rows) + (
        f"\n\nSpeed-up (steps to {summary['target_accuracy']:.2%}): {_fmt(summary['speedup'])}x. "
        f"The BN net is ahead at {ahead} evaluations. {summary['config']['steps']} steps, batch "
        f"{summary['config']['batch_size']}, {summary['config']['seeds']} seed(s), {summary['wall_s']:.1f} s.\n"
    )


def write_mnist(run: MnistRun, out: Path, *, save_models: bool = True, force: bool = False) -> Path:
    """OUT/fig1.png, summary.json, table.md and models/{mnist-mlp,mnist-mlp-bn} (first seed).

    `force` replaces an old reproduce folder at `out` (nothing else: see bngraph.atomic)."""
    from bngraph.artifacts import save
    from bngraph.atomic import REPRODUCE, write_dir_atomically
    from bngraph.plots import plot_fig1
    from bngraph.zoo import get_entry

    def write(folder: Path) -> None:
        plot_fig1(run.steps, run.accuracy, {k: v[0] for k, v in run.quantiles.items()}, folder / "fig1.png",
                  unit=run.config.track_unit, seeds=run.config.seeds)  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n")
        (folder / "table.md").write_text(mnist_table(run.summary))
        if save_models:
            (folder / "models").mkdir()
            example = [torch.zeros(get_entry("mnist-mlp").input_shape)]
            entry = {"command": "reproduce mnist", "config": asdict(run.config)}
            for name, folder_name in (("without BN", "mnist-mlp"), ("with BN", "mnist-mlp-bn")):
                save(run.models[name][0], folder / "models" / folder_name, example_inputs=example,
                     history=[entry], source="zoo:mnist-mlp")  # fmt: skip

    return write_dir_atomically(out, write, kind=REPRODUCE, force=force)


# --- Inception (Sec. 4.2.2) ------------------------------------------------------------------


@dataclass(frozen=True)
class InceptionConfig:
    """The settings of `reproduce_inception`: which variants (recipes), and a CPU-sized run."""

    variants: tuple[str, ...] = ("inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid")
    steps: int = 1000
    batch_size: int = 32  # Sec. 4.2
    lr: float = 0.0015  # Inception's; the recipes scale it
    momentum: float = 0.9
    weight_decay: float = 4e-5
    lr_decay: float = 0.94
    decay_every: float | None = None  # None: an eighth of the run, for the plain Inception
    eval_every: int | None = None  # None: a tenth of the run
    test_examples: int = 2000  # evaluations use this many test images
    seed: int = 0
    full: bool = False  # zoo:inception (224x224x3) instead of zoo:inception-small
    device: str = "auto"

    def __post_init__(self):
        from bngraph.recipes import get_recipe

        for name in self.variants:
            get_recipe(name)
        if not self.variants:
            raise UserError("--variants names no variant")
        for name in ("steps", "batch_size", "test_examples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")


def inception_model(full: bool) -> nn.Module:
    """zoo:inception-small for 28x28x1 images; with `full`, the paper's 224x224 Inception with a
    one-channel stem and 10 classes, behind an upsampling of the 28x28 images.

    Conv and linear weights are drawn He-normal (fan-in, ReLU gain). PyTorch's default draws them
    for a gain of 1/sqrt(3), so the signal shrinks by ~2.4x at each of Inception's ~20 layers and
    the plain net does not start learning within a CPU budget; the paper's Inception trained
    from a scale that kept its signal. Every variant starts from the same weights (BN aside)."""
    from collections import OrderedDict

    from bngraph.zoo import create_model

    model = create_model("inception-small")
    if full:
        model = nn.Sequential(
            OrderedDict(
                upsample=nn.Upsample(size=(224, 224), mode="bilinear", align_corners=False),
                inception=create_model("inception", num_classes=10, in_channels=1),
            )
        )
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                if layer.bias is not None:
                    layer.bias.zero_()
    return model


@dataclass
class InceptionRun:
    config: InceptionConfig
    metrics: dict[str, list[dict]]  # variant -> train's metrics rows
    models: dict[str, nn.Module]
    facts: dict[str, dict]  # variant -> hyperparameters and graph facts
    wall_s: float
    data: str = ""
    summary: dict = field(default_factory=dict)


def graph_facts(model: nn.Module) -> dict:
    """What the paper says each variant has: BN count, activation kinds, dropout, LRN."""
    from bngraph.train import nonlinearity_names

    kinds = sorted({type(model.get_submodule(n)).__name__ for n in nonlinearity_names(model)})
    count = lambda kind: sum(isinstance(m, kind) for m in model.modules())  # noqa: E731
    return {
        "batchnorms": count(nn.modules.batchnorm._BatchNorm),
        "activations": kinds,
        "dropout": count(nn.modules.dropout._DropoutNd),
        "lrn": count(nn.LocalResponseNorm),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def reproduce_inception(data: TensorData, cfg: InceptionConfig, *, progress: bool = True) -> InceptionRun:
    """Build each variant by its recipe and train it on `data` (the same initial weights)."""
    from bngraph.recipes import apply_recipe, get_recipe
    from bngraph.train import TrainConfig, train

    started = time.perf_counter()
    n_test = min(cfg.test_examples, len(data.x_test))
    subset = TensorData(data.x_train, data.y_train, data.x_test[:n_test], data.y_test[:n_test], data.name, data.source)
    decay_every = cfg.decay_every or cfg.steps / 8
    eval_every = cfg.eval_every or max(1, cfg.steps // 10)
    example = [data.x_train[:2].cpu()]
    metrics, models, facts = {}, {}, {}
    for name in cfg.variants:
        recipe = get_recipe(name)
        torch.manual_seed(cfg.seed)  # every variant starts from the same weights
        model, _ = apply_recipe(inception_model(cfg.full), recipe, example)
        hyper = recipe.scale(lr=cfg.lr, weight_decay=cfg.weight_decay, decay_every=decay_every)
        config = TrainConfig(
            steps=cfg.steps, batch_size=cfg.batch_size, lr=hyper["lr"], momentum=cfg.momentum,
            weight_decay=hyper["weight_decay"], lr_decay=cfg.lr_decay, decay_every=hyper["decay_every"],
            seed=cfg.seed, eval_every=eval_every,
        )  # fmt: skip
        facts[name] = {"paper_name": recipe.paper_name, **graph_facts(model), **hyper}
        run = train(model, subset, config, device=cfg.device, progress=progress, label=recipe.paper_name)
        metrics[name], models[name] = run.metrics, run.model
        facts[name]["train_s"] = round(run.wall_s, 2)
        # Rates of the windows between evaluations (evaluation excluded); the median drops the
        # first window's warm-up (cuDNN autotuning, allocations).
        facts[name]["images_per_s"] = round(float(np.median([r["steps_per_s"] for r in run.metrics])) * cfg.batch_size, 1)
    run = InceptionRun(cfg, metrics, models, facts, time.perf_counter() - started, f"{data.name} ({data.source})")
    run.summary = inception_summary(run)
    return run


def inception_summary(run: InceptionRun) -> dict:
    """The paper's Figure 3 table: steps to reach Inception's best accuracy, each best accuracy."""
    reference = None
    if "inception" in run.metrics:
        reference = max(row["test_accuracy"] for row in run.metrics["inception"])
    variants = {}
    for name, rows in run.metrics.items():
        steps, acc = [r["step"] for r in rows], [r["test_accuracy"] for r in rows]
        variants[name] = {
            **run.facts[name],
            "best_test_accuracy": max(acc),
            "steps_to_reference": None if reference is None else first_step_reaching(steps, acc, reference),
            "steps": steps,
            "test_accuracy": acc,
        }
    rate = {name: run.facts[name].get("images_per_s") for name in run.metrics}
    step_time_ratio = None  # what BN costs per step: BN-Baseline's step time over Inception's
    if rate.get("inception") and rate.get("bn-baseline"):
        step_time_ratio = round(rate["inception"] / rate["bn-baseline"], 3)
    return {
        "experiment": "inception",
        "config": asdict(run.config),
        "data": run.data,
        "bn_baseline_step_time_ratio": step_time_ratio,
        "reference_accuracy": reference,
        "variants": variants,
        "wall_s": round(run.wall_s, 2),
    }


def inception_table(summary: dict) -> str:
    ref = summary["reference_accuracy"]
    head = f"steps to {ref:.2%}" if ref is not None else "steps to Inception's best"
    rows = [f"| model | {head} | max accuracy | lr | BN | activation | dropout | LRN | images/s |", "|---" * 9 + "|"]
    for v in summary["variants"].values():
        rows.append(
            f"| {v['paper_name']} | {_fmt(v['steps_to_reference'], 'd')} | {v['best_test_accuracy']:.2%} "
            f"| {v['lr']:g} | {v['batchnorms']} | {'/'.join(v['activations'])} | {v['dropout']} | {v['lrn']} "
            f"| {_fmt(v.get('images_per_s'), '.0f')} |"
        )
    cfg = summary["config"]
    ratio = summary.get("bn_baseline_step_time_ratio")
    cost = f" BN-Baseline's step time / Inception's: {ratio:.3f}." if ratio else ""
    return "\n".join(rows) + (
        f"\n\n{cfg['steps']} steps of batch {cfg['batch_size']} on {summary['data']}; accuracy on "
        f"{cfg['test_examples']} test images; {summary['wall_s']:.0f} s.{cost}\n"
    )


def write_inception(run: InceptionRun, out: Path, *, force: bool = False) -> Path:
    """OUT/accuracy.png, summary.json, table.md; `force` as for `write_mnist`."""
    from bngraph.atomic import REPRODUCE, write_dir_atomically
    from bngraph.plots import plot_accuracy

    def write(folder: Path) -> None:
        variants = run.summary["variants"]
        plot_accuracy(
            {v["paper_name"]: v["steps"] for v in variants.values()},
            {v["paper_name"]: v["test_accuracy"] for v in variants.values()},
            folder / "accuracy.png",
            title=f"Inception variants on {run.data.split(' ')[0]}",
            reference=run.summary["reference_accuracy"],
        )
        (folder / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n")
        (folder / "table.md").write_text(inception_table(run.summary))

    return write_dir_atomically(out, write, kind=REPRODUCE, force=force)
