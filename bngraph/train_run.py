"""`bngraph train`: a loaded model and its data -> a trained run folder, and the report.

    done, report = train_run(loaded, data, Path("runs/mlp"), steps=5000, lr=0.1)

It settles what the command line leaves open (the length from --epochs, --decay-every from the
run being resumed), applies a --recipe (its passes on the model, its scaling of the settings),
and trains through `bngraph.training.run_folder.train_into_folder`. It sits above the training
wing because a recipe builds its variant with `bngraph.insert` (`bngraph.reproduce.recipes`),
which `bngraph.training` does not import; it is not `train.py` because `bngraph.train` names the
API's training function.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bngraph.artifact_code import kept_source, user_code, user_files
from bngraph.artifacts import check_no_global_hooks, save
from bngraph.errors import UserError
from bngraph.load import LoadedModel
from bngraph.report import Report
from bngraph.reproduce.recipes import Recipe, apply_recipe
from bngraph.training.checkpoint import saved_config
from bngraph.training.config import TrainConfig, epochs_to_steps
from bngraph.training.data import StreamData, TensorData, check_model_fits, logits_of
from bngraph.training.data_formats import check_input_scale, with_model_classes
from bngraph.training.distributed import SINGLE, Distributed, from_main
from bngraph.training.run_folder import TrainedFolder, train_into_folder


def train_run(
    loaded: LoadedModel,
    data: TensorData | StreamData,
    out: Path,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 32,
    decay_every: float | None = None,
    recipe: Recipe | None = None,
    sync_bn: bool = False,
    resume: bool = False,
    device: torch.device | str = "auto",
    progress: bool = True,
    distributed: Distributed = SINGLE,
    output: str | Path | None = None,
    **settings: Any,
) -> tuple[TrainedFolder | None, Report | None]:
    """Train `loaded` on `data` into the run folder `out`, and report it; (None, None) on the
    ranks other than 0 (they write and report nothing).

    `steps`, or else `epochs` (default 2) of the global batch (`batch_size` per process).
    `decay_every` defaults to an eighth of the run, or on `resume` to what the run used (its steps
    may grow). `settings` are TrainConfig's other fields; `recipe` scales lr, weight decay and
    the decay period. `output` is the folder as the user named it, for the report (`out` may be
    a folder beside it while --force replaces an old run).
    """
    ctx = distributed
    model, history = loaded.module, list(loaded.history)
    check_no_global_hooks(model)  # before the steps, not when the model is written after them
    data = with_model_classes(data, loaded.classes, model)  # fine-tuning: the model's outputs keep their classes
    check_input_scale(data, loaded.input_scale)
    if steps is None:  # `--epochs 0` is refused by epochs_to_steps, not read as the default
        steps = epochs_to_steps(2 if epochs is None else epochs, data.n_train, batch_size * ctx.world_size)
    example = [data.example(2).cpu()]

    def resumed_decay() -> tuple[bool, float | None]:
        """On `resume` without `decay_every`: (True, the period the run used, its recipe's scaling
        included: scaling it again would refuse the resume as other settings)."""
        saved = saved_config(out) if resume and decay_every is None else None
        return (True, saved["decay_every"]) if isinstance(saved, dict) and "decay_every" in saved else (False, None)

    resumed, saved_decay = from_main(resumed_decay, ctx)  # rank 0 has the checkpoint
    recipe_entry = None
    if recipe is not None:
        model, recipe_entry = apply_recipe(model, recipe, example)
        history.append(recipe_entry)
        if ctx.is_main:  # before the training, not after it: the model the run will write
            _check_savable(model, example, loaded)
    check_model_fits(model, data)
    config = TrainConfig(steps=steps, batch_size=batch_size, decay_every=steps / 8 if decay_every is None
                         else decay_every, **settings)
    if recipe is not None:
        config = recipe.train_config(config)
    grown = None
    if resumed:
        if saved_decay != config.decay_every:  # the run grew: an uninterrupted run of this length decays slower
            grown = (f"the learning rate decays every {saved_decay:g} steps, as the run started; a run of {steps} "
                     f"steps from the start decays every {config.decay_every:g}: --decay-every sets it")
        config = replace(config, decay_every=saved_decay)
    done = train_into_folder(model, data, config, out, history=history, source=loaded.spec.text,
                             example_inputs=example, base=user_code(loaded), carry=user_files(loaded),
                             untraceable_code=kept_source(loaded, "train"), sync_bn=sync_bn, resume=resume,
                             device=str(device), progress=progress, distributed=ctx)
    if done is None:
        return None, None
    report = train_report(loaded.spec.text, recipe, data, config, ctx.world_size, done, Path(output or out), recipe_entry)
    if grown:
        report.notes.append(grown)
    folds = [entry for entry in history if isinstance(entry, dict) and entry.get("command") == "fold"]
    if folds:
        # Folded: its BatchNorms are in its layers' weights now, and it trains without them, and
        # without the dropout the fold took out as an identity at inference.
        left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        stripped = any(row.get("op") != "Identity" for entry in folds
                       for row in entry.get("passes", {}).get("remove_eval_identities", {}).get("details", []))
        report.notes.append(f"{loaded.spec.text} was folded for inference: it trained with "
                            f"{f'the {left} BatchNorm(s) the fold left' if left else 'no BatchNorm'}"
                            f"{' and without the dropout the fold removed' if stripped else ''}; train the model "
                            "from before the fold to train with them")
    return done, report


def _check_savable(model, example, loaded: LoadedModel) -> None:
    """Write the recipe's model into a folder of its own and read it back, as the run will at its
    end: one the artifact code cannot write (BatchNorms wrapped inside a submodule torch.fx kept
    whole) was refused only after all its steps."""
    with tempfile.TemporaryDirectory(prefix="bngraph-recipe-") as folder:
        try:
            save(model, Path(folder) / "model", example_inputs=example, base=user_code(loaded), carry=user_files(loaded))
        except UserError as err:
            raise UserError(f"the recipe's model cannot be written as the run's model ({err}); nothing was trained: "
                            "insert its BatchNorms with `bngraph insert` first, and train that artifact") from err


def train_report(model: str, recipe: Recipe | None, data: TensorData | StreamData, config: TrainConfig,
                 processes: int, done: TrainedFolder, output: Path, recipe_entry: dict | None = None) -> Report:
    """The run's facts, about ten of its evaluations, the SyncBatchNorm conversion if any, and
    what the recipe did to the model (`recipe_changes` of its history entry)."""
    run, sync_bn = done.run, done.sync_bn
    facts = {
        "model": model,
        "recipe": recipe.name if recipe else None,
        "data": f"{data.name} ({data.source})",
        "data_format": data.format,
        "streamed": isinstance(data, StreamData),
        "device": run.device,
        "precision": run.precision,
        "channels_last": run.channels_last,
        "processes": processes,
        "global_batch_size": config.batch_size * processes,
        "sync_bn": sync_bn is not None,
        "sync_batchnorms": len(sync_bn.changed) if sync_bn is not None else None,  # converted to SyncBatchNorm
        "steps": config.steps,
        "resumed_from": run.resumed_from,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "lr_decay_every": config.decay_every,  # steps for each factor lr_decay (None: constant)
        "best_test_accuracy": run.best_test_accuracy,
        "final_test_accuracy": run.metrics[-1]["test_accuracy"],
        "wall_s": round(run.wall_s, 2),
        "output": str(output / done.model_dir.name),
    }
    if done.plot is not None:
        facts["inputs_plot"] = str(output / done.plot.name)
    shown = run.metrics[-1 :: -max(1, len(run.metrics) // 10)][::-1]  # ~10 rows, the last included
    keys = ("step", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "steps_per_s")
    sections = {"evaluations": [{k: row[k] for k in keys} for row in shown]}
    if sync_bn is not None:
        counts = {"changed": len(sync_bn.changed), "skipped": len(sync_bn.skipped)}
        sections["passes"] = [{"pass": "convert_bn_to_sync_bn", **counts}]
        if sync_bn.skipped:
            sections["skipped"] = [{"site": s.site, "reason": s.reason} for s in sync_bn.skipped]
    if recipe_entry is not None:
        sections["recipe_changes"] = recipe_changes(recipe_entry)
    notes = [f"every evaluation is in {output / 'metrics.jsonl'}", *run.notes]
    if sync_bn is not None and not sync_bn.changed and not sync_bn.skipped:
        notes.append("--sync-bn had nothing to do: the model has no BatchNorm")
    if recipe is not None and recipe.weight_decay_divisor != 1 and config.weight_decay == 0:
        notes.append(f"{recipe.name} divides L2 weight decay by {recipe.weight_decay_divisor:g}, but the run had none "
                     "(--weight-decay 0): nothing to reduce")
    if run.precision != "fp32":
        notes.append(f"test loss and accuracy are measured in {run.precision} autocast, as the model trained; the saved "
                     "float32 model may differ from them in the last digits")
    if data.input_scale is not None:
        notes.append(f"the model was trained on {data.input_scale}: give it its inputs so, in PyTorch and in ONNX "
                     "(recorded as input_scale in its bngraph.json)")
    if data.class_names is not None:
        names = ", ".join(data.class_names[:8]) + (", ..." if len(data.class_names) > 8 else "")
        notes.append(f"output i is class i: {names} (all {len(data.class_names)} in the model's bngraph.json)")
        classes, outputs = len(data.class_names), _outputs(run.model, data)
        if outputs > classes:  # trained never to pick them, yet an argmax still may
            notes.append(f"the model has {outputs} outputs for {classes} classes: outputs {classes} to {outputs - 1} "
                         "name no class")
    return Report(f"bngraph train {model}", sections=sections, facts=facts, notes=notes)


def _outputs(model: nn.Module, data: TensorData | StreamData) -> int:
    """How many logits `model` (trained, on the CPU) gives an example."""
    with torch.no_grad():
        return logits_of(model.eval()(data.example(2).cpu())).shape[1]


def recipe_changes(entry: dict) -> list[dict]:
    """What a recipe did to the user's model, a row per site: each activation swapped, dropout
    or LRN removed and BatchNorm inserted, and each site it left alone with the reason."""
    rows = []
    for name, result in entry.get("passes", {}).items():
        short = name.partition("(")[0]  # swap_activation(relu->sigmoid): the change says the rest
        details = {d["node"]: d for d in result.get("details", [])}
        for node in result.get("changed", []):
            d = details.get(node, {})
            done = f"{d['from']} -> {d['to']}" if "to" in d else f"removed {d.get('op', '')}".strip()
            rows.append({"pass": short, "node": node, "change": done})
        rows += [{"pass": short, "node": s["site"], "change": f"none: {s['reason']}"} for s in result.get("skipped", [])]
    inserted = entry.get("insert") or {}
    rows += [{"pass": "insert", "node": r["node"], "change": f"{r['norm']} before {r['activation']}"}
             for r in inserted.get("inserted", [])]
    rows += [{"pass": "insert", "node": r["node"], "change": f"none: {r['reason']}"} for r in inserted.get("skipped", [])]
    # Inside submodules torch.fx kept whole, no pass reaches: their nonlinearities, and any
    # dropout or LRN there, stay as they are.
    rows += [{"pass": "insert", "node": r["module"], "change": f"none: {r['nonlinearity']} {r['reason']}"}
             for r in inserted.get("not_handled", [])]
    rows += [{"pass": "recipe", "node": r["module"], "change": f"none inside: kept whole ({r['reason']}); its dropout, "
              "LRN and activations are as they were"} for r in inserted.get("opaque", [])]
    return rows
