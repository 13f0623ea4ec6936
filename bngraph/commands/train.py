"""Train a model on your images: SGD with momentum, checkpoints, an exact --resume. The model
returns logits (N, classes), alone or as the `logits` entry of a dict or dataclass.

Writes OUT/model/ (an artifact for `bngraph fold OUT/model`, export and verify),
OUT/metrics.jsonl (one JSON line per evaluation), OUT/checkpoint.pt and, with --track-inputs,
OUT/inputs.png. A stopped run (Ctrl-C, SIGTERM, or a crash after a checkpoint) continues with
--resume and the same arguments: same next batch, optimizer and RNG state, so it ends with
bit-identical weights. --steps may grow on resume; other settings, other data (its example
counts, image shape, format, input scale and class names, an image folder's file paths and labels,
for data held in memory its training labels and images, a factory's items held or streamed), or a
model that computes something else with
the checkpoint's weights (its code edited since) are refused.

--recipe applies the paper's Sec. 4.2.1 changes through passes before training:
  inception          the model as built
  bn-baseline        BN before every nonlinearity
  bn-x5, bn-x30      BN, no dropout, no LRN; learning rate x5 / x30, L2 decay /5, decay 6x faster
  bn-x5-sigmoid      as bn-x5, with sigmoid instead of ReLU
  inception-sigmoid  sigmoid and no BN (the paper's control)

--data PATH: what the path holds decides how it is read (the format goes into OUT/model's history):
  MNIST IDX     a folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte
                and t10k-labels-idx1-ubyte (raw or .gz), named by its folder or --dataset; labels 0 to the model's outputs - 1
  image folder  DIR/train/CLASS/*.png|jpg|jpeg|jfif|bmp|ppm|pgm|tif|tiff|webp|gif and DIR/test/CLASS/...
                (or DIR/val/), as torchvision's ImageFolder: the classes are train/'s sorted folder
                names (compared in Unicode NFC: a name macOS wrote decomposed is the same class). Images become L or RGB for the model's input channels (L as N,H,W for a model
                declaring (N, H, W)), at --image-size H,W or the model's input size
  .npz          FILE.npz with x_train, y_train, x_test, y_test (Keras' convention): images N,H,W or
                N,H,W,C or N,C,H,W (the axis matching the model's channels; N,H,W stays so for a model
                declaring (N, H, W)), uint8 (scaled to [0, 1]) or float (as is); integer labels
  CIFAR binary  the "binary version" folder: data_batch_1..5.bin + test_batch.bin (CIFAR-10), or
                train.bin + test.bin (CIFAR-100, fine labels; --cifar100-labels coarse for the 20
                superclasses). The pickled "python version" is refused: unpickling runs code
  factory       FILE.py:make (FILE.py alone: make), a function returning (train, test) torch Datasets
                whose items are (image, integer label), the image a C,H,W tensor or array or a PIL
                image (decoded as an image folder's, to L or RGB for the model's channels), uint8
                scaled to [0, 1] (other integers are refused), for everything else; for a model whose example
                input is integer (--input-dtype int64: token ids), integer items stay integers
                (an image folder's pixels too: 0-255, held in memory or streamed).
                Read with torch, NumPy and random seeded from --seed: held in memory, an item's
                random augmentation is drawn once for the run; streamed (--stream-above 0), anew
                for each batch, seeded by its step (--resume stays exact), and for each test batch
                the same at every evaluation, with any --loader-workers
Without --data: $BNGRAPH_DATA, the MNIST cache (downloaded when online), then Debian's Fashion-MNIST.
Data whose float32 images fit in --stream-above MB (default 2048) stay on the device as tensors;
larger data streams through a DataLoader with --loader-workers processes (pinned memory on CUDA), in
the same batches. Bad data (an unreadable image, damaged or too large for Pillow, labels out of
range for the model's outputs, x and y of different lengths, an empty class folder, a shape the
model cannot take, test images of another shape than the training images, NaN or infinite pixel
values, a 16-bit image in a folder, which would read as white) stops the run with one line naming
the file (exit code 2).

Precision and layout: --precision fp32|bf16|fp16 (autocast; fp16 with a gradient scaler) and
--channels-last / --no-channels-last; --device auto uses CUDA when present with bf16 and
channels_last, else the CPU with fp32. --compile runs the training steps through torch.compile
(worth it for long runs: it compiles for a while first). --resume is bit-identical on the CPU in
every precision and layout. On CUDA, add --deterministic (torch.use_deterministic_algorithms,
CUBLAS_WORKSPACE_CONFIG=:4096:8) for the same guarantee; without it cuDNN and atomics may round
differently from run to run, and a resumed run matches an uninterrupted one only to that rounding.

Several processes: launched by torchrun (`--nproc N` runs torchrun's standalone launcher on this host),
trained with DistributedDataParallel, nccl on CUDA (one GPU per process), gloo on the CPU. Each
process takes --batch-size examples per step from its own disjoint share of one shuffle, so a step
is one SGD step on a global batch of --batch-size x N (gradients are averaged over it) and an epoch
sees every example once. --lr is the rate for that global batch: N processes at --batch-size B
train like one at --batch-size N*B with the same --lr. To grow the global batch k-fold, multiply
--lr by k (the linear scaling rule, Goyal et al. 2017); bngraph does not rescale it for you.
Rank 0 alone writes OUT; --resume needs as many processes as the run had. Several hosts join by
torchrun's rendezvous: run on each host
  torchrun --nnodes=2 --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=ID \\
      -m bngraph train ...

Examples:
  bngraph train zoo:mnist-mlp --data ~/mnist --steps 5000 --lr 0.1 -o runs/mlp
  bngraph train zoo:inception-small --recipe bn-x5 --data ~/mnist --epochs 2 -o runs/x5
  bngraph train zoo:inception-small --recipe bn-x5 --data ~/mnist --epochs 4 -o runs/x5 --resume
  bngraph train zoo:inception-small --recipe bn-x5 --data ~/mnist --nproc 4 --sync-bn -o runs/x5-4
  torchrun --nproc-per-node=4 -m bngraph train zoo:inception-small --recipe bn-x5 -o runs/x5-4
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from bngraph.commands import args as shared
from bngraph.errors import UserError

if TYPE_CHECKING:  # the CLI builds its parser without torch: heavy imports wait for run()
    import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_model_arguments(parser)
    shared.add_data_arguments(parser)
    parser.add_argument("-o", "--output", metavar="DIR", required=True, help="run folder to write")
    parser.add_argument("--recipe", metavar="NAME", help="a paper variant to build first (see above)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (default: 2 epochs)")
    length.add_argument("--epochs", type=float, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step and process (default: 32)")
    parser.add_argument("--lr", type=float, default=0.01, help="before a recipe scales it (default: 0.01)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default: 0)")
    parser.add_argument("--lr-decay", type=float, default=0.96, help="lr factor per --decay-every (default: 0.96)")
    parser.add_argument(
        "--decay-every", type=float, help="steps per --lr-decay factor, applied smoothly (default: 1/8 of the run; on --resume, the "
        "period the run started with)"
    )
    parser.add_argument("--seed", type=int, default=0, help="initial weights, batch order, dropout (default: 0)")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between test evaluations (default: 500)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: every evaluation)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (default: bf16 on CUDA, else fp32)"
    )
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels_last memory format for 4-d images (default: on CUDA only)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the training steps (long runs)")
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms: exact --resume on CUDA too"
    )
    parser.add_argument("--resume", action="store_true", help="continue the stopped run in OUT")
    parser.add_argument(
        "--track-inputs", nargs="*", metavar="NAME",
        help="record the 15/50/85th percentiles of these nonlinearities' inputs (none named: the last "
        "module) at each evaluation, and plot them to OUT/inputs.png (paper, Figure 1(b, c)); a module "
        "path (act3), or a function or method call named as torch.fx names it (sigmoid_1, block.relu)",
    )
    parser.add_argument("--track-unit", type=int, help="which feature or channel to track (default: 0): axis 1 of the input, the last axis of an (N, T, C) input a Linear made")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--nproc", type=int, metavar="N",
        help="train with N processes on this host, through torchrun's standalone launcher (as `torchrun "
        "--standalone --nproc-per-node=N -m bngraph train ...`; one GPU each on CUDA). Under torchrun, leave it out",
    )
    parser.add_argument(
        "--sync-bn", action="store_true",
        help="with several processes, make every BatchNorm a SyncBatchNorm: mean and variance over the global "
        "batch (all processes). Without it each process normalizes over its own --batch-size examples, the "
        "paper's setting (BN sees the batch of one device). The saved model has plain BatchNorms either way",
    )
    shared.add_force_argument(parser, "run folder")
    shared.add_report_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # Imported here, not above: `bngraph --help` starts without torch.
    from bngraph.atomic import refuse_inside_bngraph_folder, run_folder
    from bngraph.reproduce.recipes import get_recipe
    from bngraph.train_run import train_run
    from bngraph.training.config import pick_device
    from bngraph.training.distributed import join, local_main_first

    recipe = get_recipe(args.recipe) if args.recipe else None
    if args.track_unit is not None and args.track_inputs is None:
        raise UserError("--track-unit picks the feature --track-inputs tracks; add --track-inputs")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, not {args.steps}")
    if args.resume and args.weights:  # it was read, then the checkpoint's weights replaced it
        raise UserError("--weights gives a run its starting weights; a resumed run goes on from its checkpoint's: "
                        "leave --weights out, or start a new run")
    refuse_inside_bngraph_folder(args.output)
    device = pick_device(args.device)
    if args.nproc is not None:
        _launch(args, device)
    with join(device) as (ctx, device):
        # Rank 0 alone writes, to OUT or (when --force replaces an old run) beside it; other
        # hosts need not have its folder.
        folder = (run_folder(args.output, force=args.force, resume=args.resume, inputs=shared.input_paths(args))
                  if ctx.is_main else contextlib.nullcontext(Path(args.output)))
        with folder as out:
            loaded = shared.load_from_args(args, seed=args.seed)  # a file model's initial weights
            with local_main_first(ctx):  # one download per host, not one per process
                data = shared.data_for_model(args, loaded, device, allow_stream=True)
            _, report = train_run(
                loaded, data, out, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                decay_every=args.decay_every, recipe=recipe, sync_bn=args.sync_bn, resume=args.resume, device=device,
                progress=not args.quiet, distributed=ctx, output=args.output,
                lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, lr_decay=args.lr_decay,
                seed=args.seed, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                track_inputs=tuple(args.track_inputs) if args.track_inputs is not None else None,
                track_unit=args.track_unit or 0, precision=args.precision, channels_last=args.channels_last,
                compile=args.compile, deterministic=args.deterministic,
            )
            if report is not None:  # rank 0
                if args.loader_workers is not None and not report.facts["streamed"]:
                    report.notes.append(f"--loader-workers {args.loader_workers} was not used: the data fits under "
                                        "--stream-above and stayed on the device as tensors (--stream-above 0 streams it)")
                shared.emit(report, args)
            return 0


def _launch(args: argparse.Namespace, device: torch.device) -> None:
    """--nproc N > 1: become torchrun (this does not return); N = 1: go on in this process."""
    # Imported here, not above: `bngraph --help` starts without torch.
    import torch

    from bngraph.atomic import RUN, check_output, refuse_if_running, refuse_symlinked_run
    from bngraph.training.checkpoint import check_resumable, saved_field
    from bngraph.training.data import EpochSampler
    from bngraph.training.distributed import exec_torchrun, under_torchrun, without_option

    if under_torchrun():
        raise UserError("--nproc launches torchrun; under torchrun leave it out (its --nproc-per-node says how many)")
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, not {args.nproc}")
    if device.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {args.nproc}: this host has {torch.cuda.device_count()} GPU(s), one per process")
    if args.nproc > 1:
        # What every process would refuse, refused here in one line: under torchrun, every rank
        # would say it, once the job had started.
        if not args.resume:
            check_output(args.output, RUN, force=args.force, inputs=shared.input_paths(args))
        else:
            refuse_symlinked_run(Path(args.output))
            check_resumable(Path(args.output))
            refuse_if_running(Path(args.output))
        if args.resume and (ran_as := saved_field(args.output, "world_size", 1)) != args.nproc:
            raise UserError(f"the run in {args.output} ran as {ran_as} process(es), not {args.nproc}: resume it with "
                            "as many (they decide the batches)")
        data = shared.data_for_model(args, shared.load_from_args(args, seed=args.seed), "cpu", allow_stream=True)
        EpochSampler(data.n_train, args.batch_size, args.seed, world_size=args.nproc)  # a global batch the data holds
        # With --json, fd 1 points at stderr here (`cli._stdout_for_the_report`): torchrun gets the real stdout
        exec_torchrun(args.nproc, without_option(args.argv, "--nproc"), stdout=getattr(args, "report_stream", None))
