"""The training wing: SGD on image data, exact resume, several processes; the deployment side
(insert, fold, export, verify) never imports it, but for `verify --data`, which reads its images
with `data_formats` as train does.

    from bngraph.training import TrainConfig, train
    run = train(model, "path/to/data", TrainConfig(steps=2000, lr=0.01), out_dir=Path("run"))

One module per job: `config` (TrainConfig, the device), `data` (TensorData, StreamData,
EpochSampler), `data_formats` (what --data holds), `loop` (train), `checkpoint` (the run folder
and --resume), `metrics` (test accuracy, metrics.jsonl), `distributed` and `sync_bn` (torchrun),
`track` (Figure 1(b, c)'s input percentiles), `plots`, and `fused_mlp` (the MNIST nets, fast).
This package answers the names a training script needs; `bngraph.train` is `train`.
"""

from bngraph.training.config import TrainConfig, epochs_to_steps, pick_device
from bngraph.training.data import EpochSampler, StreamData, TensorData, check_model_fits
from bngraph.training.data_formats import load_data
from bngraph.training.metrics import evaluate, read_metrics
from bngraph.training.loop import TrainRun, train
from bngraph.training.track import InputTracker, nonlinearity_names

__all__ = [
    "EpochSampler",
    "InputTracker",
    "StreamData",
    "TensorData",
    "TrainConfig",
    "TrainRun",
    "check_model_fits",
    "epochs_to_steps",
    "evaluate",
    "load_data",
    "nonlinearity_names",
    "pick_device",
    "read_metrics",
    "train",
]
