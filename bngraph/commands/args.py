"""The argument groups several commands share, and the steps that read them (as Polygraphy's
`tools/args/`): the model and its example input, the output, tolerances, and the report.

A group adds its arguments (`add_*`) and reads them back (`load_from_args`, `check_output_first`,
`emit`, `print_lines`). Nothing here imports torch: the CLI builds its parser without it, and
a step that needs a heavy module imports it when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bngraph.atomic import check_output, refuse_inside_bngraph_folder
from bngraph.errors import UserError
from bngraph.spec import ModelSpec, parse_model_spec

if TYPE_CHECKING:  # the CLI builds its parser without torch: heavy imports wait for run()
    import torch

    from bngraph.compare import VerifyResult
    from bngraph.load import LoadedModel
    from bngraph.report import Report


# ---- the model and its example input ----------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, onnx: bool = False) -> None:
    parser.add_argument("model", help="zoo:NAME, file.py[:Symbol], an artifact folder or a run folder bngraph "
                        "wrote" + (", or a .onnx file" if onnx else ""))
    parser.add_argument("--weights", metavar="FILE", help="load this state dict first")
    add_input_arguments(parser)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """--input-shape, --input-dtype, --static-input: the example inputs (see `bngraph.spec`)."""
    parser.add_argument(
        "--input-shape",
        metavar="SHAPE",
        help="example input, batch first: 2,3,32,32 (several inputs: 2,8;2,4); "
        "default: what the model declares",
    )
    parser.add_argument(
        "--input-dtype",
        metavar="DTYPES",
        help="one dtype per input, as the shapes: float32;int64 (default float32; random integers "
        "are 0 or 1, valid token ids for any vocabulary; verify draws those that index an embedding "
        "table over the table, and unsigned ones over uint8's range)",
    )
    parser.add_argument(
        "--static-input",
        metavar="INDEX",
        type=int,
        action="append",
        default=[],
        help="input INDEX (0-based) has no batch axis (a mask, a per-feature table): checks at "
        "other batch sizes keep its shape; repeatable",
    )


def load_from_args(args: argparse.Namespace, seed: int = 0) -> LoadedModel:
    """The model the model group names, with its example inputs' shapes, dtypes and batch axes
    (a file's model built with torch seeded to `seed`)."""
    from bngraph.load import load_model  # torch: only once a command runs
    from bngraph.trace import check_modules_registered

    loaded = load_model(
        args.model,
        weights=args.weights,
        input_shape=args.input_shape,
        input_dtype=getattr(args, "input_dtype", None),
        static_inputs=getattr(args, "static_input", None) or (),
        seed=seed,
    )
    check_modules_registered(loaded.module)  # every command here traces, trains or saves it
    return loaded


# ---- the data: --data and how it is read -----------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser, *, stream: bool = True) -> None:
    """--data and how it is read; `stream`: --stream-above and --loader-workers too (for a
    command that reads data larger than memory through a DataLoader)."""
    parser.add_argument(
        "--data", metavar="PATH",
        help="MNIST IDX folder, image folder (train/CLASS/*.png, test/...), FILE.npz, CIFAR binary folder, "
        "or FILE.py:make (default: $BNGRAPH_DATA, the cache, a download)",
    )
    parser.add_argument(
        "--dataset", choices=("mnist", "fashion-mnist"), help="which of the two to read without --data (default: mnist), or the name of an MNIST-format --data "
        "(default: its folder's name)"
    )
    parser.add_argument("--image-size", metavar="H,W", help="resize images to this (default: the model's input size)")
    parser.add_argument("--cifar100-labels", choices=("fine", "coarse"), help="CIFAR-100's labels (default: fine)")
    if not stream:
        return
    parser.add_argument(
        "--stream-above", type=float, metavar="MB", default=2048.0,
        help="data larger than this (as float32) streams through a DataLoader instead of staying on the "
        "device (default: 2048); a factory held in memory is read once, its random augmentation with it: "
        "--stream-above 0 draws it anew each time an item is used",
    )
    parser.add_argument("--loader-workers", type=int, metavar="N", help="DataLoader processes when streaming "
                        "(default: one per core, less one, at most 8)")


def data_for_model(args: argparse.Namespace, loaded: LoadedModel, device: torch.device | str = "cpu", *,
                   allow_stream: bool = False):
    """The data --data names, read for `loaded`'s example input: an image folder is decoded to its
    channels and size, integer data stays integer for a model taking token ids."""
    input_shape = loaded.input_shapes[0] if loaded.input_shapes else None
    input_dtype = loaded.example_inputs()[0].dtype if loaded.input_shapes else None  # int64: token ids
    return data_from_args(args, device, input_shape=input_shape, input_dtype=input_dtype, allow_stream=allow_stream)


def data_from_args(args: argparse.Namespace, device: torch.device | str = "cpu", *, input_shape=None,
                   input_dtype=None, allow_stream: bool = False):
    """The data --data names, for a model whose example input has `input_shape` and `input_dtype`:
    TensorData on `device`, or (with `allow_stream`, above --stream-above) StreamData."""
    # Imported here, not above: `bngraph --help` starts without torch.
    from bngraph.data import resolve_dataset
    from bngraph.training.data import TensorData
    from bngraph.training.data_formats import detect_format, open_data

    # An option for another format is refused, never ignored (as --image-size is by open_data).
    fmt = detect_format(args.data) if args.data is not None else "mnist-idx"
    labels = getattr(args, "cifar100_labels", None)
    if args.dataset is not None and fmt != "mnist-idx":
        raise UserError(f"--dataset names what an MNIST-format folder holds; {args.data} is {fmt}")
    if labels is not None and fmt != "cifar-100-bin":
        raise UserError(f"--cifar100-labels picks CIFAR-100's labels; {args.data or 'MNIST'} is {fmt}")
    if args.data is None:
        return TensorData.from_dataset(resolve_dataset(None, dataset=args.dataset or "mnist"), device)
    if getattr(args, "loader_workers", None) is not None and args.loader_workers < 0:
        raise UserError(f"--loader-workers must be at least 0, not {args.loader_workers}")
    return open_data(
        args.data, input_shape=input_shape, input_dtype=input_dtype, image_size=getattr(args, "image_size", None),
        device=device,
        stream_above_mb=args.stream_above if allow_stream else None, workers=getattr(args, "loader_workers", None),
        dataset=args.dataset, cifar100_labels=labels or "fine", seed=getattr(args, "seed", 0),
    )


# ---- the output -------------------------------------------------------------------------------


def add_force_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"replace an existing {what} at -o that bngraph wrote (nothing else is ever replaced)",
    )


def input_paths(args: argparse.Namespace) -> list:
    """What a command reads (model file or folder, weights, data): its -o may not be, hold or sit
    inside one of them."""
    model = getattr(args, "model", None)
    # A wrong model spec is said first: it is the first thing wrong with the command line.
    path = _model_path(parse_model_spec(model)) if model else None
    data = getattr(args, "data", None)
    if data is None and hasattr(args, "data"):  # read from $BNGRAPH_DATA then, where -o must not go either
        data = os.environ.get("BNGRAPH_DATA") or None
    return [p for p in (path, getattr(args, "weights", None), data) if p]


def _model_path(spec: ModelSpec) -> Path | None:
    """The file or folder the user named as the model: for a run folder that folder itself, not
    the artifact in it that the spec reads (run/model), so that -o run/folded is inside the input
    (written there, it made the run one that neither --resume nor --force would take)."""
    return Path(spec.text) if spec.kind == "artifact" else spec.path


def check_output_first(args: argparse.Namespace, kind: str) -> None:
    """Refuse -o before the work, not after it (`bngraph.atomic.check_output`)."""
    refuse_inside_bngraph_folder(args.output)
    check_output(args.output, kind, force=args.force, inputs=input_paths(args))


# ---- checks -----------------------------------------------------------------------------------


def add_tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--atol",
        type=float,
        metavar="X",
        help="tolerance as a fraction of each output's RMS (default: by what is compared)",
    )
    parser.add_argument(
        "--rtol", type=float, metavar="X", help="tolerance relative to each element |r| (default: by what is compared)"
    )


def add_standalone_bn_argument(parser: argparse.ArgumentParser, applies_to: str = "") -> None:
    """--standalone-bn: the ONNX form of a BN with no exact fold (`bngraph.onnx_fold.STANDALONE_BN_FORMS`)."""
    parser.add_argument(
        "--standalone-bn",
        choices=["batchnorm", "mul-add"],
        default=None,  # batchnorm: None tells a PyTorch fold, which has no such form, it was not given
        help=f"{applies_to}form of a BN with no exact fold: kept (fastest in onnxruntime) or Mul+Add (no BN kernel; "
        "default: batchnorm)",
    )


# ---- the report -------------------------------------------------------------------------------


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def emit(report: Report, args: argparse.Namespace) -> None:
    """The table on stdout, or JSON on stdout and the table on stderr."""
    if getattr(args, "json", False):
        report.print_json(getattr(args, "report_stream", sys.stdout))  # the CLI's stdout: see `cli.main`
        report.print_table(sys.stderr)
    else:
        report.print_table(sys.stdout)


def print_lines(result: VerifyResult, args: argparse.Namespace) -> None:
    """A verification's PASSED/FAILED lines: on stdout, or on stderr beside --json's report."""
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    for line in result.lines():
        print(line, file=stream)
