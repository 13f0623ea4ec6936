"""The data users have, told apart by what `--data` holds, and made into what `train` needs.

    data = open_data("~/flowers", input_shape=(2, 3, 64, 64), device="cuda")

Formats (`detect_format`), each named in the run's metadata. Only image folders are converted to
the model's input (channels, size); the others are taken as they are, and a shape the model
cannot take is the user's error:
  mnist-idx      the four MNIST-format IDX files (bngraph.data, unchanged)
  image-folder   DIR/train/CLASS/*.png|jpg|... (IMAGE_SUFFIXES) and DIR/test/CLASS/... (or
                 DIR/val/...), torchvision's ImageFolder convention: classes are the sorted folder
                 names of train/. Pillow decodes; each image is converted to L or RGB for the model's
                 channel count (L without a channel axis for a model declaring (N, H, W)) and resized
                 (bilinear) to --image-size or the model's input size
  npz            a NumPy .npz with x_train, y_train, x_test, y_test (Keras' convention): images
                 N,H,W or N,H,W,C or N,C,H,W (the channel axis is the one matching the model's; N,H,W
                 stays so for a model declaring (N, H, W)), uint8 (scaled to [0, 1]) or float (as
                 is); read without pickles
  cifar-10-bin   data_batch_1..5.bin and test_batch.bin, records of 1 label byte and 3x32x32 bytes
  cifar-100-bin  train.bin and test.bin, records of a coarse and a fine label byte, then 3x32x32
                 (fine labels unless told otherwise). The pickled Python versions are never read:
                 unpickling a downloaded file runs whatever code it holds
  factory        FILE.py:make (or FILE.py, calling `make`): a function returning (train, test),
                 torch Datasets of (image tensor, integer label)
  datasets       in Python, such a (train, test) tuple of Datasets itself (`bngraph.train`)

Data whose float32 images fit under `stream_above_mb` go to the device as whole tensors
(`TensorData`: a batch is an index, the fast path). Larger data becomes `StreamData`: a DataLoader
with worker processes (pinned memory on CUDA) reads the batches the same `EpochSampler` picks, so
a resumed run still sees the same batches. Bad data is a UserError naming the file.

One module (over 300 lines) because it is one table: each format's reader sits under the
docstring line that describes it, and `open_data` dispatches over them at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bngraph.data import FILES, find_idx_file, load_mnist
from bngraph.errors import UserError, model_raised, one_line, require_file
from bngraph.load import call_user_factory, declared_shapes, import_user_file
from bngraph.training.data import UINT8_SCALE, StreamData, TensorData, check_finite, logits_width, same_name, seeded

# torchvision's ImageFolder's (all of which Pillow decodes), .jfif (JPEGs as browsers save them) and .gif:
# a file of another suffix is not an image, and is left out.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_SUBFOLDERS = ("", "cifar-10-batches-bin", "cifar-100-binary")
CIFAR_PIXELS = 3 * 32 * 32
DEFAULT_STREAM_ABOVE_MB = 2048.0
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what Pillow's convert("L") uses


@dataclass(frozen=True)
class Target:
    """What the model takes: channels and H, W from its example input (None: the data's own), and
    its dtype where that is an integer one (token ids for an Embedding: never made float).
    `channel_axis`: False for a model declaring (N, H, W) (an MLP, or a GRU over (N, T, F)), whose
    input has no channel axis to add to 3-d data."""

    channels: int | None = None
    size: tuple[int, int] | None = None
    integer_dtype: torch.dtype | None = None
    channel_axis: bool = True

    @property
    def image_channels(self) -> int | None:
        """The channels an image file or a PIL image is decoded to: one for a model declaring (N, H, W)."""
        return self.channels if self.channel_axis else 1

    @classmethod
    def of(cls, input_shape, image_size=None, input_dtype: torch.dtype | None = None) -> Target:
        channels, size = None, None
        if input_shape is not None and len(input_shape) == 4:
            channels, size = int(input_shape[1]), (int(input_shape[2]), int(input_shape[3]))
        elif input_shape is not None and len(input_shape) == 3:  # (N, H, W): one channel, without its axis
            size = (int(input_shape[1]), int(input_shape[2]))
        integer = input_dtype if input_dtype is not None and not input_dtype.is_floating_point else None
        channel_axis = input_shape is None or len(input_shape) == 4  # undeclared: N,H,W images get one, as MNIST's
        return cls(channels, parse_image_size(image_size) if image_size is not None else size, integer, channel_axis)


def parse_image_size(text) -> tuple[int, int]:
    if isinstance(text, (tuple, list)):
        dims = tuple(int(d) for d in text)
    else:
        try:
            dims = tuple(int(d) for d in str(text).split(","))
        except ValueError:
            dims = ()
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise UserError(f"bad --image-size {text!r}: expected H,W (e.g. 224,224) or one number")
    return dims


def detect_format(path: str | Path | tuple) -> str:
    """Which format `path` holds (see the module docstring), or a UserError saying what it lacks."""
    if isinstance(path, tuple):
        return "datasets"
    text = str(path)
    if ".py:" in text or text.endswith(".py"):
        return "factory"
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise UserError(f"{path} is a file but not an .npz or a .py factory; --data takes a folder, an .npz or FILE.py:make")
    if not path.is_dir():
        require_file(path, "data")  # says what is there, where it is not a folder or a file
    if any(find_idx_file(path, name) for name in FILES):
        return "mnist-idx"
    for sub in CIFAR_SUBFOLDERS:
        if (path / sub / "test_batch.bin").is_file():
            return "cifar-10-bin"
        if (path / sub / "train.bin").is_file() and (path / sub / "test.bin").is_file():
            return "cifar-100-bin"
    if (path / "train").is_dir():
        return "image-folder"
    if any(path.glob("*.npz")):
        raise UserError(f"{path} holds .npz files: name one with --data {path}/FILE.npz")
    raise UserError(
        f"cannot tell what {path} holds: expected MNIST IDX files, CIFAR binary batches (*.bin), "
        "or an image folder (train/CLASS/*.png and test/CLASS/...)"
    )


# --- images as uint8 or float arrays, N x C x H x W --------------------------------------------


def to_model_input(x: torch.Tensor, target: Target) -> torch.Tensor:
    """uint8 (scaled to [0, 1]) or float images N,C,H,W -> float32 with the target's channels and size
    (one channel without its axis, N,H,W, for a model declaring that); integers for a model that takes
    integers (token ids, or pixels for a model that declares an integer input) -> its dtype, as they are."""
    if target.integer_dtype is not None and not x.is_floating_point():
        return (x if target.channel_axis else x[:, 0]).to(target.integer_dtype).contiguous()
    x = x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)
    c = x.shape[1]
    if target.channels is not None and target.channels != c:
        if c == 3 and target.channels == 1:
            x = sum(w * x[:, i : i + 1] for i, w in enumerate(_LUMA))
        elif c == 1:
            x = x.expand(-1, target.channels, -1, -1)
    if target.size is not None and tuple(x.shape[2:]) != target.size:
        x = F.interpolate(x, size=target.size, mode="bilinear", align_corners=False, antialias=True)
    return (x if target.channel_axis else x[:, 0]).contiguous()


@dataclass
class Split:
    images: torch.Tensor  # N, C, H, W; uint8 or float32, on the CPU
    labels: torch.Tensor  # N, int64
    label_file: str  # where the labels come from, for errors


class ArrayDataset(torch.utils.data.Dataset):
    """A split held on the CPU, converted batch by batch (the streaming path of in-RAM formats)."""

    def __init__(self, split: Split, target: Target):
        self.split, self.target = split, target

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):  # DataLoader fetches a whole batch with one call
        index = torch.as_tensor(indices)
        x = to_model_input(self.split.images[index], self.target)
        return list(zip(x, self.split.labels[index]))


def _check_labels(labels: np.ndarray, where: str, limit: int | None = None) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras' CIFAR labels are (N, 1)
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise UserError(f"{where} has labels of shape {labels.shape}; expected one integer per example")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where} has labels of type {labels.dtype}; expected integers (class indices)")
    if labels.dtype == np.uint64 and labels.size and int(labels.max()) > np.iinfo(np.int64).max:
        i = int(np.argmax(labels))  # named as it is: cast to int64, it would wrap to a negative label
        raise UserError(f"{where} has label {int(labels[i])} at index {i}; labels are class indices from 0")
    if labels.size and labels.min() < 0:
        i = int(np.argmin(labels))
        raise UserError(f"{where} has label {labels[i]} at index {i}; labels are class indices from 0")
    if limit is not None and labels.size and labels.max() >= limit:
        i = int(np.argmax(labels))
        raise UserError(f"{where} has label {labels[i]} at index {i}; labels must be 0 to {limit - 1}")
    return labels.astype(np.int64)


# --- the readers --------------------------------------------------------------------------------


_NPY_MAGIC, _ZIP_MAGIC = b"\x93NUMPY", b"PK"
_NPZ_HOWTO = "np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...)"


def _check_is_npz(path: Path) -> None:
    """An .npz is a zip of .npy files; anything else would reach numpy, whose answer for a file
    it cannot tell is advice to unpickle it."""
    try:
        with path.open("rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if head.startswith(_NPY_MAGIC):
        raise UserError(f"{path} is one .npy array, not an .npz of x_train, y_train, x_test, y_test: save them "
                        f"with {_NPZ_HOWTO}")
    if not head.startswith(_ZIP_MAGIC):
        raise UserError(f"{path} is not an .npz (not a zip file of arrays): save the data with {_NPZ_HOWTO}")


def _native_order(array: np.ndarray) -> np.ndarray:
    """Big-endian arrays (some non-Python tools write them) are valid data; torch takes native order only."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _npy_member(archive, key: str, path: Path) -> np.ndarray:
    """`key`'s array; numpy gives a member that is not in .npy format (a pickle some tools write
    under the name) as its raw bytes, which are never unpickled here."""
    member = archive[key]
    if not isinstance(member, np.ndarray):
        raise UserError(f"{path}: {key} is not a NumPy array (its {key}.npy member is not in .npy format): "
                        f"save the data with {_NPZ_HOWTO}")
    return member


def read_npz(path: Path, target: Target) -> tuple[Split, Split]:
    _check_is_npz(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(archive.files) or 'nothing'})")
            arrays = {k: _native_order(_npy_member(archive, k, path)) for k in ("x_train", "y_train", "x_test", "y_test")}
    except UserError:
        raise
    except (OSError, ValueError, EOFError) as err:  # a damaged zip, or object arrays (pickles)
        raise UserError(f"cannot read {path} as an .npz of arrays: {err}") from None
    splits = []
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        where = f"{path} (y_{part})"
        y = _check_labels(y, where)
        if x.ndim not in (3, 4):  # before len(x): a 0-d array has none
            raise UserError(f"{path}: x_{part} has shape {x.shape}; images are N,H,W or N,H,W,C or N,C,H,W")
        if len(x) != len(y):
            raise UserError(f"{path}: x_{part} holds {len(x)} examples but y_{part} {len(y)} labels")
        if len(x) == 0:
            raise UserError(f"{path}: x_{part} is empty")
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise UserError(f"{path}: x_{part} is {x.dtype}; expected uint8 (0-255) or float images")
        check_finite(torch.from_numpy(x), f"{path}: x_{part}")
        splits.append(Split(torch.from_numpy(_nchw(x, target, f"{path}: x_{part}")), torch.from_numpy(y), where))
    train, test = splits
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"{path}: x_train images are {tuple(train.images.shape[1:])}, x_test {tuple(test.images.shape[1:])}")
    _check_items_on_one_scale([(f"{path}: x_train", torch.from_numpy(arrays["x_train"])),
                               ("x_test", torch.from_numpy(arrays["x_test"]))], target,
                              fix="save both as uint8, or both as floats on one scale")
    return train, test


def _nchw(x: np.ndarray, target: Target, where: str) -> np.ndarray:
    if x.ndim == 3:  # N,H,W images get their channel axis; N,T,F for a model declaring (N, T, F) stays so
        return np.ascontiguousarray(x[:, None] if target.channel_axis else x)
    channels = target.channels
    if channels is not None:
        nhwc, nchw = x.shape[3] == channels, x.shape[1] == channels
        if nhwc and nchw and target.size is not None:  # the model's H, W tell which, where one layout has them
            nhwc, nchw = x.shape[1:3] == target.size, x.shape[2:] == target.size
            if not (nhwc or nchw):  # both axes are its channels: what is wrong is the images' size
                (h, w), size = target.size, "{}x{}".format
                raise UserError(f"{where} has shape {x.shape}: as N,H,W,C its images are {size(*x.shape[1:3])}, as "
                                f"N,C,H,W {size(*x.shape[2:])}; neither is the model's {size(h, w)} images")
        if nhwc and nchw:  # read as NHWC, data saved N,C,H,W would have its pixels transposed
            raise UserError(f"{where} has shape {x.shape}: axes 1 and 3 both hold the model's {channels} channels, so "
                            "N,H,W,C and N,C,H,W cannot be told apart; give the images through a factory (data.py:make) "
                            "as C,H,W tensors")
        if nhwc:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if nchw:
            return np.ascontiguousarray(x)
        raise UserError(f"{where} has shape {x.shape}: neither axis 1 nor axis 3 is the model's {channels} channels")
    if x.shape[1] == x.shape[3]:  # a model that takes any shape (C == H == W, adaptive pooling) cannot tell
        raise UserError(f"{where} has shape {x.shape}: axes 1 and 3 have the same size, so N,H,W,C and N,C,H,W "
                        "cannot be told apart, and the model declares no input shape: give it one (--input-shape, "
                        "batch first, or example_input_shape), or the images through a factory (data.py:make)")
    if x.shape[3] in (1, 3, 4) or x.shape[1] not in (1, 3, 4):  # Keras' NHWC unless it cannot be
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return np.ascontiguousarray(x)


def read_cifar(root: Path, fmt: str, labels: str = "fine") -> tuple[Split, Split]:
    """CIFAR-10/100 binary records; `labels` picks CIFAR-100's fine (100) or coarse (20) classes."""
    if labels not in ("fine", "coarse"):
        raise UserError(f"CIFAR-100 labels are 'fine' or 'coarse', not {labels!r}")
    label_bytes, limit = (1, 10) if fmt == "cifar-10-bin" else (2, 100 if labels == "fine" else 20)
    which = 0 if fmt == "cifar-10-bin" or labels == "coarse" else 1
    folder = next(root / s for s in CIFAR_SUBFOLDERS if (root / s / ("test_batch.bin" if fmt == "cifar-10-bin" else "test.bin")).is_file())
    names = (CIFAR10_TRAIN, ("test_batch.bin",)) if fmt == "cifar-10-bin" else (("train.bin",), ("test.bin",))
    splits = []
    for part in names:
        images, ys = [], []
        for name in part:
            path = folder / name
            if not path.is_file():
                raise UserError(f"{folder} lacks {name} ({fmt}: {', '.join(part)})")
            raw = np.fromfile(path, dtype=np.uint8)
            record = label_bytes + CIFAR_PIXELS
            if raw.size == 0 or raw.size % record:
                raise UserError(f"{path} holds {raw.size} bytes, not a whole number of {record}-byte {fmt} records")
            raw = raw.reshape(-1, record)
            ys.append(_check_labels(raw[:, which].copy(), str(path), limit))
            images.append(raw[:, label_bytes:].reshape(-1, 3, 32, 32))
        where = str(folder / part[0]) if len(part) == 1 else f"{folder}/data_batch_*.bin"
        splits.append(Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(ys)), where))
    return splits[0], splits[1]


def _image_files(folder: Path) -> list[Path]:
    """The images anywhere under a class folder, as torchvision's ImageFolder finds them (it walks
    subfolders too: a `dog/batch1/*.jpg` left out would train on less than the user gave), less
    hidden files and folders (macOS's `._x.jpg` are not images)."""
    found = []
    for parent, folders, names in os.walk(folder, followlinks=True):
        folders[:] = [d for d in folders if not d.startswith(".")]
        for name in folders:  # a link back to a folder above: its images again, and other classes' under this one
            target = Path(parent, name).resolve()
            if Path(parent).resolve().is_relative_to(target) or folder.resolve().is_relative_to(target):
                raise UserError(f"{Path(parent, name)} links back to {target}, which holds it: its images would be "
                                "read again, and under this class; remove the link")
        found += [Path(parent, n) for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.startswith(".")]
    for path in found:
        if path.exists() and not path.is_file():  # a FIFO or a device: reading one waits for ever
            raise UserError(f"{path} is not a regular file (a pipe or a device): move it out of the class folder")
    return sorted(found)


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]], Path]:
    """Classes (sorted folder names of train/) and the (file, class) pairs of train and test."""
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise UserError(f"{root} has train/ but no test/ (or val/) folder of the same classes")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders (train/CLASS/*.png)")
    index = {same_name(c): i for i, c in enumerate(classes)}
    if len(index) < len(classes):
        raise UserError(f"{root / 'train'} has two class folders of one name, spelled in two Unicode forms (composed "
                        "and decomposed, as macOS writes names): merge them")
    splits = []
    for split_dir in (root / "train", test_dir):
        pairs = []
        for folder in sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
            if same_name(folder.name) not in index:
                raise UserError(f"{folder} is a class that {root / 'train'} does not have")
            files = _image_files(folder)
            if not files:
                raise UserError(f"{folder} is an empty class folder (no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images)")
            pairs += [(f, index[same_name(folder.name)]) for f in files]
        if not pairs:
            raise UserError(f"{split_dir} has no class folders with images")
        splits.append(pairs)
    return classes, splits[0], splits[1], test_dir


def image_folder_digest(splits: dict[str, tuple[Path, list[tuple[Path, int]]]]) -> str:
    """A digest of each image's path in its split folder and its label, over `splits` (name ->
    (folder, (file, label) pairs)): a class folder renamed, or files moved between classes, leave
    the counts and often the label sequence as they were, but not this."""
    digest = hashlib.sha256()
    for name, (folder, pairs) in splits.items():
        for path, label in pairs:
            # NFC: a folder renamed from macOS's decomposed form to the composed one is the same class.
            entry = same_name(f"{name}/{path.relative_to(folder).as_posix()}\t{label}\n")
            digest.update(entry.encode(errors="surrogateescape"))
    return digest.hexdigest()[:16]


# Pillow's modes of more than 8 bits a channel (16-bit PNG and TIFF, as medical images often are).
_WIDE_MODES = {"I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
               "F": "32-bit float"}


def converted(image: Image.Image, mode: str, where, fix: str) -> Image.Image:
    """`image` in `mode` (L or RGB; a factory's may keep its own), its pixels 8 bits each, as an
    image folder's and a factory's PIL images are read; one of more bits is refused with `fix`,
    what the user can do."""
    if image.mode in _WIDE_MODES:  # convert() would clip every value above 255: a white image
        raise UserError(f"{where} has {_WIDE_MODES[image.mode]} pixels (mode {image.mode}); {fix}")
    if image.mode == "P" and "transparency" in image.info:
        # Pillow warns (on the user's stderr) converting a palette with a byte table of
        # transparency straight to L or RGB; through RGBA, the colours are the same.
        image = image.convert("RGBA")
    return image.convert(mode)


@contextlib.contextmanager
def opened_image(path: Path) -> Iterator[Image.Image]:
    """`path` opened by Pillow for the block, which decodes it. Whatever Pillow raises there is
    the file's, one line naming it: "cannot identify", truncated data, a bad header, a
    DecompressionBombError (an image of more pixels than Pillow will decode, or a header that
    claims so), and what else a damaged file makes a decoder raise (struct.error, IndexError)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns of an image of 89-179 million pixels in its own words and path; it is the user's image
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path}: not a readable image ({one_line(err)})") from None


def decode_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """One image file -> uint8 C,H,W in `mode` (L or RGB), resized to `size` (H, W) if given."""
    with opened_image(path) as image:
        image = converted(image, mode, path, "image folders are read as 8-bit images: convert the files, or "
                                             "give the data as an .npz of float arrays or a factory")
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return _chw(image)


def _chw(image: Image.Image) -> np.ndarray:
    array = np.array(image)  # a copy: torch wants writable memory
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded one by one (in the DataLoader's workers), all to one mode and size, and
    made the model's input as the same files held in memory are (`to_model_input` for `target`:
    integers for a model declaring an integer input, else floats in [0, 1])."""

    def __init__(self, pairs: list[tuple[Path, int]], mode: str, size: tuple[int, int], target: Target):
        self.pairs, self.mode, self.size, self.target = pairs, mode, size, target

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        path, label = self.pairs[i]
        image = torch.from_numpy(decode_image(path, self.mode, self.size))
        return to_model_input(image[None], self.target)[0], torch.tensor(label)


def with_model_classes(data, classes: tuple[str, ...] | None, model: nn.Module | None = None):
    """`data` with its class folders' labels mapped onto the model's `classes` (its output i is
    class i): a folder lacking one of them must not shift the others' labels. Classes the model
    does not know take the outputs after its own where `model` has that many (a head made wider
    to learn them), and are refused otherwise; so is data without class names for a model with
    them (its labels would retrain the outputs, the old names kept). A model without them takes
    any data."""
    if classes is not None and data.class_names is None:  # its labels would retrain the outputs under the old names
        raise UserError(f"{data.source} gives labels without class names, and the model's outputs are the classes "
                        f"{', '.join(classes[:6])}{' ...' if len(classes) > 6 else ''} (recorded in its bngraph.json): "
                        "give the data as class folders of those names, or use the model from before its training")
    if classes is None or data.class_names is None or tuple(data.class_names) == tuple(classes):
        return data
    output_of = {same_name(c): i for i, c in enumerate(classes)}
    unknown = [c for c in data.class_names if same_name(c) not in output_of]
    if unknown and model is not None and len(classes) + len(unknown) <= (logits_width(model, [data.example(2)]) or 0):
        output_of.update({same_name(c): len(classes) + i for i, c in enumerate(unknown)})
        classes, unknown = (*classes, *unknown), []
    if unknown:
        raise UserError(f"{data.source} has class folder {unknown[0]!r}, which is not one of the model's classes "
                        f"({', '.join(classes)}, recorded in its bngraph.json): leave that folder out"
                        + (", or give the model a head with an output for each new class" if model is not None else ""))
    label_of = [output_of[same_name(c)] for c in data.class_names]  # folder label -> the model's output
    if isinstance(data, TensorData):
        mapping = torch.tensor(label_of, device=data.y_train.device)
        return replace(data, y_train=mapping[data.y_train], y_test=mapping[data.y_test], class_names=tuple(classes))
    relabel = lambda files: ImageFiles([(p, label_of[c]) for p, c in files.pairs], files.mode, files.size,  # noqa: E731
                                       files.target)
    return replace(data, train=relabel(data.train), test=relabel(data.test), num_classes=len(classes),
                   class_names=tuple(classes))


def check_input_scale(data, model_scale: str | None) -> None:
    """Refuse images used as stored whose values leave [0, 1] for a model trained on uint8
    pixels / 255 (`model_scale`, its recorded `input_scale`): recalibrated or fine-tuned on them
    (an .npz of the same pictures as floats of 0-255, or normalized ones), it would move to
    inputs it is not given. (A model trained on images as stored records no range, so nothing
    is compared for it.)"""
    if model_scale != UINT8_SCALE or data.input_scale is not None:
        return
    # Streamed: 64 examples spread over the training set (its first ones may be a black frame).
    images = [data.x_train, data.x_test] if isinstance(data, TensorData) else [_spread_sample(data.train, 64)]
    if not images[0].is_floating_point():
        return  # integers for a model taking integers: as it was given them
    low, high = min(float(x.min()) for x in images), max(float(x.max()) for x in images)
    if low < 0 or high > 1:
        raise UserError(f"{data.source}: its images are used as stored, with values from {low:g} to {high:g}, but the "
                        f"model was trained on {UINT8_SCALE} (input_scale in its bngraph.json): give them as uint8 "
                        "(0-255, scaled as then) or as floats in [0, 1]")


def _spread_sample(dataset, count: int) -> torch.Tensor:
    """Up to `count` images of `dataset`, evenly spread over it, stacked."""
    step = max(1, len(dataset) // count)
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(0, len(dataset), step)][:count])


def image_folder_mode(channels: int | None) -> str:
    if channels in (None, 3):
        return "RGB"
    if channels == 1:
        return "L"
    raise UserError(f"the model takes {channels} channels; image folders give 1 (L) or 3 (RGB)")


def image_folder_size(pairs, target: Target) -> tuple[int, int]:
    """--image-size, the model's size, or (if neither is known) the images' one common size."""
    if target.size is not None:
        return target.size
    sizes = {}
    for path, _ in pairs:
        with opened_image(path) as image:
            sizes.setdefault(image.size[::-1], path)
        if len(sizes) > 1:
            (a, pa), (b, pb) = sizes.items()
            raise UserError(f"{pb} is {b[0]}x{b[1]} but {pa} {a[0]}x{a[1]}: give the size to train at with --image-size H,W")
    return next(iter(sizes))


# --- the factory --------------------------------------------------------------------------------


def read_factory(text: str):
    path_text, _, symbol = text.partition(".py:")
    path = Path(path_text + ".py" if symbol else text).expanduser()
    symbol = symbol or "make"
    require_file(path, "data factory file")
    try:  # a script's sys.exit() would end bngraph with its code and not a word
        code = import_user_file(path)
        make = getattr(code, symbol, None)
        if not callable(make):
            raise UserError(f"{path} has no function {symbol!r} returning (train, test) Datasets")
        made = call_user_factory(path, symbol, make)
    except SystemExit as stop:
        raise UserError(f"{path}:{symbol} called sys.exit({stop.code!r}) instead of returning (train, test) "
                        "Datasets") from None
    return check_datasets(made, f"{path}:{symbol}", f"{path}:{symbol}() returned"), f"{path}:{symbol}"


def check_datasets(made, where: str, what: str):
    """`made` if it is a tuple (train, test) of map-style Datasets with items; else a UserError
    naming `where` they come from and saying `what` (a factory's "data.py:make() returned")."""
    if isinstance(made, tuple) and any(isinstance(d, torch.utils.data.IterableDataset) for d in made):
        # Each step's batch is picked by index (EpochSampler), so that a resumed run sees the same.
        raise UserError(f"{what} an IterableDataset, which has no length and cannot be "
                        "indexed: training picks each step's examples by index; return map-style Datasets "
                        "(__len__ and __getitem__)")
    if isinstance(made, tuple) and any(isinstance(d, torch.utils.data.DataLoader) for d in made):
        raise UserError(f"{what} DataLoaders; expected a tuple (train, test) of Datasets: return "
                        "their .dataset (training batches them itself)")
    if not (isinstance(made, tuple) and len(made) == 2 and all(hasattr(d, "__getitem__") and hasattr(d, "__len__") for d in made)):
        got = f"a tuple of {len(made)}" if isinstance(made, tuple) else type(made).__name__
        raise UserError(f"{what} {got}; expected a tuple (train, test) of Datasets")
    for part, dataset in zip(("train", "test"), made):
        try:
            size = len(dataset)
        except Exception as err:  # __len__ raising, or returning a float or a negative number (TypeError, ValueError)
            raise model_raised(err, failed=f"len() of the {part} Dataset of {where} failed") from err
        if size == 0:
            raise UserError(f"{what} an empty {part} Dataset")
        _item(dataset, 0, f"{where} {part}")  # as the items read later name it
    return made


def _item(dataset, i: int, where: str, channels: int | None = None) -> tuple[torch.Tensor, int]:
    """Item i as (image tensor, label); a PIL image decoded for the model's `channels`."""
    try:
        item = dataset[i]
    except UserError:
        raise
    except Exception as err:  # a missing or corrupt file behind item i: the user's data, named
        raise model_raised(err, failed=f"{where}[{i}] could not be read") from err
    if isinstance(item, dict):  # a HuggingFace-style example: which key is the image is the user's call
        keys = ", ".join(map(repr, item))
        raise UserError(f"{where}[{i}] is a dict ({keys}); expected a tuple (image tensor, label): "
                        "return Datasets whose items are tuples, e.g. (item['pixel_values'], item['label'])")
    if not isinstance(item, (tuple, list)):
        raise UserError(f"{where}[{i}] is {type(item).__name__}; expected (image tensor, label)")
    if len(item) != 2:  # (image, label, path), as Datasets that keep the file name return
        raise UserError(f"{where}[{i}] is a {type(item).__name__} of {len(item)} items; expected 2, (image tensor, "
                        "label): return (image, label) from __getitem__")
    x, y = item
    if isinstance(x, Image.Image):  # as torchvision-style datasets give them without a transform
        x = torch.from_numpy(_pil_item(x, channels, f"{where}[{i}]"))
    if isinstance(x, np.ndarray) and (not x.flags.writeable or any(step < 0 for step in x.strides)):
        # A read-only array (np.frombuffer, a memory map): torch would share it and warn that
        # writing is undefined, pointing at this line; a flipped one (x[:, :, ::-1], negative
        # strides) torch refuses. A (contiguous) copy is the item's own.
        x = x.copy()
    try:
        x = torch.as_tensor(x).detach()  # an item computed by a module (a blur as a Conv2d) carries a graph
    except (TypeError, ValueError, RuntimeError):  # a tuple of two images, a string: one line, as _label says
        what = f"a {type(x).__name__} of {len(x)} values" if isinstance(x, (tuple, list)) else f"{type(x).__name__} {x!r:.40}"
        raise UserError(f"{where}[{i}] holds {what} where its image should be; expected (image tensor, label): "
                        "train takes one input tensor per example") from None
    check_finite(x[None], where, first_index=i)
    return x, _label(y, f"{where}[{i}]")


def _pil_item(image: Image.Image, channels: int | None, where: str) -> np.ndarray:
    """A factory's PIL image -> C,H,W, decoded as an image folder's (np.array of a palette image is
    its indices, not its colours); a float image (mode F) is its floats, as a float tensor is."""
    if image.mode == "F":
        return _chw(image)
    fix = ("a factory's PIL images are read as 8-bit images: return it as a float tensor in [0, 1] (16-bit: "
           "torch.from_numpy(np.array(image) / 65535))")
    return _chw(converted(image, _pil_item_mode(image, channels), where, fix))


def _pil_item_mode(image: Image.Image, channels: int | None) -> str:
    """L or RGB for a model of 1 or 3 channels, as an image folder's; for another model, the image's
    own pixels (L, LA, RGB, RGBA), and L or RGB for a mode whose values are not (a palette's indices)."""
    if channels in (1, 3):
        return image_folder_mode(channels)
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image.mode
    return "L" if image.mode == "1" else "RGB"


def _label(y, where: str) -> int:
    """A class index: an integer, or a float that is a whole number (3.0). int() would take 2.73
    as 2 and "3" as 3: a regression target or a string is not a class index."""
    try:
        value = None if isinstance(y, (str, bytes)) else torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        value = None
    if value is None or value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
        # A mask's or a one-hot vector's repr runs over many lines: its shape says what it is.
        what = f"a {type(y).__name__} of shape {tuple(value.shape)}" if value is not None and value.numel() > 1 else repr(y)
        raise UserError(f"{where} has label {what}; expected an integer class index")
    number = value.item()
    if value.is_floating_point() and not float(number).is_integer():
        raise UserError(f"{where} has label {number!r}; expected an integer class index (a float only when whole, "
                        "such as 3.0)")
    return int(number)


class CheckedLabels(torch.utils.data.Dataset):
    """A factory's Dataset, its labels checked as they stream (it may be too large to scan first)."""

    def __init__(self, dataset, where: str, num_classes: int | None = None, target: Target = Target(),
                 channel_axis: bool = False, channels: int | None = None):
        self.dataset, self.where, self.num_classes, self.target = dataset, where, num_classes, target
        self.channel_axis = channel_axis  # (H, W) items made (1, H, W), as the whole-data path makes them
        self.channels = channels  # the model's, which PIL images are decoded for

        self.first = _item(dataset, 0, where, channels)[0]
        self.shape = self.first.shape  # every item's: a batch is stacked from them

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = _item(self.dataset, i, self.where, self.channels)
        if x.shape != self.shape:  # the whole-data path's checks, item by item
            raise UserError(f"{self.where}[{i}] is an image of shape {tuple(x.shape)}, {self.where}[0] of "
                            f"{tuple(self.shape)}: the images of a split must all be one shape")
        if x.dtype != self.first.dtype:
            _check_items_on_one_scale([(f"{self.where}[0]", self.first), (f"{self.where}[{i}]", x)], self.target)
        if y < 0:
            raise UserError(f"{self.where}[{i}] has label {y}; labels are class indices from 0")
        if self.num_classes is not None and y >= self.num_classes:
            raise UserError(f"{self.where}[{i}] has label {y}, out of range for the model's {self.num_classes} outputs")
        # The conversion of the whole-data path (uint8 scaled to [0, 1]): streamed or not, the same values.
        x = x[None, None] if self.channel_axis else x[None]
        return to_model_input(x, self.target)[0], torch.tensor(y)


# --- putting it together ------------------------------------------------------------------------


def open_data(
    path: str | Path,
    *,
    input_shape=None,
    input_dtype: torch.dtype | None = None,
    image_size=None,
    device: torch.device | str = "cpu",
    stream_above_mb: float | None = DEFAULT_STREAM_ABOVE_MB,
    workers: int | None = None,
    dataset: str | None = None,
    cifar100_labels: str = "fine",
    seed: int = 0,
):
    """`path`'s data as TensorData on `device` (it fits) or StreamData (it does not; None: never).

    `input_shape` is the model's example input (N, C, H, W): its channels and size are what the
    images become; with an integer `input_dtype` (token ids), integer data stays integer. `dataset` names what an MNIST-format folder holds (default: the folder's name).
    A factory is called, and its items read, with the generators seeded from `seed`: a Dataset
    that augments at random gives the same data run after run (held in memory, each item is read
    once, its augmentation with it; streamed, each batch is read again, seeded by its step)."""
    fmt = detect_format(path)
    target = Target.of(input_shape, image_size, input_dtype)
    if image_size is not None and fmt != "image-folder":
        raise UserError(f"--image-size resizes image folders; {path} is {fmt}, whose images are used as they are")
    wanted = target  # only image folders are decoded to the model's channels and size ...
    target = target if fmt == "image-folder" else Target(integer_dtype=target.integer_dtype)  # ... others are what they hold
    device = torch.device(device)
    limit = None if stream_above_mb is None else stream_above_mb * 2**20

    def fits(n: int, per_example: int) -> bool:
        return limit is None or n * per_example * 4 <= limit

    def finish(train: Split, test: Split, name: str, source: str, class_names: tuple[str, ...] | None = None,
               scaled: bool = False, files_sha256: str | None = None):
        """`scaled`: uint8 images were converted already (a factory's, item by item)."""
        shape = tuple(to_model_input(train.images[:1], target).shape[1:])
        scaled = scaled or train.images.dtype == torch.uint8
        scale = UINT8_SCALE if scaled and target.integer_dtype is None else None
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
        # An error about the largest label names the split that holds it.
        label_file = train.label_file if int(train.labels.max()) + 1 == num_classes else test.label_file
        if fits(len(train.labels) + len(test.labels), int(np.prod(shape))):
            x = [_convert_in_chunks(s.images, target, device) for s in (train, test)]
            return TensorData(x[0], train.labels.to(device), x[1], test.labels.to(device), name, source,
                              format=fmt, label_file=label_file, class_names=class_names, input_scale=scale,
                              files_sha256=files_sha256)
        return StreamData(ArrayDataset(train, target), ArrayDataset(test, target), name, source, format=fmt,
                          num_classes=num_classes, example_shape=shape, label_file=label_file,
                          workers=workers, device=device, class_names=class_names, input_scale=scale,
                          files_sha256=files_sha256)

    if fmt == "mnist-idx":
        root = Path(path).expanduser()
        name = dataset or root.resolve().name  # a user's own IDX data is not MNIST
        mnist = load_mnist(root, name=name)
        # (N, 1, H, W), or as stored for a model declaring (N, H, W) (a GRU over rows, an MLP).
        split = lambda x, y, f: Split(x.unsqueeze(1) if wanted.channel_axis else x, y, str(Path(path) / f))  # noqa: E731
        return finish(split(mnist.train_images, mnist.train_labels, "train-labels-idx1-ubyte"),
                      split(mnist.test_images, mnist.test_labels, "t10k-labels-idx1-ubyte"), name, str(path))
    if fmt == "npz":
        train, test = read_npz(Path(path).expanduser(), wanted)
        return finish(train, test, Path(path).stem, str(path))
    if fmt in ("cifar-10-bin", "cifar-100-bin"):
        train, test = read_cifar(Path(path).expanduser(), fmt, cifar100_labels)
        name = fmt.removesuffix("-bin") + ("-coarse" if fmt == "cifar-100-bin" and cifar100_labels == "coarse" else "")
        return finish(train, test, name, str(path))
    if fmt == "image-folder":
        root = Path(path).expanduser()
        classes, train_pairs, test_pairs, test_dir = list_image_folder(root)
        mode = image_folder_mode(target.image_channels)
        size = image_folder_size(train_pairs[:1] + test_pairs[:1] if target.size else train_pairs + test_pairs, target)
        shape = (1 if mode == "L" else 3, *size) if target.channel_axis else size
        where = f"{root / 'train'} ({len(classes)} class folders)"
        digest = image_folder_digest({"train": (root / "train", train_pairs), "test": (test_dir, test_pairs)})
        if fits(len(train_pairs) + len(test_pairs), int(np.prod(shape))):
            splits = [Split(torch.from_numpy(np.stack([decode_image(p, mode, size) for p, _ in pairs])),
                            torch.tensor([c for _, c in pairs]), where) for pairs in (train_pairs, test_pairs)]
            return finish(splits[0], splits[1], root.name, str(root), tuple(classes), files_sha256=digest)
        files = [ImageFiles(pairs, mode, size, target) for pairs in (train_pairs, test_pairs)]
        return StreamData(*files, root.name, str(root), format=fmt, num_classes=len(classes), example_shape=shape,
                          label_file=where, workers=workers, device=device, class_names=tuple(classes),
                          input_scale=UINT8_SCALE if target.integer_dtype is None else None, files_sha256=digest)
    with seeded(f"{seed}:data"):  # before the run seeds torch: the factory's draws are the run's
        return _open_factory(path if fmt == "datasets" else str(path), target, input_shape, fits, finish, workers, device)


def _open_factory(path: str | tuple, target: Target, input_shape, fits, finish, workers, device):
    """open_data's factory branch (see there), and the datasets given in Python."""
    if isinstance(path, tuple):
        (train_set, test_set), where = check_datasets(path, "datasets", "the data given is"), "datasets"
    else:
        (train_set, test_set), where = read_factory(path)
    fmt = "datasets" if isinstance(path, tuple) else "factory"
    channels = Target.of(input_shape).image_channels  # which PIL images are decoded for, as image files are
    x0, _ = _item(train_set, 0, where, channels)
    # (H, W) items for a model that takes (N, 1, H, W) get their channel axis; any other item is
    # what the model takes already (a (T, C) sequence for an (N, T, C) model stays as it is).
    channel_axis = input_shape is not None and len(input_shape) == 4 and x0.dim() == 2
    _check_item_layout((1, *x0.shape) if channel_axis else tuple(x0.shape), input_shape, f"{where} train[0]")
    if fits(len(train_set) + len(test_set), x0.numel()):
        parts = {part: [_item(ds, i, f"{where} {part}", channels) for i in range(len(ds))]
                 for part, ds in (("train", train_set), ("test", test_set))}
        _check_items_on_one_scale(
            [(f"{where} {part}[{i}]", x) for part, items in parts.items() for i, (x, _) in enumerate(items)], target)
        splits, scaled = [], False
        for part, items in parts.items():
            shapes = {tuple(x.shape) for x, _ in items}
            if len(shapes) > 1:
                raise UserError(f"{where} {part} has images of several shapes: {', '.join(map(str, sorted(shapes)))}")
            scaled |= any(x.dtype == torch.uint8 for x, _ in items)
            if len({x.dtype for x, _ in items}) > 1:  # stacked, uint8 items would become floats of 0-255
                items = [(to_model_input(x[None], target)[0], y) for x, y in items]  # each as streamed
            labels = _check_labels(np.array([y for _, y in items]), f"{where} {part}")
            splits.append(Split(torch.stack([x for x, _ in items]), torch.from_numpy(labels), where))
        _check_splits_one_shape(splits[0].images[0], splits[1].images[0], where)
        if channel_axis:
            splits = [Split(s.images.unsqueeze(1), s.labels, s.label_file) for s in splits]
        return finish(splits[0], splits[1], Path(where.split(":")[0]).stem, where, scaled=scaled)
    # Streamed, each item is checked against its split's first as it is read; the splits' first here.
    test0 = _item(test_set, 0, f"{where} test", channels)[0]
    _check_splits_one_shape(x0, test0, where)
    _check_items_on_one_scale([(f"{where} train[0]", x0), (f"{where} test[0]", test0)], target)
    checked = [CheckedLabels(ds, f"{where} {part}", target=target, channel_axis=channel_axis, channels=channels)
               for part, ds in (("train", train_set), ("test", test_set))]
    return StreamData(*checked, Path(where.split(":")[0]).stem, where, format=fmt, num_classes=None,
                      example_shape=(1, *x0.shape) if channel_axis else tuple(x0.shape), label_file=where,
                      workers=workers, device=device,
                      input_scale=UINT8_SCALE if x0.dtype == torch.uint8 and target.integer_dtype is None else None)


def _check_splits_one_shape(train0: torch.Tensor, test0: torch.Tensor, where: str) -> None:
    """Refuse a factory whose test images are another shape than its training images: only
    training images go through the model before the run, and the first evaluation, after
    training, would fail."""
    if train0.shape != test0.shape:
        raise UserError(f"{where}: train[0] is an image of shape {tuple(train0.shape)}, test[0] of {tuple(test0.shape)}: "
                        "the test images must be the training images' shape")


def _check_items_on_one_scale(items: list[tuple[str, torch.Tensor]], target: Target,
                              fix: str = "return every image as uint8, or every one as floats on one scale") -> None:
    """uint8 images are scaled from 0-255 to [0, 1] and float ones used as they are: a float image
    (or split, an .npz's) outside [0, 1] beside a uint8 one would train, or test, on another scale
    than it, without a word; so would an image of other integers (int64, uint16), refused as the
    .npz reader refuses them. `items`: (name, images)."""
    if target.integer_dtype is not None:
        return  # token ids: integers stay as they are
    for where, x in items:
        if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.bool)):
            raise UserError(f"{where} is an image of {str(x.dtype).removeprefix('torch.')} pixels; images are uint8 "
                            "(0-255, scaled to [0, 1]) or floats (used as they are): return uint8 (0-255) or floats "
                            "in [0, 1] (token ids, for a model that takes them: --input-dtype int64)")
    first_uint8 = next((where for where, x in items if x.dtype == torch.uint8), None)
    if first_uint8 is None:
        return
    for where, x in items:
        if x.is_floating_point() and x.numel() and (float(x.max()) > 1 or float(x.min()) < 0):
            raise UserError(f"{first_uint8} is uint8 (scaled from 0-255 to [0, 1]) but {where} is "
                            f"{str(x.dtype).removeprefix('torch.')} with values from {float(x.min()):g} to "
                            f"{float(x.max()):g} (used as they are): they would be on different scales; {fix}")


def _check_item_layout(shape: tuple[int, ...], input_shape, where: str) -> None:
    """Refuse a factory's items shaped as the model's input in another order (NumPy's and PIL's
    H, W, C for a model taking C, H, W): a model that flattens them would train on the wrong
    layout without a word. Other shapes than the model's are left to the model to take or refuse."""
    if input_shape is None:
        return
    declared = tuple(int(d) for d in input_shape[1:])
    if shape == declared or sorted(shape) != sorted(declared):
        return
    if len(shape) == 3 and shape == (*declared[1:], declared[0]):
        raise UserError(f"{where} is an image of shape {shape}, channels last (H, W, C), but the model takes "
                        f"{declared} (C, H, W): return x.permute(2, 0, 1) (a NumPy array: x.transpose(2, 0, 1)) "
                        "from __getitem__, or use torchvision's ToTensor()")
    raise UserError(f"{where} has shape {shape}, the model's input {declared} in another order: return items "
                    f"shaped {declared}")


def _convert_in_chunks(images: torch.Tensor, target: Target, device: torch.device, chunk: int = 4096) -> torch.Tensor:
    """All images to float32 on `device`, a chunk at a time (uint8 travels, a quarter the bytes)."""
    first = to_model_input(images[:1], target)
    out = torch.empty((len(images), *first.shape[1:]), dtype=first.dtype, device=device)
    for lo in range(0, len(images), chunk):
        out[lo : lo + chunk] = to_model_input(images[lo : lo + chunk].to(device), target)
    return out


def load_data(path, model: nn.Module | None = None, *, input_shape=None, device: str | torch.device = "cpu", **options):
    """`open_data` with the input a model declares: `example_input_shapes` (as a model loaded
    from a run or an artifact does) or `example_input_shape`, and `example_input_dtypes`."""
    if input_shape is None and model is not None:
        shapes = declared_shapes(model, type(model).__name__)
        input_shape = shapes[0] if shapes else None
        dtypes = getattr(model, "example_input_dtypes", None)
        if dtypes and "input_dtype" not in options:  # numpy names or torch dtypes, as load_model takes them
            options["input_dtype"] = getattr(torch, str(dtypes[0]).removeprefix("torch."))
    return open_data(path, input_shape=input_shape, device=device, **options)
