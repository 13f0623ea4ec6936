"""`bngraph reproduce`: summaries from the curves, the worker layout, outputs, errors, real MNIST."""

import json

import numpy as np
import pytest
import torch

import bngraph
from bngraph.cli import main
from bngraph.data import load_mnist
from bngraph.reproduce.mnist import MnistConfig, _batches, mnist_summary, mnist_table, reproduce_mnist, write_mnist
from bngraph.reproduce.tables import first_step_reaching
from bngraph.training import EpochSampler, TensorData
from bngraph.training.fused_mlp import prefix_widths
from tests.conftest import REAL_MNIST
from tests.mnist_like import write_learnable
from tests.test_data_formats import write_image_folder, write_npz


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return write_learnable(tmp_path_factory.mktemp("data") / "mnist", n_train=600, n_test=200)


@pytest.fixture(scope="module")
def data(mnist_dir):
    return TensorData.from_dataset(load_mnist(mnist_dir))


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_first_step_reaching_and_speedup_follow_the_definition(data):
    assert first_step_reaching([10, 20, 30], [0.5, 0.7, 0.9], 0.7) == 20
    assert first_step_reaching([10, 20], [0.5, 0.6], 0.7) is None
    run = reproduce_mnist(data, MnistConfig(steps=4, eval_every=1, batch_size=20, workers=1), progress=False)
    run.steps = [100, 200, 300, 400]
    run.accuracy = {"without BN": np.array([[0.5, 0.8, 0.9, 0.85]]), "with BN": np.array([[0.9, 0.95, 0.9, 0.97]])}
    summary = mnist_summary(run)
    # The plain net's best is 0.9 at step 300; the BN net gets there at step 100: 3x.
    assert (summary["target_accuracy"], summary["steps_without_bn"], summary["steps_with_bn"]) == (0.9, 300, 100)
    assert summary["speedup"] == 3.0 and summary["bn_ahead_at_every_evaluation"] is False
    assert summary["evaluations_bn_ahead"] == 3


def test_the_mnist_table_says_its_evaluations_ahead_are_counted_in_every_seed(data):
    # "ahead at 1 of 2 evaluations" read as a figure of the seed-mean curves, on which the BN net
    # was ahead at both.
    run = reproduce_mnist(data, MnistConfig(steps=2, eval_every=1, batch_size=20, workers=1, seeds=2), progress=False)
    run.steps = [100, 200]
    run.accuracy = {"without BN": np.array([[0.5, 0.5], [0.5, 0.5]]), "with BN": np.array([[0.9, 0.9], [0.9, 0.4]])}
    summary = mnist_summary(run)
    assert summary["evaluations_bn_ahead"] == 1  # at step 100 in both seeds; at 200 in one
    assert "The BN net is ahead at 1 of 2 evaluations in each of the 2 seeds." in mnist_table(summary)
    # The table's figures are the seed-mean curves': each seed's speed-up stands beside them
    # (--help called them means over the seeds, which they are not).
    assert f"x on the seed-mean curves (each seed's: {summary['speedup_per_seed'][0]:.2f}x, " in mnist_table(summary)


def test_mnist_writes_figure_summary_table_and_the_trained_nets(tmp_path, data):
    cfg = MnistConfig(steps=60, eval_every=20, batch_size=20, lr=0.1, workers=1)
    run = reproduce_mnist(data, cfg, progress=False)
    write_mnist(run, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == [20, 40, 60]
    for net in ("without BN", "with BN"):
        assert len(summary["nets"][net]["test_accuracy"]) == 3
        assert summary["nets"][net]["best_test_accuracy"] == max(summary["nets"][net]["test_accuracy"])
    assert "| with BN |" in (tmp_path / "out" / "table.md").read_text()
    assert (tmp_path / "out" / "fig1.png").stat().st_size > 10_000
    bn_net = bngraph.load(tmp_path / "out" / "models" / "mnist-mlp-bn")
    [entry] = json.loads((tmp_path / "out" / "models" / "mnist-mlp-bn" / "bngraph.json").read_text())["history"]
    assert (entry["data_format"], entry["input_scale"]) == ("mnist-idx", "uint8 pixels / 255 (values in [0, 1])")
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn_net.modules()) == 3
    # The saved net is the trained one: its accuracy is the last point of its curve (to one
    # example: on CUDA the curve came from the GPU's kernels, where a near tie may flip).
    with torch.no_grad():
        accuracy = (bn_net.eval()(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert accuracy == pytest.approx(summary["nets"]["with BN"]["test_accuracy"][-1], abs=1.5 / len(data.y_test))


def test_the_report_of_several_seeds_says_what_its_figures_are(tmp_path, capsys, mnist_dir):
    # table.md said it; the command's own report gave one speed-up without a word about seeds.
    code, out, err = _cli(capsys, "reproduce", "mnist", "--data", mnist_dir, "--steps", 4, "--eval-every", 2,
                          "--batch-size", 20, "--seeds", 2, "--workers", 1, "--quiet", "--json", "-o", tmp_path / "o")
    assert code == 0, err
    report = json.loads(out)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert report["speedup_per_seed"] == summary["speedup_per_seed"] and len(report["speedup_per_seed"]) == 2
    assert "those of the accuracy curves averaged over the 2 seeds" in " ".join(report["notes"])


def test_batches_of_one_seed_are_the_samplers_with_their_widths(data):
    # One seed: labels and batch widths are gathered a whole epoch at a time (600 images in
    # batches of 20: 30 steps an epoch, so 70 steps cross two epoch boundaries).
    cfg = MnistConfig(steps=70, batch_size=20)
    x = data.x_train.flatten(1)
    widths = prefix_widths(x)
    sampler = EpochSampler(len(x), 20, seed=0)
    for step, (xb, yb, width) in enumerate(_batches([0, 0], x, data.y_train, widths, cfg)):
        index = sampler(step)
        assert torch.equal(xb, x[index]) and torch.equal(yb, data.y_train[index])
        assert width == int(widths[index].max())
    assert step == 69


@pytest.mark.parametrize("seeds", [1, 2])
def test_worker_processes_train_the_same_nets_as_one_process(data, seeds):
    # The CPU: on a GPU every net trains in one process (workers=1). One seed: the worker also
    # evaluates the BN net, on states this process sends.
    cfg = MnistConfig(steps=30, eval_every=10, batch_size=20, seeds=seeds, lr=0.2, device="cpu")
    one = reproduce_mnist(data, MnistConfig(**{**cfg.__dict__, "workers": 1}), progress=False)
    two = reproduce_mnist(data, MnistConfig(**{**cfg.__dict__, "workers": 2}), progress=False)
    assert two.workers == 2 and one.steps == two.steps == [10, 20, 30]
    for net in ("without BN", "with BN"):
        np.testing.assert_allclose(one.accuracy[net], two.accuracy[net], atol=1 / len(data.y_test))
        assert one.accuracy[net].shape == (seeds, 3)  # seeds x evaluations
        for a, b in zip(one.models[net], two.models[net]):
            for key, value in a.state_dict().items():
                torch.testing.assert_close(value.float(), b.state_dict()[key].float(), atol=1e-4, rtol=1e-4)
    if seeds == 2:  # seeds differ: other initial weights and batch orders
        assert not torch.equal(one.models["with BN"][0].fc1.weight, one.models["with BN"][1].fc1.weight)


@pytest.mark.parametrize(
    "argv, message",
    [
        (("mnist", "--steps", "0"), "--steps must be at least 1"),
        (("mnist", "--seeds", "0"), "--seeds must be at least 1"),
        (("mnist", "--workers", "-1"), "--workers must be at least 1"),
        (("mnist", "--init-std", "small"), "--init-std 'small'"),
        # NaN statistics, then a matplotlib traceback (the API returned a NaN table).
        (("mnist", "--batch-size", "1"), "--batch-size must be at least 2 (a BatchNorm's variance needs two values)"),
        (("mnist", "--init-std", "inf"), "--init-std must be a positive number that float32 weights can hold"),
        (("mnist", "--init-std", "1e39"), "(below 4e+37), not 1e+39"),
        (("mnist", "--lr", "inf"), "--lr must be a positive number, not inf"),
        (("mnist", "--data", "{tmp}/missing"), "does not exist"),
        (("inception", "--variants", "inception,bn-x7"), "no recipe 'bn-x7'"),
        (("inception", "--steps", "-1"), "--steps must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, mnist_dir, argv, message):
    experiment, *rest = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    data = [] if "--data" in rest else ["--data", mnist_dir]
    code, _, err = _cli(capsys, "reproduce", experiment, *data, *rest, "--quiet", "-o", tmp_path / "o")
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("after_s", [1.0, 2.5])
def test_ctrl_c_while_the_workers_start_is_one_line(tmp_path, mnist_dir, after_s):
    # A terminal's Ctrl-C reaches the whole process group: a worker still importing torch or
    # reading its job printed its KeyboardInterrupt traceback beside bngraph's one line.
    import os
    import signal
    import subprocess
    import sys
    import time

    run = subprocess.Popen([sys.executable, "-m", "bngraph", "reproduce", "mnist", "--data", str(mnist_dir), "--steps",
                            "20000", "--workers", "2", "--quiet", "-o", str(tmp_path / "out")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(after_s)
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and err == "bngraph: interrupted\n", err
    assert not (tmp_path / "out").exists()


def test_users_data_is_read_as_the_experiments_nets_take_it_or_refused_in_one_line(tmp_path, capsys):
    # An RGB image folder of another size is decoded to the nets' 1x28x28; an .npz of RGB 28x28
    # arrays (used as it is) is refused before any training, not with a traceback.
    pets = write_image_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=6, sizes=((10, 12),))
    for experiment, extra in (("mnist", ()), ("inception", ("--variants", "inception,bn-baseline"))):
        code, _, err = _cli(capsys, "reproduce", experiment, "--data", pets, "--steps", 2, "--eval-every", 2,
                            "--batch-size", 4, *extra, "--quiet", "-o", tmp_path / experiment)
        assert code == 0, err
        rgb = write_npz(tmp_path / "rgb.npz", "NHWC")
        code, _, err = _cli(capsys, "reproduce", experiment, "--data", rgb, "--steps", 2, "--batch-size", 4, *extra,
                            "--quiet", "-o", tmp_path / f"{experiment}-rgb")
        assert code == 2 and err.count("\n") == 1 and "neither axis 1 nor axis 3 is the model's 1 channels" in err
        assert not (tmp_path / f"{experiment}-rgb").exists()
    wide = np.zeros((12, 32, 32), np.uint8)  # gray, but 32x32: the MLP takes 784 pixels
    big = write_npz(tmp_path / "big.npz", x_train=np.zeros((40, 32, 32), np.uint8), x_test=wide)
    code, _, err = _cli(capsys, "reproduce", "mnist", "--data", big, "--steps", 2, "--quiet", "-o", tmp_path / "big")
    assert code == 2 and err.count("\n") == 1 and "the model cannot take big images (1x32x32)" in err, err
    assert not (tmp_path / "big").exists()


def test_inception_variants_table_and_plot(tmp_path, capsys, mnist_dir):
    code, out, _ = _cli(capsys, "reproduce", "inception", "--data", mnist_dir, "--steps", 4, "--eval-every", 2,
                        "--variants", "inception,bn-x30,inception-sigmoid", "--test-examples", 100_000,
                        "--quiet", "-o", tmp_path / "inc", "--json")
    assert code == 0
    rows = {row["variant"]: row for row in json.loads(out)["results"]}
    assert set(rows) == {"Inception", "BN-x30", "Inception-Sigmoid (no BN)"}
    assert rows["BN-x30"]["lr"] == pytest.approx(0.045) and rows["BN-x30"]["batchnorms"] > 60
    assert rows["Inception"]["batchnorms"] == 0
    summary = json.loads((tmp_path / "inc" / "summary.json").read_text())
    assert summary["variants"]["inception"]["steps"] == [2, 4]
    assert summary["variants"]["inception"]["steps_to_reference"] is not None  # it reaches its own best
    table = (tmp_path / "inc" / "table.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 4 and "| BN-x30 |" in table
    # The test images measured, not those asked for (the table said 100000 of a data set's 200).
    n_test = len(load_mnist(mnist_dir).test_images)
    assert summary["test_images"] == n_test and f"accuracy on {n_test} test images" in table
    assert (tmp_path / "inc" / "accuracy.png").stat().st_size > 10_000


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="no ../shared/data/mnist on this machine")
def test_real_mnist_10k_steps_bn_ahead_at_every_evaluation():
    data = TensorData.from_dataset(load_mnist(REAL_MNIST))
    summary = reproduce_mnist(data, MnistConfig(steps=10_000), progress=False).summary
    assert summary["bn_ahead_at_every_evaluation"], summary["nets"]
    assert summary["speedup"] > 2
    assert summary["nets"]["with BN"]["best_test_accuracy"] > 0.97


@pytest.mark.parametrize("flag", ["--stream-above", "--loader-workers"])
def test_streaming_options_are_not_offered_where_they_would_be_ignored(tmp_path, capsys, flag):
    # The experiments hold their data whole: a streaming option accepted would do nothing.
    with pytest.raises(SystemExit) as stop:
        main(["reproduce", "mnist", flag, "0", "-o", str(tmp_path / "r")])
    assert stop.value.code == 2 and f"unrecognized arguments: {flag} 0" in capsys.readouterr().err


def test_each_seed_draws_its_own_initial_weights():
    # `--seed`'s help says "initial weights and batch order", and `--seeds N` "independent
    # runs": the zoo re-seeded with 0 inside, and every seed started from one set of weights.
    from bngraph.load import load_model
    from bngraph.reproduce.mnist import mnist_nets

    (plain0, bn0), (plain5, bn5) = mnist_nets(0, 0.01), mnist_nets(5, 0.01)
    assert not torch.equal(plain0.fc1.weight, plain5.fc1.weight)
    assert torch.equal(plain0.fc1.weight, bn0.fc1.weight) and torch.equal(plain5.fc1.weight, bn5.fc1.weight)
    assert torch.equal(mnist_nets(5, 0.01)[0].fc1.weight, plain5.fc1.weight)  # a seed names its weights
    # `train zoo:NAME --seed S` likewise: the seed's weights, the same at every load.
    first, second, again = (load_model("zoo:mnist-mlp", seed=s).module for s in (1, 2, 1))
    assert not torch.equal(first.fc1.weight, second.fc1.weight) and torch.equal(first.fc1.weight, again.fc1.weight)
