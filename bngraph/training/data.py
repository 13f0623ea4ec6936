"""What a run trains on: a dataset as device tensors or as streamed Datasets, and its batches.

MNIST-sized data lives on the device as whole tensors (`TensorData`) and a batch is an index into
them, so a step does no Python data loading. Larger data (`StreamData`) goes through a DataLoader
in the same batches. Either way the batch of a step is a pure function of (seed, step)
(`EpochSampler`): a resumed run sees the batches an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from bngraph.errors import UserError, model_raised, running_user_model
from bngraph.load import declared_shapes


class EpochSampler:
    """Batch `step` of a run that reshuffles the training set every epoch (Sec. 4.2.1: "shuffle
    training examples more thoroughly"). A pure function of (seed, step): resuming needs no
    sampler state, and two nets given the same seed see the same batches.

    With `world_size` processes, step s is the global batch of `batch_size * world_size` that
    one process would take, and `rank` gets its rank-th slice: the ranks' batches are disjoint,
    each example comes once per epoch, and their union is the one-process batch."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1):
        if batch_size * world_size > n:
            times = f" x {world_size} processes" if world_size > 1 else ""
            raise UserError(f"--batch-size {batch_size}{times} is larger than the {n} training examples")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // (batch_size * world_size)  # the last partial batch is dropped
        self._epoch, self._batches = -1, None

    def order(self, epoch: int) -> torch.Tensor:
        # The CPU generator keeps 32 bits of a seed: mix seed and epoch into those 32.
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{epoch}".encode()))
        order = torch.randperm(self.n, generator=gen)
        if torch.device(self.device).type == "cuda":
            # From pinned memory the copy is queued like a kernel; from pageable memory it would
            # wait for every queued step to finish, idling the GPU at each epoch.
            return order.pin_memory().to(self.device, non_blocking=True)
        return order.to(self.device)

    def epoch(self, epoch: int) -> torch.Tensor:
        """The batches of `epoch`, one row per step: [steps_per_epoch, batch_size]."""
        global_batches = self.order(epoch)[: self.steps_per_epoch * self.world_size * self.batch_size]
        return global_batches.view(self.steps_per_epoch, self.world_size, self.batch_size)[:, self.rank]

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.epoch(epoch)
        return self._batches[i]


# What the readers do to uint8 images, for the run's metadata and report: the trained model takes
# its inputs so, in PyTorch and in ONNX, and pixels as stored give another answer.
UINT8_SCALE = "uint8 pixels / 255 (values in [0, 1])"
AS_STORED = "as stored (not scaled)"  # a data object's input_scale None, where a word is needed


@dataclass
class TensorData:
    """A whole image-classification dataset as tensors on one device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str = "data"
    source: str = "tensors"
    format: str = "tensors"  # how it was read (bngraph.training.data_formats), for the run's metadata
    label_file: str = ""  # where the largest label comes from, for errors
    class_names: tuple[str, ...] | None = None  # what label i means, where the data names it (class folders)
    input_scale: str | None = None  # how stored images became the model's inputs (UINT8_SCALE), None: as stored
    files_sha256: str | None = None  # `image_folder_digest` of an image folder's files and labels

    def __post_init__(self):
        # As the readers check files: 300 images and 10 labels ended in an IndexError mid-training.
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            for name, value in ((f"x_{part}", x), (f"y_{part}", y)):
                if not isinstance(value, torch.Tensor):  # numpy arrays: an AttributeError below
                    raise UserError(f"TensorData's {name} is a {type(value).__name__}, not a tensor: give torch "
                                    "tensors (torch.from_numpy(array))")
            if len(x) != len(y):
                raise UserError(f"x_{part} holds {len(x)} examples but y_{part} {len(y)} labels")
            if x.is_meta or y.is_meta:
                raise UserError(f"{'x' if x.is_meta else 'y'}_{part} is on the meta device (no values)")
            if len(x) == 0:
                raise UserError(f"x_{part} is empty: a run needs examples to {'train' if part == 'train' else 'test'} on")
            # As the readers' `_check_labels`: one-hot labels trained as probabilities, and the
            # accuracy compared (N,) with (N, C) by broadcasting, without a word.
            if y.dim() != 1:
                one_hot = " (one-hot labels: y.argmax(1))" if y.dim() == 2 and y.shape[1] > 1 else ""
                raise UserError(f"y_{part} has shape {tuple(y.shape)}; expected one class index per example, "
                                f"shape ({len(y)},){one_hot}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise UserError(f"y_{part} holds {str(y.dtype).removeprefix('torch.')} labels; expected integer class "
                                "indices (torch.long)")
            if y.numel() and int(y.min()) < 0:
                raise UserError(f"y_{part} has label {int(y.min())}; labels are class indices from 0")
            if y.dtype != torch.int64:  # cross_entropy takes int64 targets only
                setattr(self, f"y_{part}", y.long())
        # As the readers' `_check_splits_one_shape`: the first evaluation raised, after every step.
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise UserError(f"x_train's examples have shape {tuple(self.x_train.shape[1:])} but x_test's "
                            f"{tuple(self.x_test.shape[1:])}: the test examples must be the training examples' shape")

    @classmethod
    def from_dataset(cls, dataset, device: torch.device | str = "cpu") -> TensorData:
        return cls(*dataset.as_float(device), name=dataset.name, source=dataset.source, format="mnist-idx",
                   label_file=dataset.source, input_scale=UINT8_SCALE)

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def example(self, n: int = 2) -> torch.Tensor:
        return self.x_train[:n]

    def to(self, device: torch.device) -> TensorData:
        """These tensors on `device` (self when they are there already)."""
        if self.x_train.device == device:
            return self
        moved = [t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)]
        return replace(self, x_train=moved[0], y_train=moved[1], x_test=moved[2], y_test=moved[3])


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class StreamData:
    """Data too large for the device: torch Datasets of (image, label), read by a DataLoader with
    worker processes (pinned memory on CUDA), in the batches `EpochSampler` picks."""

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    name: str = "data"
    source: str = "datasets"
    format: str = "stream"
    num_classes: int | None = None  # None: unknown until the model says (a factory's Datasets)
    example_shape: tuple[int, ...] | None = None
    label_file: str = ""
    workers: int | None = None  # None: one per core, less one, at most 8
    device: torch.device | str = "cpu"
    class_names: tuple[str, ...] | None = None  # as TensorData's
    input_scale: str | None = None  # as TensorData's
    files_sha256: str | None = None  # as TensorData's

    @property
    def n_train(self) -> int:
        return len(self.train)

    def example(self, n: int = 2) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.train[i][0]) for i in range(n)])  # as the model takes them

    def loader(self, dataset, *, batch_sampler=None, batch_size: int = 1, pin: bool = False, persistent: bool = False,
               seed: int = 0):
        workers = default_workers() if self.workers is None else self.workers
        batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
        # Each iterator draws its workers' base seed from the loader's generator, by default the
        # global one that dropout draws from: a resume, which starts one iterator more, would move
        # every later dropout mask.
        generator = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(dataset, num_workers=workers, pin_memory=pin, generator=generator,
                                           persistent_workers=persistent and workers > 0, **batching)


@contextlib.contextmanager
def seeded(key: str) -> Iterator[None]:
    """torch's, NumPy's and Python's global generators seeded from `key` for the block, and put
    back after: a user's Dataset that augments with torch.rand (as torchvision's transforms do),
    np.random or random draws the same values for the same key, run after run."""
    seed = zlib.crc32(key.encode())  # the CPU generator keeps 32 bits of a seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class _StepBatch(list):
    """The indices of one step's batch, and the step (which the workers' seed comes from)."""

    def __init__(self, indices, step: int):
        super().__init__(indices)
        self.step = step


class _StepBatches:
    """The index batches of steps [start, stop), for a DataLoader's batch_sampler."""

    def __init__(self, sampler: EpochSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield _StepBatch(self.sampler(step).tolist(), step)


class _SeededBatches(torch.utils.data.Dataset):
    """A Dataset whose batches are each read with the generators seeded from `key(batch)`."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, batch) -> str:
        raise NotImplementedError

    def __getitems__(self, batch):
        with seeded(self.key(batch)):
            if hasattr(self.dataset, "__getitems__"):
                return self.dataset.__getitems__(batch)
            return [self.dataset[i] for i in batch]


class _SeededByStep(_SeededBatches):
    """A training Dataset whose batch of step s is read with the generators seeded from (seed,
    s, rank): whichever worker reads it, in a fresh run or a resumed one, it draws the same
    augmentation. (Seeded per worker, the draws would follow the worker's round of batches,
    which starts over where a resume starts its loader.)"""

    def __init__(self, dataset, seed: int, rank: int):
        super().__init__(dataset, seed)
        self.rank = rank

    def key(self, batch: _StepBatch) -> str:
        return f"{self.seed}:step{batch.step}:rank{self.rank}"


class _SeededByFirstIndex(_SeededBatches):
    """A test Dataset whose batches are read with the generators seeded from (seed, the index of
    the batch's first example): the test batches are the same at every evaluation, so each
    example draws the same augmentation each time, whichever worker reads it. (Seeded per
    batch, not per example: seeding costs about as much as reading a small image.)"""

    def key(self, batch: list[int]) -> str:
        return f"{self.seed}:test{batch[0]}"


def user_error_from_worker(err: UserError) -> UserError:
    """A UserError raised in a DataLoader worker comes back wrapped in its traceback, ending
    `bngraph.errors.ModelRaised: line` (its own type, a subclass maybe): keep the line."""
    last = str(err).strip().splitlines()[-1]
    name, colon, line = last.partition(": ")
    return type(err)(line if colon and name.rsplit(".", 1)[-1] == type(err).__name__ else last)


def step_batches(data: TensorData | StreamData, sampler: EpochSampler, start: int, stop: int,
                 dev: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of each step from `start`: an index into device tensors, or a DataLoader's batch."""
    if isinstance(data, TensorData):
        for step in range(start, stop):
            index = sampler(step)
            yield data.x_train[index], data.y_train[index]
        return
    loader = data.loader(_SeededByStep(data.train, sampler.seed, sampler.rank),
                         batch_sampler=_StepBatches(sampler, start, stop), pin=dev.type == "cuda",
                         seed=zlib.crc32(f"{sampler.seed}:{start}".encode()))
    batches = iter(loader)
    while True:
        try:
            x, y = next(batches)
        except StopIteration:
            return
        except UserError as err:
            raise user_error_from_worker(err) from None
        yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)


def streamed_test_loader(data: StreamData, seed: int, rank: int, world_size: int, batch_size: int, pin: bool):
    """A DataLoader of this rank's share of the streamed test set, read seeded (`_SeededByFirstIndex`).
    Unseeded, with no workers a Dataset's random draws came from the generator dropout draws
    from (the training after each evaluation depended on --loader-workers), and persistent
    workers' draws went on from one evaluation to the next and started over on a resume."""
    shard = torch.utils.data.Subset(_SeededByFirstIndex(data.test, seed), range(rank, len(data.test), world_size))
    return data.loader(shard, batch_size=batch_size, pin=pin, persistent=True)


def same_name(name: str) -> str:
    """A class name as compared: Unicode NFC. macOS writes file names decomposed (NFD: "e" and a
    combining accent), most other systems composed: "café" copied from one to the other prints
    alike, but is another string."""
    return unicodedata.normalize("NFC", name)


def data_fingerprint(data: TensorData | StreamData) -> dict:
    """What a resumed run must find again, since the batches and what they teach depend on it:
    the numbers of examples, the image shape, the format, the input scale, the class names, for
    an image folder a digest of its files and labels, for data in memory digests of the training
    labels and images, and whether a factory's items were held or streamed. (A checkpoint written
    before a key was added lacks it, and is not held to it.)"""
    test = len(data.y_test) if isinstance(data, TensorData) else len(data.test)
    classes = None if data.class_names is None else [same_name(c) for c in data.class_names]
    found = {"training examples": data.n_train, "test examples": test,
             "image shape": list(data.example(1).shape[1:]), "format": data.format,
             "input scale": data.input_scale or AS_STORED, "classes": classes}
    if data.files_sha256 is not None:
        found["image files and labels (SHA-256)"] = data.files_sha256
    if isinstance(data, TensorData):
        found["training labels (SHA-256)"] = hashlib.sha256(data.y_train.cpu().numpy().tobytes()).hexdigest()[:16]
        # The pixels too, where they are at hand: an .npz saved again with other images (the
        # labels kept) trained on two datasets, matching no run.
        found["training images (SHA-256)"] = _tensor_digest(data.x_train)
    if data.format in ("factory", "datasets"):
        # A factory's Dataset may augment at random: held in memory, each item is drawn once,
        # streamed, at each step, so the two are other data (plain data gives the same batches).
        found["factory items"] = "streamed" if isinstance(data, StreamData) else "held in memory"
    return found


def _tensor_digest(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for chunk in tensor.reshape(len(tensor), -1).split(4096):  # on the CPU a chunk at a time
        digest.update(chunk.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_finite(images: torch.Tensor, where: str, first_index: int = 0) -> None:
    """Refuse images holding NaN or infinities, naming the first (`where`[index], counted from
    `first_index`): trained on, they make NaN weights that look like any others until the end.
    Checked as float32, which the model is given: a float64 1e39 is finite, and becomes inf."""
    if not images.is_floating_point():
        return
    finite = torch.isfinite(images.to(torch.float32).reshape(len(images), -1)).all(1)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        if bool(torch.isfinite(images[first]).all()):
            raise UserError(f"{where}[{first_index + first}] holds a value beyond float32's range (up to "
                            f"{torch.finfo(torch.float32).max:.3g}), which becomes infinite as the model's input; "
                            "images must be finite in float32")
        raise UserError(f"{where}[{first_index + first}] holds NaN or infinite values; images must be finite")


def refuse_what_is_not_logits(logits: torch.Tensor) -> None:
    """UserError where a training step's outputs are probabilities: a model may apply its softmax
    in training mode only, which the eval-mode probe cannot see."""
    if (kind := output_kind(logits)) is not None:
        raise UserError(f"in training mode {_NOT_LOGITS[kind]}")


def logits_of(output, *, mode: str = "eval") -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or the `logits` entry of a dict or field
    of an object (HuggingFace's ModelOutput, a user's dataclass in its style). Anything else is
    the user's: a UserError naming the `mode` that returned it (a model may return a tuple of
    logits and auxiliary logits in training mode only)."""
    logits = output
    if not isinstance(output, torch.Tensor):
        logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(output).__name__
        raise UserError(
            f"in {mode} mode the model's output is {got}; training needs logits of shape (N, classes), "
            "returned alone or as the `logits` entry of a dict or dataclass"
        )
    return logits


def logits_width(module: nn.Module, example_inputs) -> int | None:
    """How many logits (N, classes) `module` gives in eval mode on `example_inputs`; None where
    its output holds no such logits (the class names name nothing there)."""
    from bngraph.runners import eval_mode

    device = next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
    try:
        with torch.no_grad(), eval_mode(module), running_user_model(), torch.random.fork_rng(devices=[]):
            inputs = [x.to(device, copy=True) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            return logits_of(module(*inputs)).shape[1]
    except Exception:
        return None


# Cross-entropy takes logits and applies its own softmax; on probabilities it trains on
# softmax(softmax(z)), and on a sigmoid's scores, squashed into (0, 1), it can never be
# confident: both run and learn little. (log_softmax outputs are fine: it is idempotent.)
_NOT_LOGITS = {
    "probabilities": "the model's outputs are probabilities (each row is at least 0 and sums to 1, as after a "
                     "softmax); training's cross-entropy takes logits: return the scores before the softmax",
    "squashed": "the model returns a sigmoid's outputs, scores squashed into (0, 1); training's cross-entropy "
                "takes logits: return the scores before the sigmoid",
}
_SIGMOIDS = frozenset({torch.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, torch.special.expit,
                       nn.functional.sigmoid, nn.functional.hardsigmoid})


class _SigmoidOutputs(torch.overrides.TorchFunctionMode):
    """The tensors a sigmoid returned while the mode was on, each with its version then (told by
    the function, not by the values: a fresh model's logits on inputs in [0, 1) may all lie in
    (0, 1) too; an in-place op after it, `h *= gain`, makes them something else)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[torch.Tensor, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SIGMOIDS and isinstance(out, torch.Tensor):
            self.outputs.append((out, out._version))
        return out

    def returned(self, logits: torch.Tensor) -> bool:
        """Whether `logits` is a sigmoid's output (or a view of one), unchanged since."""
        base = logits if logits._base is None else logits._base
        return any((base is out or logits is out) and out._version == version for out, version in self.outputs)


def output_kind(logits: torch.Tensor, sigmoids: _SigmoidOutputs | None = None) -> str | None:
    """'probabilities' (rows of at least 0 summing to 1), 'squashed' (a sigmoid's outputs, as
    `sigmoids` saw them made) or None for logits. The sums are taken to 1e-2: probabilities
    computed in bfloat16 sum to 1 within 2e-3 only."""
    if sigmoids is not None and sigmoids.returned(logits):
        return "squashed"
    values = logits.detach().double()
    if values.shape[1] > 1 and bool((values >= 0).all()) and bool(((values.sum(1) - 1).abs() <= 1e-2).all()):
        return "probabilities"
    return None


def check_model_fits(model: nn.Module, data: TensorData | StreamData, *, for_training: bool = True) -> str | None:
    """Run two training images through `model`: a wrong input or output shape is the user's, and
    so is a label the model has no output for, or (`for_training`) outputs that are not logits.
    Returns the `output_kind` of its eval-mode outputs."""
    if len(shapes := declared_shapes(model, type(model).__name__) or ()) > 1:
        # Trained on one, its artifact would be traced with the others fixed at their defaults.
        raise UserError(f"{type(model).__name__} declares {len(shapes)} inputs (example_input_shapes); training feeds "
                        "a model one, each example's data: train a model whose forward takes that one alone")
    was_training = model.training
    example = data.example(2)
    device = next(iter(model.parameters()), example).device
    try:
        with torch.no_grad(), _SigmoidOutputs() as sigmoids:
            output = model.eval()(example.to(device))
    except Exception as err:
        shape = "x".join(map(str, example.shape[1:]))
        raise model_raised(err, failed=f"the model cannot take {data.name} images ({shape}) from {data.source}") from err
    finally:
        model.train(was_training)
    logits = logits_of(output)
    kind = output_kind(logits, sigmoids)
    if for_training and kind is not None:
        raise UserError(_NOT_LOGITS[kind])
    outputs = logits.shape[1]
    if data.num_classes is None:  # a factory's streamed labels: checked as they come
        data.train.num_classes = data.test.num_classes = outputs
    elif outputs < data.num_classes:
        raise UserError(
            f"{data.label_file or data.source}: label {data.num_classes - 1} is out of range for the model's "
            f"{outputs} outputs; {data.name}'s labels need logits of shape (N, {data.num_classes})"
        )
    return kind
