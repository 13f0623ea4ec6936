"""`bngraph recalibrate`: each BatchNorm's population statistics recomputed (Algorithm 2, step 2).

    model, report = recalibrate(loaded, data, "out/", batches=100, batch_size=60)

Over `batches` training mini-batches of `batch_size` m, E[x] is the average of the batch means
and Var[x] is m'/(m'-1) times the average of the batch variances, m' the values per feature in a
batch (m, or m x H x W for a conv's feature map: Sec. 3.2's effective mini-batch;
`passes/recalibrate_bn.py`).
Not function-preserving by design: the statistics move, and a check makes sure nothing else
does. The test accuracy before and after is reported.
"""

from __future__ import annotations

from torch import nn

from bngraph.artifact_code import kept_source, user_code, user_files
from bngraph.artifacts import save
from bngraph.equivalence import check_only_statistics_changed
from bngraph.errors import UserError
from bngraph.load import LoadedModel
from bngraph.passes.base import run_passes
from bngraph.passes.recalibrate_bn import RecalibrateBN
from bngraph.report import Report
from bngraph.training import EpochSampler, TensorData, check_model_fits, evaluate
from bngraph.training.data import AS_STORED
from bngraph.training.data_formats import check_input_scale, with_model_classes


def check_has_statistics(model: nn.Module) -> None:
    """A model with no BatchNorm statistics to recompute is the user's mistake, not an output."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise UserError("nothing to recalibrate: the model has no BatchNorm")
    if all(bn.running_mean is None for bn in bns):
        raise UserError(
            f"nothing to recalibrate: none of the model's {len(bns)} BatchNorms keeps running statistics "
            "(track_running_stats=False)"
        )


def recalibrate(
    loaded: LoadedModel,
    data: TensorData,
    output: str,
    *,
    batches: int = 100,
    batch_size: int = 60,
    seed: int = 0,
    force: bool = False,
) -> tuple[nn.Module, Report]:
    """The loaded model with its BN statistics recomputed on `data`'s training images, written as
    an artifact at `output`, and the report (accuracy on `data`'s test images before and after)."""
    if batches < 1 or batch_size < 2:
        raise UserError("--batches must be at least 1 and --batch-size at least 2 (a variance needs two values)")
    model = loaded.module
    check_has_statistics(model)
    data = with_model_classes(data, loaded.classes)  # labels as the model's outputs mean them
    check_input_scale(data, loaded.input_scale)  # statistics of inputs on another scale than the model's
    # A softmax or sigmoid output recalibrates as well; the loss of probabilities is -log p.
    probabilities = check_model_fits(model, data, for_training=False) == "probabilities"
    sampler = EpochSampler(len(data.x_train), batch_size, seed)
    training_batches = [(data.x_train[sampler(i)],) for i in range(batches)]

    loss_before, accuracy_before = evaluate(model, data.x_test, data.y_test, probabilities=probabilities)
    state_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model, results = run_passes(model, [RecalibrateBN(training_batches)])
    # Not function-preserving by design (the statistics move); the rest of the model must not.
    check_only_statistics_changed(state_before, model, what="the recalibrated model")
    result = results[RecalibrateBN.name]
    loss_after, accuracy_after = evaluate(model, data.x_test, data.y_test, probabilities=probabilities)

    described = f"{data.name} ({data.source})"
    entry = {
        "command": "recalibrate",
        "data": described,
        "data_format": data.format,
        "batches": batches,
        "batch_size": batch_size,
        "seed": seed,  # which training batches: the statistics depend on it
        "passes": {name: r.summary() for name, r in results.items()},
        "input_scale": data.input_scale or AS_STORED,  # the statistics are of inputs so scaled: the model takes them so
    }
    # The model keeps the input it declares: data it takes at another size (an .npz of 32x32
    # images for an adaptive model declaring 28x28) must not redeclare it.
    example = loaded.example_inputs() if loaded.input_shapes else [data.x_test[:2]]
    history = [*loaded.history, entry]
    save(model, output, example_inputs=example, history=history, source=loaded.spec.text, force=force,
         base=user_code(loaded), carry=user_files(loaded), untraceable_code=kept_source(loaded, "recalibrate"))
    report = Report(
        f"bngraph recalibrate {loaded.spec.text}",
        sections={
            "recalibrated": result.details,
            "skipped": [{"bn": s.site, "reason": s.reason} for s in result.skipped],
        },
        facts={
            "data": described,
            "batches": batches,
            "batch_size": batch_size,
            "seed": seed,
            "test_accuracy_before": accuracy_before,
            "test_accuracy_after": accuracy_after,
            "test_accuracy_change": accuracy_after - accuracy_before,
            "test_loss_before": loss_before,
            "test_loss_after": loss_after,
            "output": output,
        },
        notes=[f"the statistics are of {data.input_scale}: give the model its inputs so (recorded as input_scale in "
               "its bngraph.json)"] if data.input_scale is not None else [],
    )
    return model, report
