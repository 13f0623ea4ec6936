"""`bngraph recalibrate`: Algorithm 2's statistics on a trained model, and domain adaptation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import bngraph
from bngraph.cli import main
from bngraph.data import load_mnist
from bngraph.passes.recalibrate_bn import recalibrate_bn
from bngraph.training import EpochSampler
from bngraph.training.data import UINT8_SCALE
from bngraph.training.data_formats import load_data
from tests.util import overridden
from tests.mnist_like import write_learnable
from tests.test_data_formats import write_npz


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BN MLP trained on one domain, and a second domain: same classes, other contrast."""
    root = tmp_path_factory.mktemp("recalibrate")
    source = write_learnable(root / "source", n_train=600, n_test=200)
    target = write_learnable(root / "target", seed=1, n_train=600, n_test=200, contrast=0.4, offset=120)
    assert main(["train", "zoo:mnist-mlp", "--recipe", "bn-baseline", "--data", str(source), "--steps", "150",
                 "--eval-every", "50", "--quiet", "-o", str(root / "run")]) == 0
    return root / "run" / "model", source, target


def test_statistics_are_those_of_the_training_batches(tmp_path, capsys, trained):
    model_dir, source, _ = trained
    code, out, _ = _cli(capsys, "recalibrate", model_dir, "--data", source, "--batches", 7, "--batch-size", 30,
                        "--seed", 3, "-o", tmp_path / "r", "--json")
    assert code == 0
    report = json.loads(out)
    assert [row["bn"] for row in report["recalibrated"]] == ["act1_bn", "act2_bn", "act3_bn"]
    assert (report["batches"], report["batch_size"], report["seed"]) == (7, 30, 3)  # the seed picks the batches
    assert 0 <= report["test_accuracy_after"] <= 1

    # The same batches through the pass on the original model give the same statistics.
    images = load_mnist(source).as_float()[0]
    sampler = EpochSampler(len(images), 30, seed=3)
    expected = bngraph.load(model_dir)
    recalibrate_bn(expected, [(images[sampler(i)],) for i in range(7)])
    got = bngraph.load(tmp_path / "r")
    for name in ("act1_bn", "act2_bn", "act3_bn"):
        for stat in ("running_mean", "running_var"):
            mine, theirs = got.get_submodule(name), expected.get_submodule(name)
            torch.testing.assert_close(getattr(mine, stat), getattr(theirs, stat))
    history = json.loads((tmp_path / "r" / "bngraph.json").read_text())["history"]
    assert [h["command"] for h in history] == ["recipe", "train", "recalibrate"]
    # Statistics of uint8 pixels / 255: recorded as train records it (the entry had no scale).
    assert history[-1]["input_scale"] == history[1]["input_scale"] == UINT8_SCALE
    assert history[-1]["seed"] == 3
    assert any("the statistics are of uint8 pixels / 255" in note for note in report["notes"])


def test_images_on_another_scale_than_the_models_are_refused_and_the_scale_is_recorded(tmp_path, capsys, trained):
    # The same pictures as floats of 0-255 (used as stored) moved a model trained on pixels / 255
    # to inputs 255x larger without a word, and its bngraph.json still said pixels / 255.
    model_dir, source, _ = trained
    mnist = load_mnist(source)
    arrays = {"x_train": mnist.train_images.numpy(), "y_train": mnist.train_labels.numpy(),
              "x_test": mnist.test_images.numpy(), "y_test": mnist.test_labels.numpy()}
    for name, scale in (("raw", 1.0), ("unit", 1 / 255)):
        np.savez(tmp_path / f"{name}.npz", **{k: v.astype(np.float32) * scale if k.startswith("x") else v
                                             for k, v in arrays.items()})
    for argv in (["recalibrate", model_dir, "--batches", 2], ["train", model_dir, "--steps", 2, "--quiet"]):
        code, _, err = _cli(capsys, *argv, "--data", tmp_path / "raw.npz", "-o", tmp_path / "refused")
        assert code == 2 and err.count("\n") == 1, err
        assert f"raw.npz: its images are used as stored, with values from 0 to {int(mnist.train_images.max())}, but" in err
    assert not (tmp_path / "refused").exists()
    code, _, err = _cli(capsys, "recalibrate", model_dir, "--data", tmp_path / "unit.npz", "--batches", 2,
                        "-o", tmp_path / "unit")
    assert code == 0, err
    history = json.loads((tmp_path / "unit" / "bngraph.json").read_text())["history"]
    assert history[-1]["input_scale"] == "as stored (not scaled)"


def test_another_domains_images_retarget_the_model(tmp_path, capsys, trained):
    model_dir, _, target = trained
    code, out, _ = _cli(capsys, "recalibrate", model_dir, "--data", target, "--batches", 10, "-o", tmp_path / "a",
                        "--json")
    report = json.loads(out)
    assert code == 0
    # Contrast and offset move every BN input; new statistics undo it, with the same weights.
    assert report["test_accuracy_before"] < 0.95 and report["test_accuracy_after"] > 0.98


def test_a_model_without_bn_is_refused_and_nothing_written(tmp_path, capsys, trained):
    _, source, _ = trained
    code, out, err = _cli(capsys, "recalibrate", "zoo:mnist-mlp", "--data", source, "--batches", 2, "-o", tmp_path / "n",
                          "--json")
    assert code == 2 and out == ""
    assert err == "bngraph: error: nothing to recalibrate: the model has no BatchNorm\n"
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--data", "{tmp}/missing"), "does not exist"),
        (("--batches", "0"), "--batches must be at least 1"),
        (("--batch-size", "1"), "at least 2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, trained, argv, message):
    model_dir, source, _ = trained
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = _cli(capsys, *overridden(["recalibrate", model_dir, "--data", source, "-o", tmp_path / "o"], argv))
    assert code == 2 and message in err and err.count("\n") == 1


SOFTMAX_PY = '''
from torch import nn


class Deployed(nn.Module):
    """A classifier shipped with its softmax, as deployment code often is."""

    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.body(x).softmax(-1)
'''


def test_a_model_that_outputs_probabilities_recalibrates(tmp_path, capsys, trained):
    # Training refuses probabilities (cross-entropy wants logits); recalibration only needs the
    # BN inputs, and the accuracy reads the argmax.
    _, source, _ = trained
    (tmp_path / "deployed.py").write_text(SOFTMAX_PY)
    code, out, err = _cli(capsys, "recalibrate", tmp_path / "deployed.py", "--data", source, "--batches", 2,
                          "-o", tmp_path / "r", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [row["bn"] for row in report["recalibrated"]] == ["body.2"]
    assert json.loads((tmp_path / "r" / "bngraph.json").read_text())["history"][-1]["data_format"] == "mnist-idx"
    # The loss is -log p of each label: cross-entropy on the probabilities took a second softmax.
    data = load_data(source, input_shape=(1, 784))
    with torch.no_grad():
        p = bngraph.load(tmp_path / "r").eval()(data.x_test)
    nll = -p.double().gather(1, data.y_test[:, None]).log().mean().item()
    assert report["test_loss_after"] == pytest.approx(nll, rel=1e-5)


def test_a_test_label_out_of_range_names_y_test_and_not_training(tmp_path, capsys):
    (tmp_path / "deployed.py").write_text(SOFTMAX_PY)
    labels = np.zeros(12, np.int64)
    labels[3] = 11
    path = write_npz(tmp_path / "d.npz", y_test=labels)
    code, _, err = _cli(capsys, "recalibrate", tmp_path / "deployed.py", "--data", path, "--batches", 2,
                        "-o", tmp_path / "r")
    assert code == 2 and f"{path} (y_test): label 11 is out of range for the model's 10 outputs" in err
    assert "training" not in err and err.count("\n") == 1


CONV_PY = '''
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, CHANNELS, 8, 8)

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(CHANNELS, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(256, 3))

    def forward(self, x):
        return self.body(x)
'''


@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_folder_is_read_at_the_models_channels_and_size_and_its_input_kept(tmp_path, capsys, channels):
    # 16x16 RGB files for a model taking (C, 8, 8): recalibrate must see what train saw (the
    # statistics of 16x16 images are another model's), and the artifact still takes 8x8.
    from tests.test_data_formats import write_quadrant_folder

    from bngraph.training.data_formats import open_data

    root = write_quadrant_folder(tmp_path / "q", ("cat", "dog", "fox"))
    for png in root.rglob("*.png"):
        Image.open(png).resize((16, 16)).save(png)
    (tmp_path / "net.py").write_text(CONV_PY.replace("CHANNELS", str(channels)))
    code, _, err = _cli(capsys, "recalibrate", f"{tmp_path / 'net.py'}:Net", "--data", root, "--batches", 3,
                        "--batch-size", 8, "-o", tmp_path / "r")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "bngraph.json").read_text())["input_shapes"] == [[2, channels, 8, 8]]
    images = open_data(root, input_shape=(2, channels, 8, 8)).x_train
    sampler = EpochSampler(len(images), 8, seed=0)
    expected = bngraph.load(f"{tmp_path / 'net.py'}:Net")
    recalibrate_bn(expected, [(images[sampler(i)],) for i in range(3)])
    torch.testing.assert_close(bngraph.load(tmp_path / "r").get_submodule("body.1").running_mean,
                               expected.get_submodule("body.1").running_mean)


def test_data_the_model_takes_at_another_size_does_not_redeclare_its_input(tmp_path, capsys):
    # An .npz is used as it is: 28x28 images through a pooled model declaring 8x8.
    (tmp_path / "net.py").write_text(CONV_PY.replace("CHANNELS", "1").replace("nn.Flatten()", "nn.AdaptiveAvgPool2d(8), nn.Flatten()")
                                       .replace("Linear(256, 3)", "Linear(256, 10)"))
    code, _, err = _cli(capsys, "recalibrate", f"{tmp_path / 'net.py'}:Net", "--data", write_npz(tmp_path / "d.npz"),
                        "--batches", 2, "--batch-size", 8, "-o", tmp_path / "r")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "bngraph.json").read_text())["input_shapes"] == [[2, 1, 8, 8]]


@pytest.mark.parametrize("flag", ["--stream-above", "--loader-workers"])
def test_streaming_options_are_not_offered_where_they_would_be_ignored(tmp_path, capsys, flag):
    # recalibrate holds its data whole: a streaming option accepted would do nothing.
    with pytest.raises(SystemExit) as stop:
        main(["recalibrate", "zoo:mnist-mlp", flag, "0", "-o", str(tmp_path / "r")])
    assert stop.value.code == 2 and f"unrecognized arguments: {flag} 0" in capsys.readouterr().err
