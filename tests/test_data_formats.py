"""`--data` beyond MNIST: image folders, .npz, CIFAR binary, factories; streaming; precision and layout.

Each format is written here, small, in the layout users have it, and trained for a few steps
through the CLI; each kind of bad data must stop the run with one line naming the file.
"""

import json
import os
import pickle
import re
import textwrap
import unicodedata
import warnings
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import bngraph
from bngraph.cli import main
from bngraph.data import model_images
from bngraph.errors import UserError
from bngraph.training.data_formats import detect_format, open_data, with_model_classes
from bngraph.training import StreamData, TensorData, TrainConfig, train
from bngraph.zoo import create_model
from tests.mnist_like import learnable_arrays, write_learnable
from tests.test_data import write_set
from tests.util import DETERMINISTIC_FOR_EXACTNESS, overridden

NETS_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    """A conv, a BN and a pooled head: any input size, 3 channels."""

    example_input_shape = (2, 3, 8, 8)
    classes = 10

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, self.classes)

    def forward(self, x):
        return self.head(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


class Cifar10Net(Net):
    example_input_shape = (2, 3, 32, 32)


class Cifar100Net(Net):
    example_input_shape = (2, 3, 32, 32)
    classes = 100
'''


@pytest.fixture
def nets(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS_PY)
    return path


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _train(capsys, tmp_path, model, data, *extra, steps=3):
    out = tmp_path / "run"
    code, stdout, err = _cli(capsys, *overridden(["train", model, "--data", data, "--steps", steps, "--batch-size", 4,
                                                  "--eval-every", steps, "--quiet", "--json", "-o", out], extra))
    assert code == 0, err
    facts = json.loads(stdout)
    history = json.loads((out / "model" / "bngraph.json").read_text())["history"]
    assert history[-1]["data_format"] == facts["data_format"]
    return facts


def _bad(capsys, tmp_path, model, data, *extra):
    code, _, err = _cli(capsys, *overridden(["train", model, "--data", data, "--steps", 2, "--batch-size", 2, "--quiet",
                                             "-o", tmp_path / "bad"], extra))
    assert code == 2, err
    assert err.startswith("bngraph: error:") and err.count("\n") == 1, err
    return err


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=3, sizes=((10, 12), (9, 9))):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8) + np.uint8(60 * c % 190)
                image = Image.fromarray(pixels, "RGB")
                if i == 1:
                    image = image.convert("L")  # folders mix modes: each is converted
                image.save(folder / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")
    return root


def write_npz(path, layout="NHW", n_train=40, n_test=12, dtype=np.uint8, **override):
    arrays = learnable_arrays(0, n_train, n_test)
    x_train, x_test = arrays["train-images-idx3-ubyte"], arrays["t10k-images-idx3-ubyte"]
    if layout != "NHW":  # three channels, 28 x 28
        x_train, x_test = (np.repeat(x[..., None], 3, -1) for x in (x_train, x_test))
        if layout == "NCHW":
            x_train, x_test = (x.transpose(0, 3, 1, 2) for x in (x_train, x_test))
    data = {"x_train": x_train.astype(dtype), "y_train": arrays["train-labels-idx1-ubyte"],
            "x_test": x_test.astype(dtype), "y_test": arrays["t10k-labels-idx1-ubyte"]}
    if dtype != np.uint8:
        data["x_train"], data["x_test"] = data["x_train"] / 255, data["x_test"] / 255
    data.update(override)
    np.savez(path, **data)
    return path


def write_cifar(root, hundred=False, records=6, bad_label=None):
    rng = np.random.default_rng(1)
    root.mkdir()
    names = ["train.bin", "test.bin"] if hundred else [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        labels = rng.integers(0, 100 if hundred else 10, records, dtype=np.uint8)
        head = [labels // 5, labels] if hundred else [labels]  # CIFAR-100: coarse, fine
        if bad_label is not None and name == names[0]:
            head[-1][2] = bad_label
        pixels = rng.integers(0, 256, (records, 3 * 32 * 32), dtype=np.uint8)
        np.concatenate([np.stack(head, 1), pixels], 1).tofile(root / name)
    return root


FACTORY_PY = '''
import torch
from torch.utils.data import TensorDataset


def make():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(48, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (48,), generator=gen)
    return TensorDataset(x[:36], y[:36]), TensorDataset(x[36:], y[36:])


def bad_labels():
    x = torch.rand(8, 1, 28, 28)
    return TensorDataset(x, torch.full((8,), 11)), TensorDataset(x, torch.zeros(8, dtype=torch.long))


class Examples(torch.utils.data.Dataset):  # as a HuggingFace dataset with_format("torch") yields
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"pixel_values": torch.rand(1, 28, 28), "label": i % 10}


def hf_style():
    return Examples(), Examples()


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from ((torch.rand(1, 28, 28), i % 10) for i in range(20))


def iterable():
    return Stream(), Stream()


def uint8_images():  # C, H, W uint8 tensors, as a user's own decoding gives them
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (40, 1, 28, 28), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (40,), generator=gen)
    return TensorDataset(x[:28], y[:28]), TensorDataset(x[28:], y[28:])


class PilImages(torch.utils.data.Dataset):  # as torchvision-style datasets give them without ToTensor
    def __init__(self, n, mode):
        self.n, self.mode = n, mode

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from PIL import Image
        import numpy as np
        pixels = np.random.default_rng(i).integers(0, 256, (28, 28, 3), dtype=np.uint8)
        return Image.fromarray(pixels).convert(self.mode), i % 10


def pil_gray():
    return PilImages(16, "L"), PilImages(8, "L")


def two_images():  # the item a two-input model would want
    pairs = [((torch.rand(1, 28, 28), torch.rand(1, 28, 28)), i % 10) for i in range(12)]
    return pairs, pairs[:4]


def raw_text():  # never tokenized
    texts = [("some raw text", i % 2) for i in range(12)]
    return texts, texts[:4]


class SomeAugmentedToFloat(torch.utils.data.Dataset):  # an augmentation that returns floats in [0, 1]
    def __init__(self, n):
        self.x = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i].float() / 255 if i % 2 else self.x[i]), i % 10


def mixed_uint8_and_float():
    return SomeAugmentedToFloat(16), SomeAugmentedToFloat(8)


def pil_rgb():
    return PilImages(16, "RGB"), PilImages(8, "RGB")


class Pixels(torch.utils.data.Dataset):  # 0-255 as uint8, or as floats where `floats_from` says
    def __init__(self, n, floats_from):
        self.x = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
        self.floats_from = floats_from

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i].float() if i >= self.floats_from else self.x[i]), i % 10


def floats_0_255_in_the_test_split():  # a train split of uint8, a test split of the same pixels as floats
    return Pixels(16, floats_from=16), Pixels(8, floats_from=0)


def some_items_0_255_floats():
    return Pixels(16, floats_from=5), Pixels(8, floats_from=8)


class Centred(Pixels):  # floats in [-1, 1], as a Normalize((0.5,), (0.5,)) writes them
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (x / 127.5 - 1 if x.is_floating_point() else x), y


def floats_in_minus_1_to_1_in_the_test_split():
    return Pixels(16, floats_from=16), Centred(8, floats_from=0)


def half_uint8_half_unit_floats():  # on one scale: uint8 / 255 and floats in [0, 1]
    return SomeAugmentedToFloat(16), Pixels(8, floats_from=8)


def matrices():  # 2-D items: (H, W) images for one model, (T, C) sequences for another
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 6, 16, generator=gen)
    return TensorDataset(x[:12], torch.arange(12) % 3), TensorDataset(x[12:], torch.arange(8) % 3)


def with_inf():
    x = torch.rand(12, 1, 28, 28)
    x[3, 0, 5, 5] = float("inf")
    return TensorDataset(x, torch.zeros(12, dtype=torch.long)), TensorDataset(x[4:], torch.zeros(8, dtype=torch.long))


def with_paths():  # (image, label, path), as Datasets that keep each file's name return
    items = [(torch.rand(1, 28, 28), i % 10, f"img{i}.png") for i in range(12)]
    return items, items[:4]
'''


# --- each format trains ---------------------------------------------------------------------------


def test_image_folder_trains_at_the_models_size_and_channels(tmp_path, capsys, nets):
    root = write_image_folder(tmp_path / "pets")
    assert detect_format(root) == "image-folder"
    facts = _train(capsys, tmp_path, f"{nets}:Net", root)  # RGB, 8 x 8
    assert facts["data_format"] == "image-folder" and not facts["streamed"]
    # Its 10 outputs for 3 folders: 7 an argmax may pick that no class is.
    assert "the model has 10 outputs for 3 classes: outputs 3 to 9 name no class" in facts["notes"]
    data = open_data(root, input_shape=(2, 1, 28, 28))  # the same files, for a grayscale model
    assert data.x_train.shape == (9, 1, 28, 28) and data.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    data = open_data(root, input_shape=(2, 3, 8, 8), image_size="5,6")
    assert data.x_test.shape == (9, 3, 5, 6) and 0 <= data.x_test.min() and data.x_test.max() <= 1


def test_class_folders_named_with_control_characters_print_on_one_line_each(tmp_path, capsys, nets):
    # A folder name holding a newline split the table's note over two lines, and a terminal
    # escape in one reached the terminal.
    root = write_image_folder(tmp_path / "pets", classes=("cat\nfluffy", "dog\x1b[2J"))
    code, out, err = _cli(capsys, "train", f"{nets}:Net", "--data", root, "--steps", 2, "--batch-size", 4,
                          "--eval-every", 2, "--quiet", "-o", tmp_path / "run")
    assert code == 0, err
    assert "\x1b" not in out and r"output i is class i: cat\nfluffy, dog\x1b[2J (all 2" in out
    history = json.loads((tmp_path / "run" / "model" / "bngraph.json").read_text())["history"]
    assert history[-1]["classes"] == ["cat\nfluffy", "dog\x1b[2J"]  # the names themselves, in JSON


@pytest.mark.parametrize("input_shape", [(2, 3, 8, 8), (2, 8, 8)])
def test_an_image_folder_for_a_model_taking_integers_gives_the_same_pixels_held_whole_and_streamed(tmp_path, input_shape):
    # Held whole, a model declaring an int64 input got pixels 0-255 as integers; streamed (and in
    # verify --data, insert --preserve), floats / 255, recorded as its input_scale: another model.
    folder = write_image_folder(tmp_path / "pets")
    whole, streamed = (open_data(folder, input_shape=input_shape, input_dtype=torch.int64, stream_above_mb=limit)
                       for limit in (None, 0))
    assert isinstance(whole, TensorData) and isinstance(streamed, StreamData)
    items = torch.stack([streamed.test[i][0] for i in range(len(streamed.test))])
    assert items.dtype == torch.int64 and torch.equal(items, whole.x_test) and int(items.max()) > 1
    assert whole.input_scale is None and streamed.input_scale is None
    assert torch.equal(model_images(str(folder), [input_shape], "test", range, torch.int64), whole.x_test)


def test_image_folder_for_a_model_declaring_n_h_w_is_read_as_grayscale_without_a_channel_axis(tmp_path, capsys):
    # An MNIST-style MLP declaring (2, H, W) was given RGB (N, 3, H, W) images and refused.
    root = write_image_folder(tmp_path / "pets")
    gray = open_data(root, input_shape=(2, 1, 7, 7)).x_train[:, 0]
    whole = open_data(root, input_shape=(2, 7, 7))
    streamed = open_data(root, input_shape=(2, 7, 7), stream_above_mb=0, workers=0)
    assert torch.equal(whole.x_train, gray) and gray.shape == (9, 7, 7)
    assert torch.equal(torch.stack([streamed.train[i][0] for i in range(9)]), gray)
    assert tuple(streamed.example(2).shape) == (2, 7, 7)
    model = tmp_path / "mlp.py"
    model.write_text("from torch import nn\n\nclass Net(nn.Sequential):\n    example_input_shape = (2, 7, 7)\n\n"
                     "    def __init__(self):\n        super().__init__(nn.Flatten(), nn.Linear(49, 3))\n")
    _train(capsys, tmp_path, model, root)


def test_image_folder_reads_subfolders_of_a_class_and_skips_what_is_not_an_image(tmp_path):
    # As torchvision's ImageFolder: a class folder's images in subfolders count (dog/batch2/...);
    # hidden files (macOS's ._x.jpg), hidden folders and other files do not.
    root = write_image_folder(tmp_path / "pets")
    batch = root / "train" / "dog" / "batch2"
    batch.mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (7, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(batch / "late.PNG")
    (root / "train" / "dog" / "._0.jpg").write_bytes(b"AppleDouble, not a JPEG")
    (root / "train" / "dog" / ".thumbs").mkdir()
    Image.fromarray(pixels).save(root / "train" / "dog" / ".thumbs" / "t.png")
    (root / "train" / "emu" / "notes.txt").write_text("not an image")
    data = open_data(root, input_shape=(2, 3, 7, 7))
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    late = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(data.x_train[6], late)  # after dog/0, 1, 2, in path order


def test_image_folders_read_the_suffixes_torchvision_reads_and_jfif(tmp_path, capsys, nets):
    # .pgm (AT&T faces), .ppm and .jfif (JPEGs as browsers save them) were left out without a word:
    # a folder of them was "empty", one beside .png files trained on the .png ones alone.
    root = tmp_path / "faces"
    pixels = {name: np.full((8, 8), 40 * k, np.uint8) for k, name in enumerate(("0.pgm", "1.ppm", "2.jfif", "3.tif"))}
    for split in ("train", "test"):
        for name, plane in pixels.items():
            (root / split / "s1").mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(plane)
            image.convert("RGB" if name.endswith(".ppm") else "L").save(root / split / "s1" / name,
                                                                       "JPEG" if name.endswith(".jfif") else None)
    data = open_data(root, input_shape=(2, 1, 8, 8))
    assert torch.equal(data.x_train[:, 0, 0, 0], torch.tensor([0.0, 40, 80, 120]) / 255)  # the jfif: a flat JPEG
    Image.fromarray(pixels["0.pgm"]).save(root / "train" / "s1" / "4.png")
    assert len(open_data(root, input_shape=(2, 1, 8, 8)).x_train) == 5
    (root / "test" / "s2").mkdir()
    (root / "train" / "s2").mkdir()
    assert "train/s2 is an empty class folder (no png/jpg/jpeg/jfif/bmp/ppm/pgm/" in _bad(capsys, tmp_path, f"{nets}:Net", root)


def test_a_class_folder_linking_back_above_itself_is_refused_but_other_links_are_followed(tmp_path, capsys, nets):
    # train/cat/loop -> .. read train/ again under cat: 9 files became many examples, other
    # classes' images labelled cat.
    root = write_image_folder(tmp_path / "pets")
    extra = write_image_folder(tmp_path / "more", classes=("dog",))
    (root / "train" / "dog" / "more").symlink_to(extra / "train" / "dog")  # a folder elsewhere: followed
    assert open_data(root, input_shape=(2, 3, 7, 7)).y_train.tolist() == [0] * 3 + [1] * 6 + [2] * 3
    (root / "train" / "cat" / "loop").symlink_to("..")
    err = _bad(capsys, tmp_path, f"{nets}:Net", root)
    assert f"{root / 'train' / 'cat' / 'loop'} links back to {(root / 'train').resolve()}, which holds it" in err


@pytest.mark.parametrize("streamed", [False, True])
def test_a_model_trained_on_an_image_folder_records_what_each_output_means(tmp_path, capsys, nets, streamed):
    # Output i is class folder i by sorted name, as in torchvision: "10" before "2". The run says
    # so, and the model's bngraph.json keeps the list for whoever deploys it.
    root = write_image_folder(tmp_path / "digits", classes=("2", "10", "9"))
    facts = _train(capsys, tmp_path, f"{nets}:Net", root, *(["--stream-above", 0] if streamed else []))
    assert facts["streamed"] is streamed
    history = json.loads((tmp_path / "run" / "model" / "bngraph.json").read_text())["history"]
    assert history[-1]["classes"] == ["10", "2", "9"]


def write_quadrant_folder(root, classes, n_train=64, n_test=16):
    """Class k of four ("cat", "dog", "fox", "owl"): a bright square in quadrant k; only `classes` written."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % 4
            pixels = rng.integers(0, 50, (8, 8, 3), dtype=np.uint8)
            r, c = divmod(k, 2)
            pixels[r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] = 230
            name = ("cat", "dog", "fox", "owl")[k]
            if name in classes:
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_recalibrating_and_fine_tuning_keep_the_classes_the_model_recorded(tmp_path, capsys):
    # Trained on cat, dog, fox, owl; a folder without cat must not make dog label 0.
    model = tmp_path / "m.py"
    model.write_text("from torch import nn\n\nclass Net(nn.Sequential):\n    example_input_shape = (2, 3, 8, 8)\n\n"
                     "    def __init__(self):\n        super().__init__(nn.Flatten(), nn.Linear(192, 16), nn.BatchNorm1d(16),"
                     " nn.ReLU(), nn.Linear(16, 4))\n")
    all_four = write_quadrant_folder(tmp_path / "all", ("cat", "dog", "fox", "owl"))
    no_cat = write_quadrant_folder(tmp_path / "no_cat", ("dog", "fox", "owl"))
    code, _, err = _cli(capsys, "train", model, "--data", all_four, "--steps", 40, "--lr", 0.1, "--batch-size", 16,
                        "--eval-every", 40, "--quiet", "-o", tmp_path / "run")
    assert code == 0, err
    trained = tmp_path / "run" / "model"
    code, out, err = _cli(capsys, "recalibrate", trained, "--data", no_cat, "--batches", 3, "--batch-size", 16,
                          "-o", tmp_path / "recal", "--json")
    assert code == 0, err
    assert json.loads(out)["test_accuracy_before"] == 1.0

    code, out, err = _cli(capsys, "train", trained, "--data", no_cat, "--steps", 2, "--batch-size", 16,
                          "--eval-every", 2, "--quiet", "--json", "-o", tmp_path / "tuned")
    assert code == 0, err
    assert json.loads(out)["final_test_accuracy"] == 1.0
    history = json.loads((tmp_path / "tuned" / "model" / "bngraph.json").read_text())["history"]
    assert [e["classes"] for e in history if "classes" in e] == [["cat", "dog", "fox", "owl"]] * 2
    # From Python too: bngraph.train labelled dog 0, fox 1, owl 2 (accuracy 0), training dogs as cats.
    loaded = bngraph.load(trained)
    assert loaded.bngraph_classes == ("cat", "dog", "fox", "owl")
    tuned = train(loaded, no_cat, TrainConfig(steps=2, batch_size=16, eval_every=2), progress=False)
    assert tuned.metrics[-1]["test_accuracy"] == 1.0

    (no_cat / "train" / "yak").mkdir()
    (no_cat / "train" / "owl" / "3.png").rename(no_cat / "train" / "yak" / "3.png")
    err = _bad(capsys, tmp_path, trained, no_cat)
    assert "class folder 'yak', which is not one of the model's classes (cat, dog, fox, owl" in err


def test_npz_in_each_layout_trains(tmp_path, capsys, nets):
    facts = _train(capsys, tmp_path, "zoo:mnist-mlp", write_npz(tmp_path / "gray.npz"))
    assert facts["data_format"] == "npz"
    nhwc = open_data(write_npz(tmp_path / "nhwc.npz", "NHWC"), input_shape=(2, 3, 28, 28))
    nchw = open_data(write_npz(tmp_path / "nchw.npz", "NCHW", dtype=np.float32), input_shape=(2, 3, 28, 28))
    assert nhwc.x_train.shape == nchw.x_train.shape == (40, 3, 28, 28)
    torch.testing.assert_close(nhwc.x_train, nchw.x_train)  # uint8 scaled as the float arrays hold it
    (tmp_path / "run").rename(tmp_path / "run-gray")
    _train(capsys, tmp_path, f"{nets}:Net", tmp_path / "nhwc.npz")


ANY_SIZE_PY = '''
import torch
from torch import nn

class AnySize(nn.Module):  # declares no input shape: it takes the data's
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
'''


def test_an_npz_whose_layout_cannot_be_told_for_a_model_without_a_shape_is_refused(tmp_path, capsys):
    # (N, 8, 8, 8) saved N,C,H,W was read as Keras' N,H,W,C and transposed without a word: the run
    # reported its accuracy on the transposed images, the model scored chance on them as stored.
    (tmp_path / "m.py").write_text(ANY_SIZE_PY)
    x = np.random.default_rng(0).random((24, 8, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "cube.npz", x_train=x[:16], y_train=np.arange(16) % 4, x_test=x[16:], y_test=np.arange(8) % 4)
    err = _bad(capsys, tmp_path, f"{tmp_path}/m.py:AnySize", tmp_path / "cube.npz")
    assert "axes 1 and 3 have the same size" in err and "--input-shape" in err


def test_an_npz_of_n_t_f_arrays_gets_a_channel_axis_only_for_a_model_that_takes_one(tmp_path, capsys):
    # A GRU declaring (2, 8, 8) was given (N, 1, 8, 8) and refused; a model that flattens trained,
    # and its artifact declared the (2, 1, 8, 8) it was given, not its own (2, 8, 8).
    x = np.random.default_rng(0).random((24, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "seq.npz", x_train=x[:16], y_train=np.arange(16) % 3, x_test=x[16:], y_test=np.arange(8) % 3)
    for input_shape in ((2, 8, 8), (2, 1, 8, 8)):
        whole = open_data(tmp_path / "seq.npz", input_shape=input_shape)
        streamed = open_data(tmp_path / "seq.npz", input_shape=input_shape, stream_above_mb=0, workers=0)
        assert torch.equal(whole.x_train, torch.from_numpy(x[:16]).reshape(16, *input_shape[1:]))
        assert tuple(streamed.example(2).shape) == input_shape
    model = tmp_path / "gru.py"
    model.write_text("from torch import nn\n\nclass Net(nn.Module):\n    example_input_shape = (2, 8, 8)\n\n"
                     "    def __init__(self):\n        super().__init__()\n        self.rnn = nn.GRU(8, 16, batch_first=True)\n"
                     "        self.head = nn.Linear(16, 3)\n\n    def forward(self, x):\n"
                     "        return self.head(self.rnn(x)[0][:, -1])\n")
    _train(capsys, tmp_path, model, tmp_path / "seq.npz")
    assert json.loads((tmp_path / "run" / "model" / "bngraph.json").read_text())["input_shapes"] == [[2, 8, 8]]


def test_mnist_idx_files_get_a_channel_axis_only_for_a_model_that_takes_one(tmp_path):
    # A GRU over an image's rows declaring (2, 28, 28) was given (N, 1, 28, 28) and refused,
    # where image folders and .npz arrays were already read without the axis.
    write_learnable(tmp_path / "mnist", n_train=40, n_test=20)
    for input_shape in ((2, 28, 28), (2, 1, 28, 28)):
        whole = open_data(tmp_path / "mnist", input_shape=input_shape)
        streamed = open_data(tmp_path / "mnist", input_shape=input_shape, stream_above_mb=0, workers=0)
        assert tuple(whole.x_train.shape[1:]) == input_shape[1:] == tuple(streamed.example(2).shape[1:])
        assert torch.equal(whole.x_train[:2], streamed.example(2))


def test_idx_data_of_more_than_ten_classes_trains_a_model_with_as_many_outputs_and_is_named_by_its_folder(
        tmp_path, capsys):
    # An EMNIST-style folder (47 classes) was refused with "labels must be 0 to 9" whatever the
    # model's outputs, and every IDX folder was reported as "mnist".
    arrays = learnable_arrays(n_train=40, n_test=20)
    for split in ("train", "t10k"):
        labels = arrays[f"{split}-labels-idx1-ubyte"]
        labels[::3] += 37  # up to 46
    write_set(tmp_path / "emnist-balanced", arrays)
    model = tmp_path / "m47.py"
    model.write_text("from torch import nn\n\n\nclass Net(nn.Sequential):\n    example_input_shape = (2, 1, 28, 28)\n\n"
                     "    def __init__(self, outputs=47):\n        super().__init__(nn.Flatten(), nn.Linear(784, 32), "
                     "nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, outputs))\n\n\nclass Ten(Net):\n"
                     "    def __init__(self):\n        super().__init__(10)\n")
    facts = _train(capsys, tmp_path, f"{model}:Net", tmp_path / "emnist-balanced")
    assert facts["data"].startswith("emnist-balanced (")
    err = _bad(capsys, tmp_path, f"{model}:Ten", tmp_path / "emnist-balanced")
    assert "label 46 is out of range for the model's 10 outputs" in err


@pytest.mark.parametrize(("dtype", "stream"), [(np.uint8, []), (np.uint8, ["--stream-above", 0]), (np.float32, [])],
                         ids=["uint8", "uint8-streamed", "float32"])
def test_the_run_records_that_uint8_pixels_were_divided_by_255(tmp_path, capsys, dtype, stream):
    # The exported model scored 0.58 on pixels as stored against a reported 0.80: nothing said
    # that training had scaled them.
    out = tmp_path / "run"
    code, stdout, err = _cli(capsys, "train", "zoo:mnist-mlp", "--data", write_npz(tmp_path / "d.npz", dtype=dtype),
                             "--steps", 3, "--batch-size", 4, "--quiet", "--json", "-o", out, *stream)
    assert code == 0, err
    history = json.loads((out / "model" / "bngraph.json").read_text())["history"]
    notes = " ".join(json.loads(stdout)["notes"])
    if dtype == np.uint8:  # as are a factory's, some uint8 and some floats in [0, 1] (held, they were stacked as floats)
        assert history[-1]["input_scale"] == "uint8 pixels / 255 (values in [0, 1])"
        assert "trained on uint8 pixels / 255" in notes
    else:
        assert history[-1]["input_scale"] == "as stored (not scaled)" and "pixels / 255" not in notes
    (tmp_path / "data.py").write_text(FACTORY_PY)
    mixed = open_data(f"{tmp_path / 'data.py'}:half_uint8_half_unit_floats", input_shape=(2, 1, 28, 28))
    assert isinstance(mixed, TensorData) and mixed.input_scale == "uint8 pixels / 255 (values in [0, 1])"


def test_an_npz_whose_layout_only_the_models_size_tells_is_read_by_it_and_else_refused(tmp_path):
    # Images N,3,H,3 for a 3-channel model: axes 1 and 3 both have 3. Read as NHWC first, data
    # saved N,C,H,W reached the model transposed.
    rng = np.random.default_rng(0)
    for shape, model in (((16, 3, 8, 3), (2, 3, 8, 3)), ((16, 3, 3, 3), (2, 3, 3, 3))):
        x = rng.integers(0, 256, shape, dtype=np.uint8)  # saved as PyTorch orders it
        path = tmp_path / f"{shape[2]}.npz"
        np.savez(path, x_train=x, y_train=np.arange(16) % 2, x_test=x[:4], y_test=np.arange(4) % 2)
        if shape[2] != shape[3]:
            torch.testing.assert_close(open_data(path, input_shape=model).x_train, torch.from_numpy(x).float() / 255)
            # Both axes are the channels of a model of another size: its size is what is wrong, said so.
            with pytest.raises(UserError, match=r"as N,H,W,C its images are 3x8, as N,C,H,W 8x3; neither is the "
                                                r"model's 8x8 images"):
                open_data(path, input_shape=(2, 3, 8, 8))
        else:
            with pytest.raises(UserError, match=r"axes 1 and 3 both hold the model's 3 channels"):
                open_data(path, input_shape=model)


@pytest.mark.parametrize(("option", "data", "message"), [
    (["--cifar100-labels", "coarse"], "cifar-10-batches-bin", "--cifar100-labels picks CIFAR-100's labels; {} is cifar-10-bin"),
    (["--dataset", "fashion-mnist"], "d.npz", "--dataset names what an MNIST-format folder holds; {} is npz"),
    (["--image-size", "8,8"], "d.npz", "--image-size resizes image folders; {} is npz"),
])
def test_an_option_for_another_data_format_is_refused(tmp_path, capsys, option, data, message):
    # --cifar100-labels on CIFAR-10 and --dataset on an .npz were ignored without a word.
    path = write_cifar(tmp_path / data) if "cifar" in data else write_npz(tmp_path / data)
    assert message.format(path) in _bad(capsys, tmp_path, "zoo:mnist-mlp", path, *option)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_binary_trains(tmp_path, capsys, nets, hundred):
    root = write_cifar(tmp_path / ("cifar-100-binary" if hundred else "cifar-10-batches-bin"), hundred)
    facts = _train(capsys, tmp_path, f"{nets}:{'Cifar100Net' if hundred else 'Cifar10Net'}", root)
    assert facts["data_format"] == ("cifar-100-bin" if hundred else "cifar-10-bin")
    data = open_data(root)
    assert data.x_train.shape == (6 if hundred else 30, 3, 32, 32)
    if hundred:
        raw = np.fromfile(root / "train.bin", np.uint8).reshape(-1, 2 + 3072)
        assert data.y_train.tolist() == raw[:, 1].tolist()  # fine labels
        assert open_data(root, cifar100_labels="coarse").y_train.tolist() == raw[:, 0].tolist()


def test_factory_trains_in_memory_and_streamed(tmp_path, capsys):
    factory = tmp_path / "data.py"
    factory.write_text(FACTORY_PY)
    assert _train(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:make")["data_format"] == "factory"
    (tmp_path / "run").rename(tmp_path / "in-memory")
    facts = _train(capsys, tmp_path, "zoo:mnist-mlp", factory, "--stream-above", 0, "--loader-workers", 1)
    assert facts["streamed"] and facts["data_format"] == "factory"


TOKENS_PY = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class TokenClassifier(nn.Module):
    """Token ids in, as a text model takes them: an Embedding, a mean over the sequence, an MLP."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, input_ids):
        return self.head(torch.relu(self.fc(self.embed(input_ids).mean(1))))


def make():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (96, 12), generator=g)
    labels = (ids[:, 0] >= 25).long()  # the first token decides
    return TensorDataset(ids[:64], labels[:64]), TensorDataset(ids[64:], labels[64:])
'''


def test_a_factory_of_token_ids_trains_a_text_model_in_memory_and_streamed(tmp_path, capsys):
    # The ids were made float ("expected Long ... but got FloatTensor" from the Embedding), and
    # the checkpoint's probe of the function fed it N(0, 1) cast to integers (index -1).
    (tmp_path / "tokens.py").write_text(TOKENS_PY)
    model = [f"{tmp_path / 'tokens.py'}:TokenClassifier", "--input-shape", "4,12", "--input-dtype", "int64"]
    facts = _train(capsys, tmp_path, model[0], f"{tmp_path / 'tokens.py'}:make", *model[1:], steps=4)
    assert facts["data_format"] == "factory"
    code, _, err = _cli(capsys, "train", *model, "--data", f"{tmp_path / 'tokens.py'}:make", "--steps", 6,
                        "--batch-size", 4, "--eval-every", 4, "--quiet", "--resume", "-o", tmp_path / "run")
    assert code == 0, err
    data = open_data(f"{tmp_path / 'tokens.py'}:make", input_shape=(4, 12), input_dtype=torch.int64)
    streamed = open_data(f"{tmp_path / 'tokens.py'}:make", input_shape=(4, 12), input_dtype=torch.int64,
                         stream_above_mb=0, workers=0)
    assert data.x_train.dtype == torch.int64 and streamed.train[0][0].dtype == torch.int64
    assert torch.equal(data.x_train[0], streamed.train[0][0])
    with pytest.raises(UserError, match=r"is an image of int64 pixels.*--input-dtype int64"):  # not floats of 0-49
        open_data(f"{tmp_path / 'tokens.py'}:make")  # for a model of images
    # verify --data reads the test ids as the model takes them (they were made float, and the
    # Embedding raised), and so does insert --preserve --data for its calibration.
    onnx = tmp_path / "tokens.onnx"
    assert _cli(capsys, "export", tmp_path / "run" / "model", "-o", onnx)[0] == 0
    code, out, err = _cli(capsys, "verify", tmp_path / "run" / "model", onnx, "--data", f"{tmp_path / 'tokens.py'}:make")
    assert code == 0 and "32]" in out, out + err  # the 32 test examples beside the random batches
    code, _, err = _cli(capsys, "insert", *model, "--preserve", "--data", f"{tmp_path / 'tokens.py'}:make",
                        "-o", tmp_path / "bn")
    assert code == 0, err


def test_a_factorys_images_read_whole_and_streamed_are_the_same_values(tmp_path):
    # uint8 tensors are scaled to [0, 1] on both paths (streamed, they once stayed 0-255; held
    # whole beside float items, torch.stack made them floats of 0-255), and PIL images become C, H, W.
    factory = tmp_path / "data.py"
    factory.write_text(FACTORY_PY)
    for symbol in ("uint8_images", "pil_gray", "pil_rgb", "mixed_uint8_and_float"):
        whole = open_data(f"{factory}:{symbol}")
        streamed = open_data(f"{factory}:{symbol}", stream_above_mb=0, workers=0)
        assert isinstance(whole, TensorData) and isinstance(streamed, StreamData)
        x_streamed = torch.stack([streamed.train[i][0] for i in range(len(streamed.train))])
        assert torch.equal(whole.x_train, x_streamed), symbol
        assert 0 <= whole.x_train.min() and whole.x_train.max() <= 1 and whole.x_train.max() > 0.9
    pixels = np.random.default_rng(3).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    torch.testing.assert_close(open_data(f"{factory}:pil_rgb").x_train[3],
                               torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    config = TrainConfig(steps=12, batch_size=8, lr=0.1, eval_every=6)
    runs = []
    for data in (open_data(f"{factory}:uint8_images"), open_data(f"{factory}:uint8_images", stream_above_mb=0, workers=0)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
        runs.append(train(model, data, config, progress=False))
    for key, value in runs[0].model.state_dict().items():
        assert torch.equal(value, runs[1].model.state_dict()[key]), key


PALETTE_PY = """
import numpy as np
from PIL import Image

PALETTE = [0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * 759  # black, white, red


def palette_image(i):  # GIFs and PNG8s open so: mode P, each pixel an index into the palette
    image = Image.fromarray(((np.indices((4, 4)).sum(0) + i) % 3).astype(np.uint8), "P")
    image.putpalette(PALETTE)
    return image


def make():
    items = [(palette_image(i), i % 2) for i in range(6)]
    return items[:4], items[4:]


def sixteen_bit():
    items = [(Image.fromarray(np.full((4, 4), 4000, np.uint16)), i % 2) for i in range(6)]
    return items[:4], items[4:]
"""


def test_a_factorys_pil_images_are_decoded_as_an_image_folders_are(tmp_path, capsys):
    # Palette images reached the model as their indices / 255 (0, 1/255, 2/255: blank images), and
    # 16-bit ones as floats of 0-65535.
    (tmp_path / "data.py").write_text(PALETTE_PY)
    index = (np.indices((4, 4)).sum(0) + 1) % 3  # train[1]'s
    colours = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0]], np.uint8)[index]
    rgb = torch.from_numpy(colours).permute(2, 0, 1) / 255
    gray = torch.from_numpy(np.array(Image.fromarray(colours).convert("L"))[None]) / 255
    for channels, expected in ((3, rgb), (1, gray)):
        for stream in (None, 0):
            data = open_data(f"{tmp_path / 'data.py'}:make", input_shape=(2, channels, 4, 4), stream_above_mb=stream,
                             workers=0)
            x = data.x_train[1] if stream is None else data.train[1][0]
            assert torch.equal(x, expected), (channels, stream)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{tmp_path / 'data.py'}:sixteen_bit")
    assert "sixteen_bit train[0] has 16-bit pixels (mode I;16); a factory's PIL images are read as 8-bit" in err


def test_a_factorys_arrays_flipped_by_numpy_are_read_as_flipped(tmp_path):
    # x[:, :, ::-1] (a random horizontal flip) has negative strides, which torch refuses: such an
    # item was called "not an image".
    (tmp_path / "data.py").write_text(
        "import numpy as np\n\nIMAGES = np.random.default_rng(0).integers(0, 256, (12, 1, 8, 8)).astype(np.uint8)\n\n\n"
        "def make():\n    items = [(x[:, :, ::-1], i % 3) for i, x in enumerate(IMAGES)]\n    return items[:8], items[8:]\n")
    flipped = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12, 1, 8, 8)).astype(np.uint8)).flip(3) / 255
    for stream in (None, 0):
        data = open_data(f"{tmp_path / 'data.py'}:make", input_shape=(2, 1, 8, 8), stream_above_mb=stream, workers=0)
        x = data.x_train if stream is None else torch.stack([data.train[i][0] for i in range(8)])
        assert torch.equal(x, flipped[:8])


def test_a_factorys_2d_items_get_a_channel_axis_only_for_a_model_that_takes_one(tmp_path):
    # Whole, (T, C) items for an (N, T, C) model once became (N, 1, T, C); streamed, (H, W) items
    # for an (N, 1, H, W) model stayed (N, H, W). Both paths now give what the model takes.
    factory = tmp_path / "data.py"
    factory.write_text(FACTORY_PY)
    for input_shape in ((2, 6, 16), (2, 1, 6, 16)):
        whole = open_data(f"{factory}:matrices", input_shape=input_shape)
        streamed = open_data(f"{factory}:matrices", input_shape=input_shape, stream_above_mb=0, workers=0)
        assert isinstance(whole, TensorData) and isinstance(streamed, StreamData)
        assert tuple(whole.x_train.shape) == (12, *input_shape[1:])
        assert tuple(streamed.example(2).shape) == input_shape
        x_streamed = torch.stack([streamed.train[i][0] for i in range(len(streamed.train))])
        assert torch.equal(whole.x_train, x_streamed)


def test_streamed_data_trains_bit_identically_to_in_memory(tmp_path):
    path = write_npz(tmp_path / "d.npz", n_train=64, n_test=20)
    memory, streamed = open_data(path), open_data(path, stream_above_mb=0, workers=0)
    assert isinstance(memory, TensorData) and isinstance(streamed, StreamData)
    config = TrainConfig(steps=12, batch_size=8, lr=0.1, eval_every=6)
    runs = []
    for data in (memory, streamed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
        runs.append(train(model, data, config, progress=False))
    for key, value in runs[0].model.state_dict().items():
        assert torch.equal(value, runs[1].model.state_dict()[key]), key
    assert [r["test_accuracy"] for r in runs[0].metrics] == [r["test_accuracy"] for r in runs[1].metrics]


# --- bad data: one line naming the file, exit 2 ----------------------------------------------------


def test_a_corrupt_image_is_named(tmp_path, capsys, nets):
    root = write_image_folder(tmp_path / "pets")
    broken = root / "train" / "dog" / "1.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert str(broken) in _bad(capsys, tmp_path, f"{nets}:Net", root)


def test_a_corrupt_image_found_while_streaming_is_named(tmp_path, capsys, nets):
    root = write_image_folder(tmp_path / "pets")
    broken = root / "train" / "emu" / "2.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    err = _bad(capsys, tmp_path, f"{nets}:Net", root, "--stream-above", 0, "--loader-workers", 1, "--steps", 6)
    assert str(broken) in err


@pytest.mark.parametrize("stream", [[], ["--stream-above", 0, "--loader-workers", 0]], ids=["held", "streamed"])
def test_an_image_whose_header_claims_more_pixels_than_pillow_decodes_is_named(tmp_path, capsys, nets, stream):
    # Pillow's DecompressionBombError (a huge scan, or a damaged header) is neither an OSError
    # nor a ValueError: it ended the run in a traceback.
    root = write_image_folder(tmp_path / "pets")
    damaged = root / "train" / "dog" / "3.bmp"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(damaged)
    header = bytearray(damaged.read_bytes())
    header[18:26] = np.array([20000, 10000], "<i4").tobytes()  # width and height: 200 million pixels
    damaged.write_bytes(bytes(header))
    err = _bad(capsys, tmp_path, f"{nets}:Net", root, *stream)
    assert f"{damaged}: not a readable image (DecompressionBombError: Image size (200000000 pixels)" in err


def test_a_16_bit_image_is_named_not_clipped_to_white(tmp_path, capsys, nets):
    # Pillow's convert("L") clips a 16-bit scan (CT, microscopy) at 255: nearly all white.
    root = write_image_folder(tmp_path / "scans")
    scan = root / "train" / "emu" / "16bit.png"
    Image.fromarray((np.random.default_rng(0).random((9, 9)) * 4000).astype(np.uint16)).save(scan)
    assert Image.open(scan).mode == "I;16"
    err = _bad(capsys, tmp_path, f"{nets}:Net", root)
    assert f"{scan} has 16-bit pixels (mode I;16)" in err


def test_palette_images_with_a_table_of_transparency_are_read_without_pillows_warning(tmp_path):
    # PNG8 exports: Pillow's UserWarning on converting them to RGB or L reached the run's stderr.
    palette = [0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759
    for split in ("train", "test"):
        for k, name in enumerate(("a-red", "b-blue")):
            (tmp_path / split / name).mkdir(parents=True)
            image = Image.new("P", (4, 4), k + 1)
            image.putpalette(palette)
            image.save(tmp_path / split / name / "0.png", transparency=bytes([0, 128, 200]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = open_data(tmp_path, input_shape=(2, 3, 4, 4)).x_train
        gray = open_data(tmp_path, input_shape=(2, 1, 4, 4)).x_train
    assert rgb[:, :, 0, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # the palette's colours, alpha dropped
    lumas = [np.array(Image.new("RGB", (1, 1), colour).convert("L"))[0, 0] for colour in ((255, 0, 0), (0, 0, 255))]
    assert torch.equal(gray[:, 0, 0, 0], torch.tensor(lumas, dtype=torch.float32) / 255)


def test_class_folders_named_in_two_unicode_forms_are_one_class(tmp_path):
    # macOS writes "café" decomposed (NFD): test/café of a folder copied from it beside train/café
    # (NFC) was "a class that train does not have", and a line that printed the same name twice.
    composed, decomposed = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    for split, name in (("train", composed), ("train", "tea"), ("test", decomposed), ("test", "tea")):
        (tmp_path / split / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), len(name) * 20, np.uint8)).save(tmp_path / split / name / "0.png")
    data = open_data(tmp_path, input_shape=(2, 3, 8, 8))
    assert data.class_names == (composed, "tea") and data.y_test.tolist() == [0, 1]
    trained_on_a_mac = with_model_classes(data, ("tea", decomposed))
    assert trained_on_a_mac.class_names == ("tea", decomposed) and trained_on_a_mac.y_test.tolist() == [1, 0]
    (tmp_path / "train" / decomposed).mkdir()
    (tmp_path / "train" / composed / "0.png").rename(tmp_path / "train" / decomposed / "0.png")
    with pytest.raises(UserError, match="two class folders of one name, spelled in two Unicode forms"):
        open_data(tmp_path, input_shape=(2, 3, 8, 8))


def test_an_empty_class_folder_is_named(tmp_path, capsys, nets):
    root = write_image_folder(tmp_path / "pets")
    (root / "test" / "yak").mkdir()
    (root / "train" / "yak").mkdir()
    assert f"{root / 'train' / 'yak'} is an empty class folder" in _bad(capsys, tmp_path, f"{nets}:Net", root)


def test_labels_the_model_has_no_output_for_are_named(tmp_path, capsys, nets):
    path = write_npz(tmp_path / "d.npz", y_train=np.arange(40) % 12)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", path)
    assert str(path) in err and "label 11 is out of range for the model's 10 outputs" in err
    root = write_image_folder(tmp_path / "pets", classes=tuple("abcdefghijk"), per_class=1, sizes=((8, 8),))
    assert "11 class folders" in _bad(capsys, tmp_path, f"{nets}:Net", root)
    cifar = write_cifar(tmp_path / "c10", bad_label=10)
    assert f"{cifar / 'data_batch_1.bin'} has label 10 at index 2" in _bad(capsys, tmp_path, f"{nets}:Cifar10Net", cifar)


def test_a_factorys_streamed_labels_are_checked(tmp_path, capsys):
    factory = tmp_path / "data.py"
    factory.write_text(FACTORY_PY)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:bad_labels", "--stream-above", 0, "--loader-workers", 0)
    assert str(factory) in err and "label 11, out of range for the model's 10 outputs" in err


def test_images_holding_nan_or_inf_are_named_before_any_training(tmp_path, capsys):
    # Trained on, a NaN image makes NaN weights; the run would look like any other until the end.
    x_test = np.random.default_rng(0).random((12, 28, 28))
    x_test[5, 3, 4] = np.nan
    path = write_npz(tmp_path / "d.npz", x_test=x_test)
    assert f"{path}: x_test[5] holds NaN or infinite values" in _bad(capsys, tmp_path, "zoo:mnist-mlp", path)
    assert not (tmp_path / "bad").exists()
    factory = tmp_path / "data.py"
    factory.write_text(FACTORY_PY)
    for extra in ((), ("--stream-above", 0, "--loader-workers", 0, "--steps", 6)):  # read whole; streamed, a whole epoch
        err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:with_inf", *extra)
        assert f"{factory}:with_inf train[3] holds NaN or infinite values" in err
    data = open_data(write_npz(tmp_path / "ok.npz"))
    data.x_train[17, 0, 2, 2] = float("nan")
    user_tensors = TensorData(data.x_train, data.y_train, data.x_test, data.y_test)  # the Python API's
    with pytest.raises(UserError, match=r"the data's x_train\[17\] holds NaN or infinite values"):
        train(create_model("mnist-mlp"), user_tensors, TrainConfig(steps=2, batch_size=4), progress=False)


def test_a_float64_value_float32_cannot_hold_is_named_before_any_training(tmp_path, capsys):
    # Checked as float64 it was finite; as the model's float32 input, inf: the run "diverged" (exit
    # 1, "lower --lr") where bad data is one line naming it.
    x_train = np.random.default_rng(0).random((40, 28, 28))
    x_train[5, 0, 0] = 1e39
    path = write_npz(tmp_path / "d.npz", x_train=x_train)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", path)
    assert f"{path}: x_train[5] holds a value beyond float32's range (up to 3.4e+38)" in err


MLP_PY = """
from torch import nn


class Net(nn.Sequential):  # flattens whatever it is given: 8 x 8 x 3 runs as well as 3 x 8 x 8
    example_input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(192, 4))
"""

CHANNELS_LAST_PY = """
import numpy as np
from torch.utils.data import Dataset


class Photos(Dataset):  # np.array(PIL image), as cv2 gives it too: H, W, C
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8), i % 4


def make():
    return Photos(16), Photos(8)
"""


@pytest.mark.parametrize("streamed", [False, True])
def test_a_factorys_channels_last_images_are_refused_not_flattened_in_the_wrong_order(tmp_path, capsys, streamed):
    (tmp_path / "m.py").write_text(MLP_PY)
    (tmp_path / "photos.py").write_text(CHANNELS_LAST_PY)
    err = _bad(capsys, tmp_path, tmp_path / "m.py", tmp_path / "photos.py",
               *(["--stream-above", 0, "--loader-workers", 0] if streamed else []))
    assert "train[0] is an image of shape (8, 8, 3), channels last (H, W, C), but the model takes (3, 8, 8)" in err
    assert "x.transpose(2, 0, 1)" in err and not (tmp_path / "bad").exists()


LABELS_PY = """
import torch
from torch.utils.data import Dataset, TensorDataset

x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


class Strings(Dataset):  # labels read from a CSV, as text
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return x[i], str(i % 10)


def fractional():  # regression targets or soft labels, not class indices
    y = torch.linspace(0, 9.5, 16)
    return TensorDataset(x, y), TensorDataset(x, y)


def strings():
    return Strings(), Strings()


def whole_floats():
    y = (torch.arange(16) % 10).float()
    return TensorDataset(x, y), TensorDataset(x, y)


def masks():  # a segmentation data set's per-pixel labels
    y = torch.randint(0, 10, (16, 28, 28), generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, y), TensorDataset(x, y)
"""


@pytest.mark.parametrize("streamed", [False, True])
def test_a_factorys_labels_must_be_class_indices_not_truncated_floats_or_text(tmp_path, capsys, streamed):
    factory = tmp_path / "labels.py"
    factory.write_text(LABELS_PY)
    stream = ["--stream-above", 0, "--loader-workers", 0] if streamed else []
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:fractional", *stream)
    assert f"{factory}:fractional train[1] has label 0.633" in err and "expected an integer class index" in err
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:strings", *stream)
    assert f"{factory}:strings train[0] has label '0'; expected an integer class index" in err
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:masks", *stream)  # its repr ran over 28 lines
    assert f"{factory}:masks train[0] has label a Tensor of shape (28, 28); expected an integer class index" in err
    _train(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:whole_floats", *stream)


BROKEN_ITEMS_PY = """
import torch
from torch.utils.data import Dataset

x = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(0))


class Photos(Dataset):
    def __init__(self, broken=None):
        self.broken = broken

    def __len__(self):
        return 24

    def __getitem__(self, i):
        if self.broken == "missing" and i == 7:
            raise FileNotFoundError("/data/photos/img0007.jpg")
        if self.broken == "smaller" and i == 13:
            return x[i, :, :14, :14], i % 10
        return x[i], i % 10


def missing():
    return Photos("missing"), Photos()


def smaller():
    return Photos("smaller"), Photos()
"""


@pytest.mark.parametrize("stream", [[], ["--stream-above", 0, "--loader-workers", 0],
                                    ["--stream-above", 0, "--loader-workers", 1]])
def test_a_factory_item_that_cannot_be_read_or_is_another_shape_is_named(tmp_path, capsys, stream):
    factory = tmp_path / "photos.py"
    factory.write_text(BROKEN_ITEMS_PY)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:missing", *stream, "--steps", 8)
    assert err.startswith(f"bngraph: error: {factory}:missing train[7] could not be read")  # a worker's too
    assert f"{factory}:" in err.split("could not be read")[1] and "FileNotFoundError: /data/photos/img0007.jpg" in err
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:smaller", *stream, "--steps", 8)
    assert "(1, 14, 14)" in err and "(1, 28, 28)" in err


@pytest.mark.parametrize("stream", [[], ["--stream-above", 0, "--loader-workers", 0]], ids=["whole", "streamed"])
@pytest.mark.parametrize(("symbol", "split", "first_float"), [("floats_0_255_in_the_test_split", "test", 0),
                                                              ("some_items_0_255_floats", "train", 5),
                                                              ("floats_in_minus_1_to_1_in_the_test_split", "test", 0)])
def test_uint8_and_0_255_float_images_of_one_factory_are_refused(tmp_path, capsys, stream, symbol, split, first_float):
    # uint8 is scaled to [0, 1], floats used as they are: the same pixel 200 became 0.78 in one
    # image (or split) and 200.0 in another, and a test split of 0-255 floats gave its accuracy.
    (tmp_path / "data.py").write_text(FACTORY_PY)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{tmp_path / 'data.py'}:{symbol}", *stream, "--steps", 4)
    named = re.search(rf"{split}\[(\d+)\] is float32 with values from", err)  # streamed: the first read
    assert named and int(named[1]) >= first_float and "would be on different scales" in err, err


@pytest.mark.parametrize("stream", [None, 0])
def test_a_factorys_images_of_integers_other_than_uint8_are_refused(tmp_path, stream):
    # uint8 items were divided by 255, int64 ones (torch.tensor(x, dtype=torch.long)) used as they
    # are: one run on two scales, recorded as "uint8 / 255" held and as nothing streamed.
    (tmp_path / "data.py").write_text(
        "import numpy as np\nimport torch\n\nX = np.random.default_rng(0).integers(0, 256, (12, 1, 4, 4))\n\n\n"
        "def longs():\n    items = [(torch.tensor(x), i % 2) for i, x in enumerate(X)]\n    return items[:8], items[8:]\n\n\n"
        "def some_longs():\n    items = [(torch.tensor(x, dtype=torch.uint8 if i % 2 else torch.int64), i % 2)"
        " for i, x in enumerate(X)]\n    return items[:8], items[8:]\n\n\n"
        "def uint16_test_split():\n    items = [(x.astype(np.uint8 if i < 8 else np.uint16), i % 2) for i, x in enumerate(X)]\n"
        "    return items[:8], items[8:]\n")
    for symbol, item in (("longs", "train[0]"), ("some_longs", "train[0]"), ("uint16_test_split", "test[0]")):
        with pytest.raises(UserError, match=rf"{symbol} {re.escape(item)} is an image of (int64|uint16) pixels; images "
                                            r"are uint8 \(0-255, scaled to \[0, 1\]\) or floats"):
            open_data(f"{tmp_path / 'data.py'}:{symbol}", input_shape=(2, 1, 4, 4), stream_above_mb=stream, workers=0)


@pytest.mark.parametrize(("symbol", "holds"), [("two_images", "a tuple of 2 values"), ("raw_text", "str 'some raw text'")])
def test_a_factory_item_whose_image_is_not_a_tensor_is_named(tmp_path, capsys, symbol, holds):
    # torch.as_tensor's ValueError and TypeError ended the run in a traceback, exit 1.
    (tmp_path / "data.py").write_text(FACTORY_PY)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{tmp_path / 'data.py'}:{symbol}")
    assert f"train[0] holds {holds} where its image should be" in err


def test_a_factory_item_of_more_than_image_and_label_is_told_how_many_it_holds(tmp_path, capsys):
    # "train[0] is tuple; expected (image tensor, label)": it is a tuple.
    (tmp_path / "data.py").write_text(FACTORY_PY)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{tmp_path / 'data.py'}:with_paths")
    assert "with_paths train[0] is a tuple of 3 items; expected 2, (image tensor, label)" in err


def test_a_factory_of_dict_examples_is_told_what_to_return(tmp_path, capsys):
    factory = tmp_path / "data.py"
    factory.write_text(FACTORY_PY)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:hf_style")
    assert f"{factory}:hf_style train[0] is a dict ('pixel_values', 'label')" in err
    assert "(item['pixel_values'], item['label'])" in err


def test_a_factory_of_iterable_datasets_is_told_they_cannot_be_indexed(tmp_path, capsys):
    factory = tmp_path / "data.py"
    factory.write_text(FACTORY_PY)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{factory}:iterable")
    assert f"{factory}:iterable() returned an IterableDataset, which has no length and cannot be indexed" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ({"y_train": np.zeros(39, np.int64)}, "x_train holds 40 examples but y_train 39 labels"),
        ({"y_test": np.full(12, -1)}, "has label -1 at index 0"),
        ({"y_train": np.zeros(40, np.float32)}, "labels of type float32"),
        # cast to int64, 2**63 wrapped round: "y_train has label -9223372036854775808", no file named
        ({"y_train": np.array([0] * 7 + [2**63] + [1] * 32, np.uint64)}, "has label 9223372036854775808 at index 7"),
        ({"x_test": np.zeros((12, 27, 27), np.uint8)}, "x_train images are (1, 28, 28), x_test (1, 27, 27)"),
        # uint8 scaled to [0, 1], float 0-255 as it is: test accuracy 0.31 where uint8 for both gave 1
        ({"x_test": np.full((12, 28, 28), 255, np.float32)},
         "x_train is uint8 (scaled from 0-255 to [0, 1]) but x_test is float32 with values from 255 to 255"),
        # and floats centred on 0, as Normalize((0.5,), (0.5,)) writes them
        ({"x_test": np.full((12, 28, 28), -1, np.float32)},
         "x_train is uint8 (scaled from 0-255 to [0, 1]) but x_test is float32 with values from -1 to -1"),
    ],
)
def test_inconsistent_arrays_are_named(tmp_path, capsys, override, message):
    path = write_npz(tmp_path / "d.npz", **override)
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", path)
    assert str(path) in err and message in err


def test_a_uint8_split_beside_a_float_split_already_in_0_to_1_trains(tmp_path, capsys):
    _train(capsys, tmp_path, "zoo:mnist-mlp", write_npz(tmp_path / "d.npz", x_test=np.full((12, 28, 28), 0.5)))


def test_big_endian_arrays_are_read_as_the_same_numbers(tmp_path, capsys):
    # As some non-Python tools write them; torch.from_numpy refused them with a traceback.
    native = write_npz(tmp_path / "native.npz", dtype=np.float32)
    with np.load(native) as arrays:
        np.savez(tmp_path / "big.npz", **{k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()})
    big, same = open_data(tmp_path / "big.npz"), open_data(native)
    assert torch.equal(big.x_train, same.x_train) and torch.equal(big.y_test, same.y_test)
    _train(capsys, tmp_path, "zoo:mnist-mlp", tmp_path / "big.npz")


def test_a_file_that_is_not_an_npz_of_arrays_is_one_line_without_pickle_advice(tmp_path, capsys):
    np.save(tmp_path / "plain.npy", np.zeros((4, 28, 28), np.float32))
    (tmp_path / "plain.npy").rename(tmp_path / "array.npz")
    assert "array.npz is one .npy array, not an .npz" in _bad(capsys, tmp_path, "zoo:mnist-mlp", tmp_path / "array.npz")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip")
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", tmp_path / "junk.npz")
    assert "junk.npz is not an .npz (not a zip file of arrays)" in err and "pickle" not in err
    path = write_npz(tmp_path / "scalar.npz", x_train=np.array(0.0))
    assert "x_train has shape (); images are" in _bad(capsys, tmp_path, "zoo:mnist-mlp", path)


class _OpensAFile:  # unpickled, it creates `path`: the proof that a pickle was run
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_an_npz_member_that_is_a_pickle_is_one_line_and_never_unpickled(tmp_path, capsys):
    # numpy gives a member not in .npy format as its bytes: train crashed on them with a traceback.
    path = write_npz(tmp_path / "d.npz")
    with zipfile.ZipFile(path, "a") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile's note on the duplicate name: the last one is read
        archive.writestr("x_train.npy", pickle.dumps(_OpensAFile(tmp_path / "ran")))
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", path)
    assert f"{path}: x_train is not a NumPy array (its x_train.npy member is not in .npy format)" in err
    assert not (tmp_path / "ran").exists()


def test_an_npz_named_in_capitals_is_an_npz(tmp_path, capsys):
    path = write_npz(tmp_path / "d.npz").rename(tmp_path / "D.NPZ")
    assert detect_format(path) == "npz"
    _train(capsys, tmp_path, "zoo:mnist-mlp", path)


def test_a_factory_that_calls_sys_exit_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "exits.py").write_text("import sys\n\n\ndef make():\n    sys.exit(3)\n")
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", tmp_path / "exits.py")
    assert f"{tmp_path / 'exits.py'}:make called sys.exit(3) instead of returning (train, test) Datasets" in err


def test_a_shape_the_model_cannot_take_is_named(tmp_path, capsys, nets):
    path = write_npz(tmp_path / "rgb.npz", "NHWC")
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", path)
    assert str(path) in err and "(40, 28, 28, 3): neither axis 1 nor axis 3 is the model's 1 channels" in err
    err = _bad(capsys, tmp_path, f"{nets}:Net", write_npz(tmp_path / "gray.npz"))
    assert "cannot take gray images (1x28x28)" in err


def test_truncated_cifar_records_and_pickles_are_refused(tmp_path, capsys, nets):
    root = write_cifar(tmp_path / "c10")
    (root / "test_batch.bin").write_bytes((root / "test_batch.bin").read_bytes()[:-5])
    err = _bad(capsys, tmp_path, f"{nets}:Cifar10Net", root)
    assert f"{root / 'test_batch.bin'} holds" in err and "3073-byte" in err
    pickled = tmp_path / "p.npz"
    np.savez(pickled, x_train=np.array([{"a": 1}], dtype=object), y_train=[0], x_test=[0], y_test=[0])
    assert f"cannot read {pickled}" in _bad(capsys, tmp_path, "zoo:mnist-mlp", pickled)


# --- precision and memory format on the CPU, resumed exactly ------------------------------------


def _small_data():
    arrays = learnable_arrays(0, 96, 32)
    images = lambda key: torch.from_numpy(arrays[key]).float().div(255).unsqueeze(1)  # noqa: E731
    labels = lambda key: torch.from_numpy(arrays[key]).long()  # noqa: E731
    return TensorData(images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
                      images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def _conv_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(4 * 8 * 8, 10))


@pytest.mark.parametrize("precision, channels_last", [("bf16", False), ("fp32", True), ("bf16", True), ("fp16", True)])
def test_precision_and_layout_resume_bit_identically(tmp_path, precision, channels_last):
    data = _small_data()
    config = TrainConfig(steps=12, batch_size=8, lr=0.05, eval_every=4, precision=precision,
                         channels_last=channels_last, deterministic=DETERMINISTIC_FOR_EXACTNESS)
    whole = train(_conv_net(), data, config, out_dir=tmp_path / "whole", progress=False)

    def crash(row):
        if row["step"] == 8:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(_conv_net(), data, config, out_dir=tmp_path / "killed", progress=False, on_eval=crash)
    resumed = train(_conv_net(), data, config, out_dir=tmp_path / "killed", resume=True, progress=False)
    assert resumed.resumed_from == 8  # the checkpoint of the evaluation the callback saw
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    # fp32 in the default layout said outright: on CUDA the defaults are bf16 and channels_last.
    baseline = replace(config, precision="fp32", channels_last=False)
    fp32 = train(_conv_net(), data, baseline, progress=False)
    if precision != "fp32":  # autocast really ran in the lower precision
        assert any(not torch.equal(v, fp32.model.state_dict()[k]) for k, v in whole.model.state_dict().items())
    else:  # channels_last kernels sum in another order: close, not equal
        if torch.cuda.is_available():  # cuDNN's fp32 convolutions are TF32 by default (10-bit mantissas)
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                whole, fp32 = (train(_conv_net(), data, c, progress=False) for c in (config, baseline))
        for key, value in whole.model.state_dict().items():
            torch.testing.assert_close(value, fp32.model.state_dict()[key], rtol=1e-4, atol=1e-5)


def test_resume_refuses_another_precision(tmp_path, capsys):
    common = ["train", "zoo:mnist-mlp", "--data", write_npz(tmp_path / "d.npz"), "--batch-size", 4, "--eval-every", 2,
              "--quiet", "-o", tmp_path / "run"]
    assert _cli(capsys, *common, "--steps", 2, "--precision", "bf16")[0] == 0
    code, _, err = _cli(capsys, *common, "--steps", 4, "--resume")
    assert code == 2 and "precision: 'bf16' then, 'fp32' now" in err
    assert _cli(capsys, *common, "--steps", 4, "--resume", "--precision", "bf16")[0] == 0


def test_resume_refuses_other_data_and_takes_the_same_data_moved(tmp_path, capsys):
    # The batches depend on the data: a resumed run on other data would continue another run.
    original = write_npz(tmp_path / "d.npz")
    common = ["train", "zoo:mnist-mlp", "--batch-size", 4, "--eval-every", 2, "--quiet", "-o", tmp_path / "run"]
    assert _cli(capsys, *common, "--data", original, "--steps", 2)[0] == 0
    relabelled = write_npz(tmp_path / "relabelled.npz", y_train=(np.arange(40) * 7) % 10)
    code, _, err = _cli(capsys, *common, "--data", relabelled, "--steps", 4, "--resume")
    assert code == 2 and "--resume with other data than the run in" in err and "training labels (SHA-256)" in err
    code, _, err = _cli(capsys, *common, "--data", write_npz(tmp_path / "more.npz", n_train=48), "--steps", 4, "--resume")
    assert code == 2 and "training examples: 40 then, 48 now" in err
    moved = tmp_path / "moved" / "d.npz"
    moved.parent.mkdir()
    moved.write_bytes(original.read_bytes())
    assert _cli(capsys, *common, "--data", moved, "--steps", 4, "--resume")[0] == 0


def test_resume_refuses_renamed_or_moved_class_folders_and_images_on_another_scale(tmp_path, capsys, nets):
    # The counts, the image shape and the label sequence were all the checkpoint compared: a
    # class folder renamed (label 1 now another folder's images), images moved between classes,
    # or uint8 images saved again as floats of 0-255 resumed without a word.
    folder = write_image_folder(tmp_path / "pets")
    common = ["train", f"{nets}:Net", "--batch-size", 4, "--quiet", "-o", tmp_path / "run"]
    assert _cli(capsys, *common, "--data", folder, "--steps", 2)[0] == 0
    (folder / "train" / "dog").rename(folder / "train" / "zebu")
    (folder / "test" / "dog").rename(folder / "test" / "zebu")
    code, _, err = _cli(capsys, *common, "--data", folder, "--steps", 4, "--resume")
    assert code == 2 and "classes: ['cat', 'dog', 'emu'] then, ['cat', 'emu', 'zebu'] now" in err
    (folder / "train" / "zebu").rename(folder / "train" / "dog")
    (folder / "test" / "zebu").rename(folder / "test" / "dog")
    (folder / "train" / "cat" / "0.png").rename(folder / "train" / "dog" / "3.png")  # as many of each class as before
    (folder / "train" / "dog" / "0.png").rename(folder / "train" / "cat" / "0.png")
    code, _, err = _cli(capsys, *common, "--data", folder, "--steps", 4, "--resume")
    assert code == 2 and "image files and labels (SHA-256)" in err and err.count("\n") == 1

    uint8 = write_npz(tmp_path / "d.npz")
    npz = ["train", "zoo:mnist-mlp", "--batch-size", 4, "--quiet", "-o", tmp_path / "npz-run", "--data", uint8]
    assert _cli(capsys, *npz, "--steps", 2)[0] == 0
    with np.load(uint8) as arrays:
        np.savez(uint8, **{k: v.astype(np.float32) if k.startswith("x") else v for k, v in arrays.items()})
    code, _, err = _cli(capsys, *npz, "--steps", 4, "--resume")
    assert code == 2 and "input scale: uint8 pixels / 255 (values in [0, 1]) then, as stored (not scaled) now" in err


def test_resume_refuses_other_pixels_and_takes_a_class_folder_renamed_to_nfc(tmp_path, capsys, nets):
    # The images of an .npz saved again inverted, labels kept: resumed, the run trained on two
    # datasets. A class folder macOS named decomposed, renamed composed: the same class, refused.
    npz = write_npz(tmp_path / "d.npz")
    common = ["train", "zoo:mnist-mlp", "--batch-size", 4, "--quiet", "-o", tmp_path / "npz-run", "--data", npz]
    assert _cli(capsys, *common, "--steps", 2)[0] == 0
    with np.load(npz) as arrays:
        np.savez(npz, **{k: 255 - v if k.startswith("x") else v for k, v in arrays.items()})
    code, _, err = _cli(capsys, *common, "--steps", 4, "--resume")
    assert code == 2 and "training images (SHA-256)" in err

    folder = write_image_folder(tmp_path / "pets")
    for split in ("train", "test"):
        (folder / split / "emu").rename(folder / split / unicodedata.normalize("NFD", "émeu"))
    run = ["train", f"{nets}:Net", "--batch-size", 4, "--quiet", "-o", tmp_path / "run", "--data", folder]
    assert _cli(capsys, *run, "--steps", 2)[0] == 0
    for split in ("train", "test"):
        (folder / split / unicodedata.normalize("NFD", "émeu")).rename(folder / split / "émeu")
    code, _, err = _cli(capsys, *run, "--steps", 4, "--resume")
    assert code == 0, err


def test_resume_refuses_a_factory_held_then_streamed(tmp_path, capsys, nets):
    # A factory's Dataset that augments at random: held, each item is drawn once; streamed, at
    # every step. A run resumed the other way matched neither run.
    factory = tmp_path / "data.py"
    factory.write_text(textwrap.dedent("""
        import torch

        class Noisy(torch.utils.data.Dataset):
            def __init__(self, n):
                self.n = n

            def __len__(self):
                return self.n

            def __getitem__(self, i):
                return torch.full((3, 8, 8), i / self.n) + 0.1 * torch.randn(3, 8, 8), i % 3

        def make():
            return Noisy(24), Noisy(8)
    """))
    common = ["train", f"{nets}:Net", "--batch-size", 4, "--quiet", "-o", tmp_path / "run", "--data", f"{factory}:make"]
    assert _cli(capsys, *common, "--steps", 2)[0] == 0
    code, _, err = _cli(capsys, *common, "--steps", 4, "--resume", "--stream-above", 0, "--loader-workers", 0)
    assert code == 2 and "factory items: held in memory then, streamed now" in err


def test_the_python_api_reads_data_as_the_cli_does_for_a_model_it_loaded(tmp_path, capsys):
    # bngraph.train(bngraph.load(run), ...): the model trained on uint8 / 255 took 0-255 floats
    # (the CLI refuses them), and an integer-input model got floats / 255 (the CLI: integers).
    uint8 = write_npz(tmp_path / "d.npz")
    assert _cli(capsys, "insert", "zoo:mnist-mlp", "-o", tmp_path / "bn")[0] == 0
    assert _cli(capsys, "train", tmp_path / "bn", "--data", uint8, "--steps", 2, "--batch-size", 4, "--quiet",
                "-o", tmp_path / "run")[0] == 0
    with np.load(uint8) as arrays:
        np.savez(tmp_path / "f255.npz", **{k: v.astype(np.float32) if k.startswith("x") else v for k, v in arrays.items()})
    model = bngraph.load(tmp_path / "run")
    assert model.bngraph_input_scale.startswith("uint8 pixels / 255")
    with pytest.raises(UserError, match="used as stored, with values from 0 to "):
        train(model, str(tmp_path / "f255.npz"), TrainConfig(steps=1, batch_size=4), progress=False)
    # A recalibration on floats in [0, 1] does not take that protection away.
    with np.load(uint8) as arrays:
        np.savez(tmp_path / "f01.npz", **{k: v.astype(np.float32) / 255 if k.startswith("x") else v
                                          for k, v in arrays.items()})
    assert _cli(capsys, "recalibrate", tmp_path / "run", "--data", tmp_path / "f01.npz", "--batches", 2,
                "--batch-size", 4, "-o", tmp_path / "recal")[0] == 0
    code, _, err = _cli(capsys, "recalibrate", tmp_path / "recal", "--data", tmp_path / "f255.npz", "--batches", 2,
                        "--batch-size", 4, "-o", tmp_path / "recal2")
    assert code == 2 and "used as stored, with values from 0 to " in err


def test_the_python_api_reads_a_path_for_the_models_declared_input(tmp_path):
    class Net(nn.Sequential):
        example_input_shape = (2, 3, 28, 28)  # decides NHWC here

    path = write_npz(tmp_path / "nhwc.npz", "NHWC")
    torch.manual_seed(0)
    model = Net(nn.Flatten(), nn.Linear(3 * 28 * 28, 10))
    run = train(model, str(path), TrainConfig(steps=3, batch_size=4, eval_every=3), progress=False)
    assert [row["step"] for row in run.metrics] == [3]


@pytest.mark.parametrize("stream", [False, True], ids=["held", "streamed"])
def test_the_python_api_trains_on_a_tuple_of_datasets_as_on_a_factorys(tmp_path, stream):
    # What a PyTorch user has at hand; it raised AttributeError: 'tuple' object has no attribute 'example'.
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 3, 8, 8, generator=g), torch.randint(0, 3, (60,), generator=g)
    pairs = [(x[i], int(y[i])) for i in range(60)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    data = (pairs[:40], pairs[40:])
    if stream:  # as open_data reads them for a path: streamed when larger than stream_above_mb
        data = open_data(data, input_shape=(2, 3, 8, 8), stream_above_mb=0, workers=0)
        assert isinstance(data, StreamData) and data.format == "datasets"
    config = TrainConfig(steps=4, batch_size=8, eval_every=4)
    run = train(model, data, config, out_dir=tmp_path / "run", progress=False)
    with torch.no_grad():
        logits = run.model(x[40:])
    assert run.metrics[-1]["test_accuracy"] == pytest.approx((logits.argmax(1) == y[40:]).float().mean().item())
    assert run.metrics[-1]["test_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y[40:]).item(), rel=1e-5)
    meta = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert meta["test_accuracy"] == run.metrics[-1]["test_accuracy"]


@pytest.mark.parametrize("data, says", [
    (lambda ds: ds, "data is a TensorDataset; expected a path"),
    (lambda ds: torch.utils.data.DataLoader(ds), "data is a DataLoader; expected a path"),
    (lambda ds: (torch.utils.data.DataLoader(ds), ds), "the data given is DataLoaders; expected a tuple (train, test)"),
])
def test_the_python_api_names_the_data_it_takes(tmp_path, data, says):
    ds = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    with pytest.raises(UserError, match=re.escape(says)):
        train(model, data(ds), TrainConfig(steps=2, batch_size=4), out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


PRETRAINED_PY = '''
import torch
from torch import nn


class Pretrained(nn.Module):
    """A user's CNN without BN (conv bias, in-place ReLU), as insert --preserve gets it."""

    example_input_shape = (2, 3, 28, 28)

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 5, 3)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu_(self.conv(x))
        return self.head(x.mean((2, 3)))
'''


@pytest.mark.parametrize("fmt", ["image-folder", "npz"])
def test_insert_preserve_calibrates_on_any_training_format(tmp_path, capsys, fmt):
    model_py = tmp_path / "pretrained.py"
    model_py.write_text(PRETRAINED_PY)
    if fmt == "npz":
        data = write_npz(tmp_path / "d.npz", layout="NHWC")
    else:
        data = write_image_folder(tmp_path / "images", sizes=((30, 26), (28, 28)))
    out = tmp_path / "bn"
    code, _, err = _cli(capsys, "insert", f"{model_py}:Pretrained", "--preserve", "--data", data, "-o", out)
    assert code == 0, err
    # The new BN's statistics are the conv outputs' on the data's training images (all of them:
    # fewer than 512), read as `train` reads them, not on random inputs.
    images = open_data(data, input_shape=(2, 3, 28, 28), stream_above_mb=None).x_train
    import bngraph

    original = bngraph.load(f"{model_py}:Pretrained").eval()
    with torch.no_grad():  # the conv's bias is dropped before the BN, which then sees conv - bias
        conv = original.conv(images) - original.conv.bias.view(-1, 1, 1)
    bn = next(m for m in bngraph.load(out).modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, conv.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, conv.transpose(0, 1).flatten(1).var(1), rtol=1e-3, atol=1e-6)
    with torch.no_grad():  # and the eval-mode function is the original's on those images
        torch.testing.assert_close(bngraph.load(out).eval()(images), original(images), rtol=1e-4, atol=1e-5)


def test_insert_preserve_data_the_model_cannot_take_is_one_line(tmp_path, capsys):
    model_py = tmp_path / "pretrained.py"
    model_py.write_text(PRETRAINED_PY)
    data = write_npz(tmp_path / "gray.npz")  # 1 x 28 x 28 images for a 3-channel model
    code, _, err = _cli(capsys, "insert", f"{model_py}:Pretrained", "--preserve", "--data", data, "-o", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1, err
    assert "784 values each; the model's input (3, 28, 28) needs 2352" in err
    assert not (tmp_path / "o").exists()


def test_the_api_reads_a_folder_for_a_loaded_artifacts_declared_input(tmp_path):
    # bngraph.load() of a run or an artifact declares `example_input_shapes` (plural): a gray
    # 8x8 model must get the 16x16 RGB files as gray 8x8, as `bngraph train` gives them.
    root = write_quadrant_folder(tmp_path / "q", ("cat", "dog", "fox", "owl"))
    for png in root.rglob("*.png"):
        Image.open(png).resize((16, 16)).save(png)
    gray = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))
    bngraph.save(gray, tmp_path / "art", example_inputs=[torch.rand(2, 1, 8, 8)])
    loaded = bngraph.load(tmp_path / "art")
    run = bngraph.train(loaded, root, TrainConfig(steps=2, batch_size=8, eval_every=2), progress=False)
    assert len(run.metrics) == 1
    # A model declaring nothing is handed the files as they are: one line, not torch's traceback.
    with pytest.raises(UserError, match=r"the model cannot take q images \(3x16x16\)"):
        bngraph.train(gray, root, TrainConfig(steps=2, batch_size=8), progress=False)


AUGMENTING_PY = '''
import random

import numpy as np
import torch


class Augmenting(torch.utils.data.Dataset):
    """Draws in __getitem__, as torchvision's random transforms do: torch, NumPy and Python's random."""

    def __len__(self):
        return 48

    def __getitem__(self, i):
        x = torch.full((1, 8, 8), i / 48.0) + torch.rand(1, 8, 8) + float(np.random.rand()) + random.random()
        return x, i % 10


def make():
    return Augmenting(), Augmenting()
'''


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def test_a_factory_that_augments_at_random_reads_the_same_in_memory_and_leaves_the_generators(tmp_path):
    # Read before the run seeds torch, each item's draw was another every run.
    (tmp_path / "aug.py").write_text(AUGMENTING_PY)
    state = torch.get_rng_state()
    first, second = (open_data(f"{tmp_path / 'aug.py'}:make", seed=3) for _ in range(2))
    assert torch.equal(first.x_train, second.x_train) and torch.equal(state, torch.get_rng_state())
    assert not torch.equal(first.x_train, open_data(f"{tmp_path / 'aug.py'}:make", seed=4).x_train)


def test_a_streamed_factory_that_augments_at_random_resumes_bit_identically_with_workers(tmp_path):
    # Each worker seeded once read the batches in turn: a resume, whose loader starts over, gave
    # each batch another worker's draws.
    (tmp_path / "aug.py").write_text(AUGMENTING_PY)
    data = open_data(f"{tmp_path / 'aug.py'}:make", stream_above_mb=0, workers=2)
    assert isinstance(data, StreamData)
    config = TrainConfig(steps=9, batch_size=8, lr=0.1, eval_every=3)
    whole = train(_small_net(), data, config, out_dir=tmp_path / "whole", progress=False)
    train(_small_net(), data, TrainConfig(**{**config.__dict__, "steps": 4}), out_dir=tmp_path / "half", progress=False)
    resumed = train(_small_net(), data, config, out_dir=tmp_path / "half", resume=True, progress=False)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_a_streamed_test_set_that_augments_at_random_gives_one_run_with_any_workers_and_on_resume(tmp_path):
    # The test loader was not seeded: with no workers, its items drew from the generator dropout
    # draws from (the training after the first evaluation moved with --loader-workers), and its
    # persistent workers' draws started over on a resume.
    (tmp_path / "aug.py").write_text(AUGMENTING_PY)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 10))

    def data(workers):
        return open_data(f"{tmp_path / 'aug.py'}:make", stream_above_mb=0, workers=workers)

    config = TrainConfig(steps=9, batch_size=8, lr=0.1, eval_every=3)
    in_process = train(net(), data(0), config, progress=False)
    train(net(), data(1), replace(config, steps=4), out_dir=tmp_path / "half", progress=False)
    resumed = train(net(), data(1), config, out_dir=tmp_path / "half", resume=True, progress=False)
    for key, value in in_process.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    test_loss = lambda run: {row["step"]: row["test_loss"] for row in run.metrics if row["step"] % 3 == 0}  # noqa: E731
    assert test_loss(resumed) == test_loss(in_process)


SPLIT_SIZES_PY = '''
import torch


class Crops(torch.utils.data.Dataset):
    def __init__(self, n, size):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.rand(3, self.size, self.size), i % 4


def make():  # test crops at twice the training crops' size
    return Crops(16, 8), Crops(8, 16)
'''


@pytest.mark.parametrize("stream", [[], ["--stream-above", 0, "--loader-workers", 0]], ids=["held", "streamed"])
def test_a_factorys_test_images_of_another_shape_are_refused_before_training(tmp_path, capsys, stream):
    # Only training images meet the model before the run: the first evaluation, after training,
    # ended in a traceback (mat1 and mat2 shapes cannot be multiplied).
    (tmp_path / "crops.py").write_text(SPLIT_SIZES_PY)
    (tmp_path / "net.py").write_text("from torch import nn\n\nclass Net(nn.Sequential):\n"
                                     "    example_input_shape = (2, 3, 8, 8)\n\n    def __init__(self):\n"
                                     "        super().__init__(nn.Flatten(), nn.Linear(192, 4))\n")
    err = _bad(capsys, tmp_path, f"{tmp_path / 'net.py'}:Net", f"{tmp_path / 'crops.py'}:make", *stream)
    assert "crops.py:make: train[0] is an image of shape (3, 8, 8), test[0] of (3, 16, 16)" in err


READ_ONLY_PY = '''
import numpy as np
import torch


class Mapped(torch.utils.data.Dataset):
    """Items from read-only memory, as np.frombuffer and memory maps give them."""

    def __init__(self):
        self.x = np.frombuffer(bytes(range(256)) * 4 * 12, np.uint8).reshape(12, 1, 32, 32)

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return self.x[i], i % 10


def make():
    return Mapped(), Mapped()
'''


def test_a_head_made_wider_takes_new_classes_after_the_models_own(tmp_path, nets):
    # Given a wider head for a folder with a new class, the model was refused ("leave that folder
    # out"): its outputs 0 and 1 keep cat and dog, and the new class takes output 2, whatever
    # the folders' order.
    write_image_folder(tmp_path / "two", classes=("cat", "dog"))
    write_image_folder(tmp_path / "three", classes=("ant", "cat", "dog"))
    config = TrainConfig(steps=2, batch_size=3, eval_every=2, decay_every=None)
    model = train(bngraph.load(f"{nets}:Net"), str(tmp_path / "two"), config, progress=False).model
    model.head = nn.Linear(16, 2)  # as narrow as its classes: no output for ant
    with pytest.raises(UserError, match="has class folder 'ant', which is not one of the model's classes"):
        train(model, str(tmp_path / "three"), config, progress=False)
    model.head = nn.Linear(16, 3)
    data = with_model_classes(open_data(tmp_path / "three", input_shape=(2, 3, 8, 8)), model.bngraph_classes, model)
    assert data.class_names == ("cat", "dog", "ant") and data.y_train.tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1]
    again = train(model, str(tmp_path / "three"), config, progress=False)
    assert again.model.bngraph_classes == ("cat", "dog", "ant")


def test_a_factory_of_read_only_arrays_reads_without_torchs_warning(tmp_path):
    (tmp_path / "mapped.py").write_text(READ_ONLY_PY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "non-writable NumPy array" named bngraph's line
        data = open_data(f"{tmp_path / 'mapped.py'}:make")
    assert data.x_train.shape == (12, 1, 32, 32) and data.x_train[0, 0, 0, 1] == torch.tensor(1.0) / 255


def test_the_api_gives_the_trained_model_its_classes_for_saving_and_fine_tuning(tmp_path, nets):
    # bngraph.train's model knew no classes: saved, its bngraph.json had none, and fine-tuned on a
    # folder lacking class "cat", dog and emu were trained as outputs 0 and 1 (the CLI maps them).
    write_image_folder(tmp_path / "all")
    write_image_folder(tmp_path / "no-cat", classes=("dog", "emu"))
    config = TrainConfig(steps=2, batch_size=3, eval_every=2, decay_every=None)
    run = train(bngraph.load(f"{nets}:Net"), str(tmp_path / "all"), config, progress=False)
    assert run.model.bngraph_classes == ("cat", "dog", "emu")
    bngraph.save(run.model, tmp_path / "art", example_inputs=[torch.randn(2, 3, 10, 12)])
    assert bngraph.load(tmp_path / "art").bngraph_classes == ("cat", "dog", "emu")
    again = train(run.model, str(tmp_path / "no-cat"), config, progress=False)
    assert again.model.bngraph_classes == ("cat", "dog", "emu")  # dog and emu kept their outputs 1 and 2
    # Folded or inserted, it keeps them (a new graph had lost them), and a model that has only an
    # input scale (uint8 data without class names) has it recorded by save too.
    example = [torch.randn(2, 3, 10, 12)]
    assert bngraph.fold(run.model, example)[0].bngraph_classes == ("cat", "dog", "emu")
    assert bngraph.insert(run.model, example)[0].bngraph_input_scale == run.model.bngraph_input_scale
    scaled = train(bngraph.load("zoo:mnist-mlp"), str(write_npz(tmp_path / "d.npz")), config, progress=False).model
    assert getattr(scaled, "bngraph_classes", None) is None and scaled.bngraph_input_scale
    bngraph.save(scaled, tmp_path / "scaled", example_inputs=[torch.randn(2, 1, 28, 28)])
    assert bngraph.load(tmp_path / "scaled").bngraph_input_scale == scaled.bngraph_input_scale


ODD_FACTORIES_PY = '''
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

g = torch.Generator().manual_seed(0)
X, Y = torch.rand(24, 1, 28, 28, generator=g), torch.arange(24) % 10


class Sized(Dataset):
    def __init__(self, length):
        self.length = length
    def __getitem__(self, i):
        return X[i % 24], int(Y[i % 24])
    def __len__(self):
        return self.length


class Blurred(Dataset):  # items computed by a module carry a graph
    def __init__(self):
        self.blur = torch.nn.Conv2d(1, 1, 3, padding=1)
    def __getitem__(self, i):
        return self.blur(X[i][None])[0].clamp(0, 1), int(Y[i])
    def __len__(self):
        return 24


class NegativeLabel(Sized):
    def __getitem__(self, i):
        return X[i], -1


def float_length(): return Sized(24.0), Sized(8)
def raising_length():
    class Unknown(Sized):
        def __len__(self):
            raise NotImplementedError("length unknown")
    return Unknown(24), Sized(8)
def loaders(): return DataLoader(TensorDataset(X, Y)), DataLoader(TensorDataset(X, Y))
def blurred(): return Blurred(), Blurred()
def negative(): return NegativeLabel(24), Sized(8)
'''


@pytest.mark.parametrize(("factory", "stream", "says"), [
    ("float_length", False, "len() of the train Dataset"),  # tracebacks from len()
    ("raising_length", True, "len() of the train Dataset"),
    ("loaders", False, "returned DataLoaders; expected a tuple (train, test) of Datasets: return their .dataset"),
    ("negative", True, "has label -1; labels are class indices from 0"),  # "the model's None outputs"
])
def test_a_factorys_odd_datasets_are_one_line(factory, stream, says, tmp_path, capsys):
    (tmp_path / "data.py").write_text(ODD_FACTORIES_PY)
    extra = ["--stream-above", 0, "--loader-workers", 0] if stream else []
    assert says in _bad(capsys, tmp_path, "zoo:mnist-mlp", f"{tmp_path / 'data.py'}:{factory}", *extra)


@pytest.mark.parametrize("stream", [False, True], ids=["held", "streamed"])
def test_items_a_module_computed_train(stream, tmp_path, capsys):
    # Items carrying autograd's graph: numpy() refused them held, the collate refused them streamed.
    (tmp_path / "data.py").write_text(ODD_FACTORIES_PY)
    extra = ["--stream-above", 0, "--loader-workers", 1] if stream else []
    assert _train(capsys, tmp_path, "zoo:mnist-mlp", f"{tmp_path / 'data.py'}:blurred", *extra)["streamed"] == stream


@pytest.mark.timeout(120)  # opened, the pipe blocked the read for ever
def test_a_pipe_among_the_images_is_one_line_not_a_hang(tmp_path, capsys):
    root = write_image_folder(tmp_path / "pics")
    os.mkfifo(root / "train" / "cat" / "live.png")
    err = _bad(capsys, tmp_path, "zoo:mnist-mlp", root, "--image-size", "28,28")
    assert "live.png is not a regular file (a pipe or a device)" in err


def test_a_model_with_class_names_is_not_fine_tuned_on_labels_without_names(tmp_path, capsys, nets):
    # Fine-tuned on an .npz of labels 0-9, it kept the names cat, dog, emu for outputs that now meant 0, 1, 2.
    _train(capsys, tmp_path, f"{nets}:Net", write_image_folder(tmp_path / "pics"), "--image-size", "28,28")
    err = _bad(capsys, tmp_path, tmp_path / "run" / "model", write_npz(tmp_path / "d.npz", "NHWC"))
    assert "gives labels without class names, and the model's outputs are the classes cat, dog, emu" in err


def test_an_exported_model_carries_its_classes_and_input_scale_in_the_onnx_file(tmp_path, capsys, nets):
    # train's note said "give it its inputs so, in PyTorch and in ONNX", but the .onnx held neither.
    import onnx

    _train(capsys, tmp_path, f"{nets}:Net", write_image_folder(tmp_path / "pics"), "--image-size", "28,28")
    code, _, err = _cli(capsys, "export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["bngraph_classes"]) == ["cat", "dog", "emu"]
    assert meta["bngraph_input_scale"] == "uint8 pixels / 255 (values in [0, 1])"
    # Names that no longer match the logits (a new head on a loaded model) are left out, and said so.
    model = bngraph.load(tmp_path / "run" / "model")
    model.bngraph_classes = tuple(f"class {i}" for i in range(12))
    result = bngraph.export(model, [torch.rand(2, 3, 28, 28)], tmp_path / "twelve.onnx")
    assert "bngraph_classes" not in {p.key for p in onnx.load(str(tmp_path / "twelve.onnx")).metadata_props}
    assert "the model's 12 class names are not written into the file: its logits have 10 columns" in result.report.notes
