"""bngraph.data on small generated IDX files, a loopback mirror, and the real MNIST if present."""

from __future__ import annotations

import functools
import gzip
import hashlib
import shutil
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from bngraph import data
from bngraph.cli import main
from bngraph.data import FILES, Dataset, download_mnist, load_mnist, read_idx, resolve_dataset
from bngraph.errors import UserError

REAL_MNIST = Path(__file__).resolve().parents[1] / "../shared/data/mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_arrays(seed: int = 0, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_set(root: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return root


def sha256s(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: hashlib.sha256(idx_bytes(a)).hexdigest() for name, a in arrays.items()}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No test sees the caller's BNGRAPH_DATA, home cache or installed Debian data."""
    monkeypatch.delenv("BNGRAPH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "no-debian")


# --- read_idx and load_mnist ---------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_load_round_trips(tmp_path, gz):
    arrays = make_arrays()
    ds = load_mnist(write_set(tmp_path / "d", arrays, gz=gz))
    assert ds.name == "mnist" and ds.source == str(tmp_path / "d")
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.shape == (20, 28, 28) and ds.test_images.shape == (10, 28, 28)
    np.testing.assert_array_equal(ds.train_images.numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_images.numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    x_train, y_train, x_test, y_test = ds.as_float()
    assert x_train.shape == (20, 1, 28, 28) and x_train.dtype == torch.float32
    assert x_test.shape == (10, 1, 28, 28)
    assert torch.equal(x_train[:, 0] * 255, ds.train_images.float())
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    assert torch.equal(y_train, ds.train_labels) and torch.equal(y_test, ds.test_labels)


def test_dataset_is_frozen(tmp_path):
    ds = load_mnist(write_set(tmp_path, make_arrays()))
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]


def test_gzip_detected_by_magic_not_suffix(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "f").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "g.gz").write_bytes(idx_bytes(array))  # a raw file despite its name
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "g.gz"), array)


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "trailing data"),
        (lambda b: b"\1" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "data type 0x0D"),
        (lambda b: b[:3] + b"\x09" + b[4:], "dimensions"),
        (lambda b: b[:10], "truncated inside its IDX header"),
        (lambda b: b[:2], "too short"),
    ],
)
def test_bad_idx_files(tmp_path, mangle, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(mangle(idx_bytes(np.zeros((5, 28, 28), np.uint8))))
    with pytest.raises(UserError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 28, 28), np.uint8)))[:-10])
    with pytest.raises(UserError, match="x.gz"):
        read_idx(path)


def test_truncated_file_in_dataset(tmp_path):
    root = write_set(tmp_path, make_arrays())
    images = root / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(UserError, match="train-images-idx3-ubyte is truncated"):
        load_mnist(root)


def test_a_label_the_model_has_no_output_for_names_its_file(tmp_path, capsys):
    # Labels are checked against the model's outputs (EMNIST's 47 classes train a 47-output
    # model), not against MNIST's ten.
    arrays = make_arrays()
    arrays["t10k-labels-idx1-ubyte"][7] = 12
    folder = write_set(tmp_path / "data", arrays)
    assert main(["train", "zoo:mnist-mlp", "--data", str(folder), "--steps", "1", "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "t10k-labels-idx1-ubyte: label 12 is out of range for the model's 10 outputs" in err


def test_mismatched_counts(tmp_path):
    arrays = make_arrays()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:19]
    with pytest.raises(UserError, match="20 images but .* 19 labels"):
        load_mnist(write_set(tmp_path, arrays))


def test_images_must_be_rank_3(tmp_path):
    arrays = make_arrays()
    arrays["train-images-idx3-ubyte"] = arrays["train-images-idx3-ubyte"].reshape(20, 784)
    with pytest.raises(UserError, match="N x H x W"):
        load_mnist(write_set(tmp_path, arrays))


def test_incomplete_dir_names_missing_files(tmp_path):
    root = write_set(tmp_path, make_arrays())
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="lacks t10k-labels-idx1-ubyte"):
        load_mnist(root)


# --- resolve_dataset ----------------------------------------------------------------------


def test_explicit_dir_beats_env(tmp_path, monkeypatch):
    explicit = write_set(tmp_path / "explicit", make_arrays(seed=1))
    monkeypatch.setenv("BNGRAPH_DATA", str(write_set(tmp_path / "env", make_arrays(seed=2))))
    ds = resolve_dataset(str(explicit), allow_download=False)
    assert ds.source == str(explicit)
    expected = make_arrays(seed=1)["train-labels-idx1-ubyte"]
    np.testing.assert_array_equal(ds.train_labels.numpy(), expected)


def test_env_beats_cache(tmp_path, monkeypatch):
    env = write_set(tmp_path / "env", make_arrays(seed=2))
    cache = write_set(tmp_path / "cache", make_arrays(seed=3), gz=True)
    monkeypatch.setenv("BNGRAPH_DATA", str(env))
    assert resolve_dataset(None, cache_dir=cache, allow_download=False).source == str(env)
    monkeypatch.delenv("BNGRAPH_DATA")
    ds = resolve_dataset(None, cache_dir=cache, allow_download=False)
    assert ds.name == "mnist" and str(cache) in ds.source


def test_explicit_missing_or_incomplete_dir_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BNGRAPH_DATA", str(write_set(tmp_path / "env", make_arrays())))
    with pytest.raises(UserError, match="does not exist"):
        resolve_dataset(str(tmp_path / "nope"), allow_download=False)
    partial = write_set(tmp_path / "partial", make_arrays())
    (partial / "train-images-idx3-ubyte").unlink()
    with pytest.raises(UserError, match="lacks train-images-idx3-ubyte"):
        resolve_dataset(str(partial), allow_download=False)
    a_file = tmp_path / "data.npz"  # it exists: "does not exist" would send the user looking for it
    a_file.write_bytes(b"")
    with pytest.raises(UserError, match="data.npz is a file; this --data takes a folder of MNIST-format files"):
        resolve_dataset(str(a_file), allow_download=False)


def test_env_naming_a_missing_dir_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BNGRAPH_DATA", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="BNGRAPH_DATA"):
        resolve_dataset(None, cache_dir=tmp_path / "cache", allow_download=False)


def test_default_cache_follows_xdg(tmp_path):
    write_set(tmp_path / "xdg-cache" / "bngraph" / "mnist", make_arrays())
    assert "xdg-cache" in resolve_dataset(None, allow_download=False).source


def test_debian_fashion_mnist_is_the_last_resort(tmp_path, monkeypatch):
    debian = write_set(tmp_path / "debian", make_arrays(), gz=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", debian)
    ds = resolve_dataset(None, cache_dir=tmp_path / "empty", allow_download=False)
    # Asked for MNIST, it says what it used instead and why, in the source every report shows.
    assert ds.name == "fashion-mnist" and ds.source.startswith(f"{debian}, in place of MNIST: the cache ")
    assert "downloads disabled" in ds.source
    asked = resolve_dataset(None, dataset="fashion-mnist", cache_dir=tmp_path / "empty", allow_download=False)
    assert asked.source == str(debian)


def test_nothing_found_says_what_to_do(tmp_path):
    with pytest.raises(UserError) as info:
        resolve_dataset(None, cache_dir=tmp_path / "empty", mirrors=[])
    text = str(info.value)
    for hint in ("--data DIR", "BNGRAPH_DATA", "apt-get install dataset-fashion-mnist", "empty"):
        assert hint in text


# --- download_mnist against a loopback mirror ---------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def serve(tmp_path):
    """serve(dir) -> base URL of a loopback HTTP server for `dir`, stopped after the test."""
    servers = []

    def start(root: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(root))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # A short poll interval: shutdown() waits for the loop's next poll.
        loop = functools.partial(server.serve_forever, poll_interval=0.05)
        threading.Thread(target=loop, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url():
    # Bind then close: nothing listens there for the test's short life, so connecting is refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_then_offline(tmp_path, serve):
    arrays = make_arrays(seed=4)
    url = serve(write_set(tmp_path / "mirror", arrays, gz=True))
    cache = tmp_path / "cache"
    assert download_mnist(cache, mirrors=[url], timeout=5, checksums=sha256s(arrays)) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in FILES)
    # Offline now: the mirror list points at a server nobody runs, and the cache must suffice.
    ds = resolve_dataset(None, cache_dir=cache, mirrors=["http://127.0.0.1:9/"])
    assert isinstance(ds, Dataset) and ds.name == "mnist"
    np.testing.assert_array_equal(ds.test_images.numpy(), arrays["t10k-images-idx3-ubyte"])
    # A second download keeps the verified files instead of fetching them again.
    download_mnist(cache, mirrors=[], checksums=sha256s(arrays))


def test_corrupt_download_leaves_nothing(tmp_path, serve):
    arrays = make_arrays(seed=5)
    mirror = write_set(tmp_path / "mirror", arrays, gz=True)
    bad = "t10k-images-idx3-ubyte"
    corrupted = arrays[bad].copy()
    corrupted[0, 0, 0] ^= 0xFF
    (mirror / f"{bad}.gz").write_bytes(gzip.compress(idx_bytes(corrupted)))
    url = serve(mirror)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=f"{bad}.gz") as info:
        download_mnist(cache, mirrors=[url], timeout=5, checksums=sha256s(arrays))
    assert "SHA-256 mismatch" in str(info.value) and url in str(info.value)
    names = [p.name for p in cache.iterdir()]
    assert not any(bad in n for n in names), names
    assert not any("partial" in n or n.startswith(".") for n in names), names
    assert set(names) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"}


def test_missing_file_on_every_mirror(tmp_path, serve, closed_port_url):
    arrays = make_arrays(seed=6)
    mirror = write_set(tmp_path / "mirror", arrays, gz=True)
    (mirror / "train-labels-idx1-ubyte.gz").unlink()
    url = serve(mirror)
    with pytest.raises(UserError) as info:
        download_mnist(tmp_path / "cache", mirrors=[closed_port_url, url], timeout=5,
                       checksums=sha256s(arrays))
    text = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in text and closed_port_url in text and url in text


def test_first_mirror_down_second_works(tmp_path, serve, closed_port_url):
    arrays = make_arrays(seed=7)
    url = serve(write_set(tmp_path / "mirror", arrays, gz=True))
    cache = tmp_path / "cache"
    download_mnist(cache, mirrors=[closed_port_url, url], timeout=5, checksums=sha256s(arrays))
    ds = load_mnist(cache)
    np.testing.assert_array_equal(ds.train_images.numpy(), arrays["train-images-idx3-ubyte"])


def test_wrong_cached_file_is_replaced(tmp_path, serve):
    arrays = make_arrays(seed=8)
    url = serve(write_set(tmp_path / "mirror", arrays, gz=True))
    cache = write_set(tmp_path / "cache", make_arrays(seed=9))  # raw files, wrong content
    download_mnist(cache, mirrors=[url], timeout=5, checksums=sha256s(arrays))
    labels = load_mnist(cache).train_labels.numpy()
    np.testing.assert_array_equal(labels, arrays["train-labels-idx1-ubyte"])


# --- the real MNIST, where this machine has it --------------------------------------------


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="no ../shared/data/mnist on this machine")
def test_real_mnist(tmp_path):
    ds = load_mnist(REAL_MNIST)
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    assert ds.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert ds.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # MNIST_SHA256 matches this copy: a cache holding these files needs no mirror at all.
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in FILES:
        shutil.copy(next(REAL_MNIST.glob(f"{name}*")), cache)
    download_mnist(cache, mirrors=[])
