"""What `bngraph train` leaves in its run folder: the trained model as an artifact, the plot.

    done = train_into_folder(model, data, config, out, history=history, source="zoo:mnist-mlp")

Beside `train`'s checkpoint and metrics, OUT/model is the trained model (with plain BatchNorms,
though `sync_bn` trained it with SyncBatchNorms) for `bngraph fold`, export and verify, and with
`config.track_inputs` OUT/inputs.png draws the tracked percentiles (Figure 1(b, c)).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bngraph.artifacts import save
from bngraph.passes.base import PassResult, Skip
from bngraph.passes.convert_bn_to_sync_bn import convert_bn_to_sync_bn
from bngraph.passes.recalibrate_bn import hand_written_batchnorms
from bngraph.errors import UserError, one_line
from bngraph.training.config import TrainConfig, pick_device
from bngraph.training.data import AS_STORED, StreamData, TensorData
from bngraph.training.distributed import SINGLE, Distributed
from bngraph.training.loop import TrainRun, train
from bngraph.training.metrics import METRICS
from bngraph.training.plots import plot_tracked_inputs
from bngraph.training.sync_bn import use_cpu_sync_bn

MODEL_DIR, PLOT = "model", "inputs.png"


@dataclass
class TrainedFolder:
    """What `train_into_folder` did: `train`'s result, and the SyncBatchNorm conversion if any."""

    run: TrainRun
    sync_bn: PassResult | None
    model_dir: Path  # OUT/model
    plot: Path | None  # OUT/inputs.png, when inputs were tracked


def _hand_written_batchnorms(model: nn.Module, example_inputs) -> list[str]:
    """`hand_written_batchnorms` for the report, or none where the probe cannot run: a model whose
    training forward fails on the example fails the first step itself, in its own one line."""
    try:
        return hand_written_batchnorms(model, example_inputs)
    except Exception:  # noqa: BLE001 (the run's first step says it)
        return []


def train_into_folder(
    model: nn.Module,
    data: TensorData | StreamData,
    config: TrainConfig,
    out: Path,
    *,
    history: Sequence[dict],
    source: str,
    example_inputs: Sequence[torch.Tensor],
    base: tuple[str, str] | None = None,
    carry: dict[str, bytes] | None = None,
    untraceable_code: str | None = None,
    sync_bn: bool = False,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    distributed: Distributed = SINGLE,
) -> TrainedFolder | None:
    """`train` into `out`, then save OUT/model with `history` and this run's entry; None on the
    ranks other than 0 (they write nothing). `base`, `carry`, `untraceable_code`: see `bngraph.artifacts.save`. `sync_bn` trains with SyncBatchNorms, on the CPU
    through `bngraph.training.sync_bn`."""
    history = list(history)
    plain, converted = model, None
    if sync_bn:
        try:
            plain = copy.deepcopy(model)  # what OUT/model holds: the model with plain BatchNorms
        except Exception as err:  # a model holding a lock: a traceback
            raise UserError(f"--sync-bn keeps a copy of the model with its plain BatchNorms to save, and "
                            f"{type(model).__name__} cannot be copied ({one_line(err)}): train it without --sync-bn") from None
        converted = convert_bn_to_sync_bn(model)
        for name in _hand_written_batchnorms(plain, example_inputs):  # named in the report, not left unsaid
            converted.skipped.append(Skip(name, "the running statistics of a BatchNorm written with F.batch_norm, "
                                                "which --sync-bn does not convert: they stay the rank's own"))
        # torch's SyncBatchNorm runs on GPUs only; on the CPU, the same statistics by all-reduce.
        model = converted.graph if pick_device(device).type == "cuda" else use_cpu_sync_bn(converted.graph)
        history.append({"command": "sync-bn", "passes": {"convert_bn_to_sync_bn": converted.summary()}})
    ctx = distributed
    run = train(model, data, config, out_dir=out, resume=resume, device=device, progress=progress, distributed=ctx,
                finish=True)
    if not ctx.is_main:
        return None
    if converted is not None:  # same state-dict keys: the trained state, in BatchNorms again
        plain.load_state_dict(run.model.state_dict())
    history.append({"command": "train", "data": f"{data.name} ({data.source})", "data_format": data.format,
                    "config": asdict(replace(config, precision=run.precision, channels_last=run.channels_last)),
                    "processes": ctx.world_size})  # the precision and layout as the device resolved them
    if data.class_names is not None:  # output i is this class: the sorted folder names, "10" before "2"
        history[-1]["classes"] = list(data.class_names)
    # What the model takes, said either way: pixels as stored give another answer than pixels / 255.
    history[-1]["input_scale"] = data.input_scale or AS_STORED
    # force: a resumed run replaces its own model/, in a folder checked to be a run's
    save(plain.eval(), out / MODEL_DIR, example_inputs=example_inputs, history=history, source=source, base=base,
         carry=carry, untraceable_code=untraceable_code, force=True)
    plot = None
    if config.track_inputs is not None:
        rows = [r for r in run.metrics if "inputs" in r]
        quantiles = {name: [r["inputs"][name] for r in rows] for name in rows[-1]["inputs"]}
        try:
            plot = plot_tracked_inputs([r["step"] for r in rows], quantiles, out / PLOT, unit=config.track_unit)
        except UserError as err:  # it said "nothing was written" of a run whose model was
            raise UserError(f"{err}; the run itself is done: its model and checkpoint are in {out}, and the "
                            f"tracked percentiles the picture draws are in its {METRICS}") from err
    return TrainedFolder(run, converted, out / MODEL_DIR, plot)
