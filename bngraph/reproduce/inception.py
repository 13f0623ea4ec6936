"""The paper's Inception experiment (Sec. 4.2.2): each variant built by its recipe
(`bngraph.reproduce.recipes`) and trained with `bngraph.train`, then the paper's table.

    run = reproduce_inception(data, InceptionConfig(steps=1000))
    write_inception(run, Path("out"))     # accuracy.png, summary.json, table.md
    run, report = inception_experiment(data, cfg, "out")   # both, and the report of `bngraph reproduce inception`
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bngraph.atomic import REPRODUCE, write_dir_atomically
from bngraph.errors import UserError
from bngraph.report import Report
from bngraph.reproduce.recipes import apply_recipe, get_recipe
from bngraph.reproduce.tables import cell, first_step_reaching
from bngraph.training.config import TrainConfig
from bngraph.training.data import TensorData, check_model_fits
from bngraph.training.loop import train
from bngraph.training.plots import plot_accuracy
from bngraph.training.track import nonlinearity_names
from bngraph.zoo import create_model


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
    started = time.perf_counter()
    n_test = min(cfg.test_examples, len(data.x_test))
    subset = TensorData(data.x_train, data.y_train, data.x_test[:n_test], data.y_test[:n_test], data.name, data.source)
    base = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        lr_decay=cfg.lr_decay, decay_every=cfg.decay_every or cfg.steps / 8, seed=cfg.seed,
        eval_every=cfg.eval_every or max(1, cfg.steps // 10),
    )  # the plain Inception's; each recipe scales it
    check_model_fits(inception_model(cfg.full), subset)  # data it cannot take: one line, before any training
    example = [data.x_train[:2].cpu()]
    metrics, models, facts = {}, {}, {}
    for name in cfg.variants:
        recipe = get_recipe(name)
        torch.manual_seed(cfg.seed)  # every variant starts from the same weights
        model, _ = apply_recipe(inception_model(cfg.full), recipe, example)
        config = recipe.train_config(base)
        hyper = {"lr": config.lr, "weight_decay": config.weight_decay, "decay_every": config.decay_every}
        facts[name] = {"paper_name": recipe.paper_name, **graph_facts(model), **hyper}
        run = train(model, subset, config, device=cfg.device, progress=progress, label=recipe.paper_name)
        metrics[name], models[name] = run.metrics, run.model
        facts[name]["train_s"] = round(run.wall_s, 2)
        # Rates of the windows between evaluations (evaluation excluded); the median drops the
        # first window's warm-up (cuDNN autotuning, allocations).
        facts[name]["images_per_s"] = round(float(np.median([r["steps_per_s"] for r in run.metrics])) * cfg.batch_size, 1)
    run = InceptionRun(cfg, metrics, models, facts, time.perf_counter() - started, f"{data.name} ({data.source})")
    run.summary = inception_summary(run)
    run.summary["test_images"] = n_test  # what --test-examples asked for, up to what the data holds
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
            f"| {v['paper_name']} | {cell(v['steps_to_reference'], 'd')} | {v['best_test_accuracy']:.2%} "
            f"| {v['lr']:g} | {v['batchnorms']} | {'/'.join(v['activations'])} | {v['dropout']} | {v['lrn']} "
            f"| {cell(v.get('images_per_s'), '.0f')} |"
        )
    cfg = summary["config"]
    ratio = summary.get("bn_baseline_step_time_ratio")
    cost = f" BN-Baseline's step time / Inception's: {ratio:.3f}." if ratio else ""
    return "\n".join(rows) + (
        f"\n\n{cfg['steps']} steps of batch {cfg['batch_size']} on {summary['data']}; accuracy on "
        f"{summary.get('test_images', cfg['test_examples'])} test images; {summary['wall_s']:.0f} s.{cost}\n"
    )


def write_inception(run: InceptionRun, out: Path, *, force: bool = False) -> Path:
    """OUT/accuracy.png, summary.json, table.md; `force` as for `write_mnist`."""
    def write(folder: Path) -> None:
        variants = run.summary["variants"]
        plot_accuracy(
            {v["paper_name"]: v["steps"] for v in variants.values()},
            {v["paper_name"]: v["test_accuracy"] for v in variants.values()},
            folder / "accuracy.png",
            title=f"Inception variants on {run.data.split(' ')[0]}",
            reference=run.summary["reference_accuracy"],
        )
        (folder / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n", encoding="utf-8")
        (folder / "table.md").write_text(inception_table(run.summary), encoding="utf-8")

    return write_dir_atomically(out, write, kind=REPRODUCE, force=force)


def inception_experiment(data: TensorData, cfg: InceptionConfig, output: str, *, progress: bool = True,
                         force: bool = False) -> tuple[InceptionRun, Report]:
    """`bngraph reproduce inception`: every variant trained, written to `output`
    (`write_inception`), and the report: the paper's table as rows."""
    run = reproduce_inception(data, cfg, progress=progress)
    write_inception(run, Path(output), force=force)
    summary = run.summary
    facts = {"data": summary["data"], "reference_accuracy": summary["reference_accuracy"],
             "bn_baseline_step_time_ratio": summary["bn_baseline_step_time_ratio"],
             "wall_s": summary["wall_s"], "output": output}
    rows = [
        {"variant": v["paper_name"], "steps_to_reference": v["steps_to_reference"],
         "best_test_accuracy": v["best_test_accuracy"], "lr": v["lr"], "batchnorms": v["batchnorms"],
         "images_per_s": v["images_per_s"]}
        for v in summary["variants"].values()
    ]
    notes = ["steps_to_reference: steps to reach the plain Inception's best accuracy"]
    return run, Report("bngraph reproduce inception", sections={"results": rows}, facts=facts, notes=notes)
