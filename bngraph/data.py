"""MNIST-format datasets: an IDX reader, a loader, a verified downloader and the search for data;
and `model_images`, the images of any data `bngraph train` reads, for the deployment verbs' --data.

The four standard files (training/test images and labels) are read from a directory, raw or
gzip-compressed, and held as whole tensors: MNIST is small enough that a DataLoader would only
add moving parts. `resolve_dataset` decides where the data comes from, in this order: an
explicit directory, $BNGRAPH_DATA, a per-user cache that `download_mnist` fills from the public
mirrors, and Debian's `dataset-fashion-mnist` package as a last, offline, resort.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bngraph.atomic import write_atomically
from bngraph.errors import UserError

# SHA-256 of the *uncompressed* files: gzip output varies with the compressor, the content not.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FILES = tuple(MNIST_SHA256)  # the four standard names, without .gz
DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# Installed by `apt-get install dataset-fashion-mnist`: the upstream .gz files, standard names.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("mnist", "fashion-mnist")

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08
_MAX_RANK = 4  # MNIST uses 1 (labels) and 3 (images); more is a corrupt header, not data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes, raw or gzip-compressed (told apart by its magic)."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data.startswith(_GZIP_MAGIC):  # by content: names ending in .gz are not always gzip
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:  # missing, unreadable, or damaged gzip
        raise UserError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}.") from None
    if len(data) < 4:
        raise UserError(f"{path} is too short ({len(data)} bytes) to be an IDX file.")
    if data[0:2] != b"\0\0":
        raise UserError(f"{path} is not an IDX file (its first two bytes are not zero).")
    dtype_code, rank = data[2], data[3]
    if dtype_code != _UBYTE:
        raise UserError(f"{path} holds IDX data type 0x{dtype_code:02X}, not unsigned byte (0x08).")
    if not 1 <= rank <= _MAX_RANK:
        raise UserError(f"{path} claims {rank} dimensions in its IDX header, not 1 to {_MAX_RANK}.")
    header = 4 + 4 * rank
    if len(data) < header:
        raise UserError(f"{path} is truncated inside its IDX header.")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    if 0 in dims:
        raise UserError(f"{path} has an empty dimension in its shape {dims}.")
    expected = int(np.prod(dims, dtype=object))  # Python ints: a bogus header must not overflow
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "followed by trailing data"
        raise UserError(f"{path} is {what}: shape {dims} needs {expected} bytes, not {actual}.")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


@dataclass(frozen=True)
class Dataset:
    """A whole MNIST-format dataset in memory: uint8 images (N,H,W), int64 labels (N,)."""

    name: str  # "mnist" or "fashion-mnist"
    source: str  # where it came from, for logs and reports
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def as_float(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
        """(x_train, y_train, x_test, y_test): images float32 (N,1,H,W) in [0,1], labels int64."""

        def scaled(t: torch.Tensor) -> torch.Tensor:
            return t.to(device).unsqueeze(1).to(torch.float32).div_(255.0)

        x_train, x_test = scaled(self.train_images), scaled(self.test_images)
        return x_train, self.train_labels.to(device), x_test, self.test_labels.to(device)


def find_idx_file(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(root: Path) -> list[str]:
    return [name for name in FILES if find_idx_file(root, name) is None]


def _split(root: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise UserError(f"{images_path} has shape {images.shape}; images must be N x H x W.")
    if labels.ndim != 1:
        raise UserError(f"{labels_path} has shape {labels.shape}; labels must be one-dimensional.")
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels."
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def load_mnist(root: str | Path, *, name: str = "mnist", source: str | None = None) -> Dataset:
    """Load the four standard MNIST-format files from directory `root`."""
    root = Path(root)
    if root.is_file():
        raise UserError(f"{root} is a file; this --data takes a folder of MNIST-format files.")
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist.")
    missing = _missing(root)
    if missing:
        raise UserError(f"data directory {root} lacks {', '.join(missing)} (raw or .gz).")
    train_x, train_y = _split(root, "train")
    test_x, test_y = _split(root, "t10k")
    if train_x.shape[1:] != test_x.shape[1:]:
        shapes = f"{tuple(train_x.shape[1:])} and {tuple(test_x.shape[1:])}"
        raise UserError(f"{root} has training and test images of different sizes, {shapes}.")
    return Dataset(name, source or str(root), train_x, train_y, test_x, test_y)


def _sha256(path: Path) -> str | None:
    """SHA-256 of the file's uncompressed content; None if it is damaged gzip or unreadable."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            gz = f.read(2) == _GZIP_MAGIC
        with (gzip.open(path, "rb") if gz else path.open("rb")) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def _fetch(url: str, tmp: Path, want: str, timeout: float) -> None:
    """Download `url` into `tmp` and check its content; network errors propagate as OSError."""
    with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
    got = _sha256(tmp)
    if got is None:
        raise ValueError("damaged gzip data")
    if got != want:
        raise ValueError(f"SHA-256 mismatch: got {got[:12]}…, expected {want[:12]}…")


def download_mnist(
    cache_dir: str | Path,
    mirrors: Iterable[str] = DEFAULT_MIRRORS,
    timeout: float = 20.0,
    checksums: Mapping[str, str] = MNIST_SHA256,
) -> Path:
    """Fill `cache_dir` with the four MNIST files, verified against `checksums`; return it.

    Files already there with the right content are kept. Each download goes to a hidden
    sibling and is renamed into place only once its checksum passes, so an interrupted or
    corrupt download never leaves a file that a later run would trust.
    """
    cache = Path(cache_dir)
    mirrors = list(mirrors)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the data cache {cache}: {err.strerror or err}.") from None
    for name in FILES:
        want = checksums[name]
        present = find_idx_file(cache, name)
        if present is not None:
            if _sha256(present) == want:
                continue
            present.unlink()  # our own cache, and wrong: it would shadow the fresh download
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{name}.gz"
            # Mirrors serve gzip; should one serve raw bytes, read_idx still tells by the magic.
            try:
                # bngraph's own cache: a file there is ours to replace
                write_atomically(cache / f"{name}.gz", lambda tmp: _fetch(url, tmp, want, timeout), replace_own=True)
                break
            except (OSError, http.client.HTTPException, ValueError) as err:
                failures.append(f"{url} ({getattr(err, 'reason', None) or err})")
        else:
            tried = "; ".join(failures) or "no mirrors were given"
            raise UserError(f"could not download {name}.gz into {cache}: tried {tried}.")
    return cache


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/bngraph/mnist, or ~/.cache/bngraph/mnist."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bngraph" / "mnist"


def resolve_dataset(
    data: str | Path | None,
    *,
    dataset: str = "mnist",
    cache_dir: str | Path | None = None,
    mirrors: Iterable[str] | None = None,
    allow_download: bool = True,
) -> Dataset:
    """Find a dataset: `data`, then $BNGRAPH_DATA, then the download cache, then Debian's.

    A directory the user named (argument or environment) must hold the data: falling back to
    another dataset behind their back would make results silently incomparable. `dataset`
    names what such a directory holds; the cache and its download are MNIST only.
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    if data is not None:
        return load_mnist(data, name=dataset)
    env = os.environ.get("BNGRAPH_DATA")
    if env:
        if not Path(env).is_dir():
            raise UserError(f"BNGRAPH_DATA names {env}, which is not a directory.")
        return load_mnist(env, name=dataset)

    tried = ["--data DIR (not given)", "BNGRAPH_DATA (not set)"]
    if dataset == "mnist":
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if cache.is_dir() and not _missing(cache):
            return load_mnist(cache, name="mnist", source=f"cache {cache}")
        if not allow_download:
            tried.append(f"the cache {cache} (incomplete; downloads disabled)")
        else:
            try:
                download_mnist(cache, DEFAULT_MIRRORS if mirrors is None else mirrors)
            except UserError as err:
                tried.append(f"the cache {cache} (download failed: {str(err).rstrip('.')})")
            else:
                return load_mnist(cache, name="mnist", source=f"downloaded to {cache}")

    if DEBIAN_FASHION_DIR.is_dir() and not _missing(DEBIAN_FASHION_DIR):
        # Said in the source, which every report and run record shows: a run that asked for
        # MNIST and trained on Fashion-MNIST must not pass for an MNIST result.
        instead = "" if dataset == "fashion-mnist" else f", in place of MNIST: {'; '.join(tried[2:])}"
        return load_mnist(DEBIAN_FASHION_DIR, name="fashion-mnist", source=f"{DEBIAN_FASHION_DIR}{instead}")
    tried.append(f"{DEBIAN_FASHION_DIR} (not installed or incomplete)")
    raise UserError(
        f"no {dataset} data found; tried {', '.join(tried)}: pass --data DIR or set BNGRAPH_DATA "
        "to a directory with the four MNIST files, or run `apt-get install dataset-fashion-mnist`."
    )


def model_images(path: str, input_shapes: Sequence[Sequence[int]], split: str,
                 pick: Callable[[int], Iterable[int]], input_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images `pick(n)` of the n in `split` ("train" or "test") of any data `bngraph train` reads,
    as a batch of the model's one input, shaped `input_shapes[0]` (N, ...): an image folder
    decoded to its channels and size, other data reshaped where an image has as many values as
    the input. Only the images picked are read (an image folder is not decoded whole for a few
    hundred). With an integer `input_dtype` (token ids), integer data stays integer, as train reads it."""
    if len(input_shapes) != 1:
        raise UserError(f"--data feeds images to a model with one input; this one takes {len(input_shapes)}")
    # Imported here: the deployment side (insert, verify) loads the training package only for --data.
    from bngraph.training.data_formats import open_data

    input_shape = input_shapes[0]
    data = open_data(path, input_shape=tuple(input_shape), input_dtype=input_dtype, stream_above_mb=0, workers=0)
    images = data.train if split == "train" else data.test
    x = torch.stack([images[int(i)][0] for i in pick(len(images))])
    example, values = tuple(input_shape[1:]), x[0].numel()
    if int(np.prod(example)) != values:
        needs = int(np.prod(example))
        raise UserError(f"--data images have {values} values each; the model's input {example} needs {needs}")
    return x.reshape(len(x), *example)
