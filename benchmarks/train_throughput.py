"""Training throughput: `bngraph.train` against a plain PyTorch AMP loop of the same model, in one run.

The plain loop is what one writes from the PyTorch AMP recipe: the model (channels_last where
bngraph uses it), SGD with momentum, random batches from tensors on the device, autocast in the
same precision, zero_grad/backward/step. `bngraph` is `bngraph.train` on the same tensors
(its sampler, schedule, running sums and checkpoint-free loop); `bngraph --compile` adds
torch.compile. Each contender runs once untimed (the device's warm-up), then N and 2N steps from
fresh weights, and the time per step is (T(2N) - T(N)) / N, so start-up, compilation and the final
evaluation cancel out; what they cost once is T(N) - N x that ("setup s": building the model, the
run's setup, the final evaluation). Contenders are interleaved over --repeats rounds and medians printed, with images/s
and the ratio to the plain loop (goal: at least 1.0); with --compile, also the step rate of
`bngraph --compile` over `bngraph`, and the steps after which compiling has paid for itself.
With --recipe (bn-baseline: the model with a BN before each nonlinearity, as `bngraph reproduce
inception` trains it), `bngraph, RECIPE` trains the recipe's model in the same rounds, and its
step time over `bngraph`'s is what the recipe costs per step (issue 13's goal for BN-Baseline
over Inception: at most 1.15). Interleaved and warmed, it is steadier than the rates of the
training runs `reproduce` reports, where two variants of the same step (BN-x5, BN-x30) differed
by 10% on an H200.

    .venv/bin/python benchmarks/train_throughput.py --model zoo:inception-small --batch-sizes 32 --steps 20
    python benchmarks/train_throughput.py --model zoo:inception --batch-sizes 32,256 --json out.json   # a GPU
    .venv/bin/python benchmarks/train_throughput.py --model zoo:mnist-mlp --batch-sizes 60 --steps 500 --compile
    python benchmarks/train_throughput.py --model zoo:inception --recipe bn-baseline --batch-sizes 32   # a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bngraph.reproduce.recipes import apply_recipe
from bngraph.training import TensorData, TrainConfig, pick_device, train
from bngraph.training.config import PRECISIONS
from bngraph.zoo import create_model, get_entry


def synthetic(shape, classes: int, n: int, device) -> TensorData:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((n, *shape[1:]), generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return TensorData(x.to(device), y.to(device), x[:8].to(device), y[:8].to(device), "synthetic", "random")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_amp_loop(name: str, data: TensorData, steps: int, batch: int, precision: str, channels_last: bool,
                   device) -> float:
    torch.manual_seed(0)
    model = create_model(name).to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    dtype = PRECISIONS[precision]
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(data.x_train), (batch,), device=device, generator=gen)
        x, y = data.x_train[index], data.y_train[index]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp():
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    sync(device)
    return time.perf_counter() - start


def bngraph_loop(name: str, data: TensorData, steps: int, batch: int, precision: str, channels_last: bool,
                 device, compile: bool = False, recipe: str | None = None) -> float:
    torch.manual_seed(0)
    model = create_model(name)
    if recipe is not None:
        model, _ = apply_recipe(model, recipe, [data.x_train[:2].cpu()])
    config = TrainConfig(steps=steps, batch_size=batch, lr=0.001, eval_every=steps, precision=precision,
                         channels_last=channels_last, compile=compile)
    sync(device)
    start = time.perf_counter()
    train(model, data, config, device=str(device), progress=False)
    sync(device)
    return time.perf_counter() - start


def profile(contenders: dict, steps: int, device, title: str, path: str) -> None:
    """Append each contender's top operators over a run of `steps` steps to `path`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "a") as out:
        for name, contender in contenders.items():
            with torch.profiler.profile(activities=activities) as prof:
                contender(steps)
            out.write(f"## {title}: {name}, {steps} steps (setup and final evaluation included)\n")
            out.write(prof.key_averages().table(sort_by=key, row_limit=20) + "\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:inception", help="a zoo model (default: zoo:inception)")
    parser.add_argument("--batch-sizes", default="32,256", help="(default: 32,256)")
    parser.add_argument("--steps", type=int, default=20, help="N: each contender runs N and 2N steps (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are printed (default: 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), help="(default: bf16 on CUDA, else fp32)")
    parser.add_argument("--compile", action="store_true", help="also time bngraph with --compile")
    parser.add_argument("--recipe", help="also time bngraph on the model this recipe makes (e.g. bn-baseline): "
                        "its step time over bngraph's is what the recipe costs per step")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's; 1 is steadier on a shared machine)")
    parser.add_argument("--json", metavar="FILE", help="write the figures here too")
    parser.add_argument("--profile", metavar="FILE",
                        help="after the rounds, profile N steps of each contender and write torch.profiler's "
                             "top operators (by device time on CUDA) here: what the ratios alone do not explain")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # A fresh inductor cache: the first compiled run pays what a user's first run pays.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bngraph-inductor-")

    name = args.model.removeprefix("zoo:")
    device = pick_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    shape = get_entry(name).input_shape
    channels_last = device.type == "cuda" and len(shape) == 4  # as bngraph.train resolves it
    with torch.no_grad():
        classes = create_model(name)(torch.zeros(shape)).shape[1]
    print(f"torch {torch.__version__}, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{name} {shape[1:]}, {precision}, channels_last={channels_last}, N={args.steps}")
    results = {"model": name, "device": str(device), "precision": precision, "channels_last": channels_last,
               "steps": args.steps, "torch": torch.__version__, "batches": {}}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        data = synthetic(shape, classes, max(4 * batch, 64), device)
        contenders = {
            "plain AMP loop": lambda n: plain_amp_loop(name, data, n, batch, precision, channels_last, device),
            "bngraph": lambda n: bngraph_loop(name, data, n, batch, precision, channels_last, device),
        }
        if args.compile:
            contenders["bngraph --compile"] = lambda n: bngraph_loop(
                name, data, n, batch, precision, channels_last, device, compile=True
            )
        if args.recipe:
            contenders[f"bngraph, {args.recipe}"] = lambda n: bngraph_loop(
                name, data, n, batch, precision, channels_last, device, recipe=args.recipe
            )
        # One untimed run of each first: CUDA's lazy kernel loading, cuDNN's and cuBLAS's first
        # calls and the allocator's growth are paid there, not by whichever contender runs first.
        # The first compiled run compiles (a fresh cache: see main); the rounds reuse it.
        first = {k: contender(args.steps) for k, contender in contenders.items()}
        per_step, setup = {k: [] for k in contenders}, {k: [] for k in contenders}
        for r in range(args.repeats):
            order = list(contenders)[r % len(contenders) :] + list(contenders)[: r % len(contenders)]
            for k in order:
                short, long = contenders[k](args.steps), contenders[k](2 * args.steps)
                if long > short:  # else the noise outweighed N steps: that round tells nothing
                    per_step[k].append((long - short) / args.steps)
                    setup[k].append(2 * short - long)
        if not all(per_step.values()):
            print(f"batch {batch}: too noisy to measure (T(2N) <= T(N)); raise --steps")
            continue
        plain = statistics.median(per_step["plain AMP loop"])
        rows = {}
        print(f"batch {batch}: {'contender':<20} {'ms/step':>9} {'images/s':>10} {'x plain':>8} {'setup s':>8}")
        for k, times in per_step.items():
            t, once = statistics.median(times), statistics.median(setup[k])
            rows[k] = {"ms_per_step": round(t * 1e3, 3), "images_per_s": round(batch / t, 1),
                       "x_plain": round(plain / t, 3), "setup_s": round(once, 2)}
            print(f"{'':9}{k:<20} {t * 1e3:>9.2f} {batch / t:>10.1f} {plain / t:>8.3f} {once:>8.2f}")
        if args.compile:
            eager, compiled = rows["bngraph"], rows["bngraph --compile"]
            speedup = eager["ms_per_step"] / compiled["ms_per_step"]
            saved_ms = eager["ms_per_step"] - compiled["ms_per_step"]
            cost_s = first["bngraph --compile"] - first["bngraph"] - args.steps * saved_ms / 1e3
            pays_after = round(cost_s * 1e3 / saved_ms) if saved_ms > 0 else None
            rows["compile"] = {"speedup": round(speedup, 3), "compile_s": round(cost_s, 2), "pays_after_steps": pays_after}
            print(f"{'':9}--compile: {speedup:.3f}x the step rate of bngraph; compiling costs {cost_s:.1f} s in the first run, "
                  + (f"repaid after {pays_after:,} steps" if pays_after is not None else "never repaid"))
        if args.recipe:
            cost = rows[f"bngraph, {args.recipe}"]["ms_per_step"] / rows["bngraph"]["ms_per_step"]
            rows["recipe"] = {"name": args.recipe, "step_time_ratio": round(cost, 3)}
            print(f"{'':9}{args.recipe}: {cost:.3f}x the step time of the model without it")
        results["batches"][str(batch)] = rows
        if args.profile:
            profile(contenders, args.steps, device, f"batch {batch}", args.profile)
        if args.json:
            with open(args.json, "w") as f:  # after each batch size: a cut run still reports
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
