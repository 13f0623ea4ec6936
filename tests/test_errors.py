"""Every way a command ends on the user's input: one line on stderr, the right exit code, no
traceback, nothing written; and --json prints JSON alone on stdout, numbers as numbers."""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bngraph
from bngraph.cli import main
from bngraph.errors import ModelRaised, running_user_model
from bngraph.passes.base import PassResult, graph_pass, run_passes
from tests.conftest import REPO
from tests.mnist_like import write_learnable
from tests.util import randomize_bn

ERROR_MODELS = REPO / "tests" / "error_models.py"


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return write_learnable(tmp_path_factory.mktemp("data") / "mnist", n_train=600, n_test=200)


def _cli(capfd, *argv):
    # capfd, not capsys: what torch prints at the C++ level or through its log handlers counts too.
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def _one_line(err: str, prefix: str = "bngraph: error: ") -> str:
    assert err.count("\n") == 1 and err.startswith(prefix), err
    assert "Traceback" not in err and "\x1b[" not in err
    return err


def _line_of(marker: str) -> int:
    lines = ERROR_MODELS.read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if f"# LINE: {marker}" in line)


# 1. A forward that raises is the model's doing: its file and line, in every command.

RAISES = {
    "insert (traced)": ("ForwardRaises", ["insert", "{model}", "-o", "{tmp}/out"]),
    "insert (fallback)": ("UntraceableForwardRaises", ["insert", "{model}", "-o", "{tmp}/out"]),
    "fold": ("ForwardRaises", ["fold", "{model}", "-o", "{tmp}/out"]),
    "fold (untraceable)": ("UntraceableForwardRaises", ["fold", "{model}", "-o", "{tmp}/out"]),
    "export": ("ForwardRaises", ["export", "{model}", "-o", "{tmp}/out.onnx"]),
    "verify": ("ForwardRaises", ["verify", "{model}", "{model}"]),
    "graph": ("UntraceableForwardRaises", ["graph", "{model}", "-o", "{tmp}/out.svg"]),
    "train": ("ForwardRaises", ["train", "{model}", "--data", "{data}", "--steps", "2", "--quiet", "-o", "{tmp}/out"]),
}


@pytest.mark.parametrize("case", RAISES, ids=list(RAISES))
def test_a_forward_that_raises_is_named_at_its_line(case, tmp_path, capfd, mnist_dir):
    symbol, argv = RAISES[case]
    model = f"{ERROR_MODELS}:{symbol}"
    code, out, err = _cli(capfd, *(a.format(model=model, tmp=tmp_path, data=mnist_dir) for a in argv))
    assert code == 2
    _one_line(err)
    assert f"raised at {ERROR_MODELS}:{_line_of(symbol)}" in err
    # The user's code failed, not a bngraph pass (paths aside: a checkout may sit in a folder named so).
    assert "pass" not in err.replace(str(ERROR_MODELS), "").replace(str(tmp_path), "")
    assert not any(tmp_path.iterdir())


def test_run_passes_tells_a_users_forward_from_a_bug_in_a_pass():
    class Raises(nn.Module):
        def forward(self, x):
            return x @ torch.ones(3, 3)

    @graph_pass(in_place=True)
    def runs_the_model(model):  # a pass that runs the user's forward, as the fallback insert does
        with running_user_model():
            model(torch.ones(2, 4))
        return PassResult(model)

    @graph_pass(in_place=True)
    def has_a_bug(model):
        return PassResult([][0])

    with pytest.raises(ModelRaised, match=rf"raised at {re.escape(__file__)}:\d+ \(return x @ torch.ones"):
        run_passes(Raises(), [runs_the_model])
    with pytest.raises(IndexError) as bug:  # a bug keeps its type and traceback, and names its pass
        run_passes(Raises(), [has_a_bug])
    assert any("raised in pass 'has_a_bug'" in note for note in bug.value.__notes__)


def test_the_fallback_pass_names_the_users_line_too():
    from functools import partial

    from bngraph.load import load_model
    from bngraph.passes.wrap_activation_modules import wrap_activation_modules

    loaded = load_model(f"{ERROR_MODELS}:UntraceableForwardRaises")
    wrap = partial(wrap_activation_modules, example_inputs=loaded.example_inputs())
    with pytest.raises(ModelRaised, match=rf"^the model raised at {re.escape(str(ERROR_MODELS))}:"
                                          rf"{_line_of('UntraceableForwardRaises')} "):
        run_passes(loaded.module, [wrap])


# 2. --weights that are no state dict, or another model's.


def _weights(tmp_path, name: str):
    from bngraph.zoo import create_model

    path = tmp_path / f"{name}.pt"
    if name == "tensor":
        torch.save(torch.randn(3), path)
    elif name == "list":
        torch.save([torch.randn(3)], path)
    elif name == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif name == "truncated":  # a copy cut short
        torch.save(create_model("mnist-mlp").state_dict(), path)
        path.write_bytes(path.read_bytes()[:4000])
    elif name == "text":  # a log saved under the checkpoint's name
        path.write_text("epoch 3: loss 0.12\n")
    elif name == "empty":
        path.write_bytes(b"")
    elif name == "folder":  # an artifact or run folder, where its weights.pt was meant
        path.mkdir()
    elif name == "pickle":
        path.write_bytes(pickle.dumps(Counter("a pickle of something else")))
    elif name == "not_tensors":
        torch.save({"fc1.weight": 1.0, "steps": "many"}, path)
    elif name == "other_model":
        torch.save(nn.Sequential(nn.Linear(784, 100), nn.Sigmoid(), nn.Linear(100, 10)).state_dict(), path)
    elif name == "shapes":
        state = create_model("mnist-mlp").state_dict()
        state["fc1.weight"] = torch.randn(5, 784)
        del state["fc3.bias"]
        torch.save({"state_dict": state, "step": 3}, path)  # a training checkpoint holding one
    return path


WEIGHTS = {
    "tensor": "hold a Tensor, not a state dict",
    "list": "hold a list, not a state dict",
    "garbage": "not a state dict saved with torch.save",
    "pickle": "not a state dict saved with torch.save",
    "truncated": "not a PyTorch state dict file torch can read (cut short, or not saved with torch.save; ",
    "text": "not a PyTorch state dict file torch can read",
    "empty": "not a PyTorch state dict file torch can read",
    "folder": "is a folder, not a file",
    "not_tensors": "not a state dict: 2 keys: fc1.weight, steps are not tensors",
    "other_model": "are for another model: missing 8 keys: fc1.weight, fc1.bias, fc2.weight, ...; "
    "unexpected 4 keys: 0.weight, 0.bias, 2.weight, ...",
    "shapes": "are for another model: missing 1 key: fc3.bias; shapes differ (file vs model) for 1 key: "
    "fc1.weight (5, 784) vs (100, 784)",
}


@pytest.mark.parametrize("name", WEIGHTS)
def test_weights_that_do_not_fit_say_why_in_one_line(name, tmp_path, capfd):
    weights = _weights(tmp_path, name)
    code, _, err = _cli(capfd, "insert", "zoo:mnist-mlp", "--weights", weights, "-o", tmp_path / "out")
    assert code == 2
    assert WEIGHTS[name] in _one_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, says", [("x.onnx", "x.onnx is a folder, not an ONNX file"),
                                         ("m.py", "model file {tmp}/m.py is a folder, not a Python file")])
def test_a_folder_named_as_a_model_file_is_called_a_folder(spec, says, tmp_path, capfd):
    # "ONNX file x.onnx does not exist" sent the user looking for a path that is there.
    (tmp_path / spec).mkdir()
    code, _, err = _cli(capfd, "verify", tmp_path / spec, "zoo:mnist-mlp")
    assert code == 2 and says.format(tmp=tmp_path) in _one_line(err)


@pytest.mark.parametrize("what, argv", [
    ("weights file", ["insert", "zoo:mnist-mlp", "--weights", "{fifo}.pt"]),
    ("model file", ["insert", "{fifo}.py:Net"]),
    ("ONNX file", ["fold", "{fifo}.onnx"]),
    ("data", ["train", "zoo:mnist-mlp", "--data", "{fifo}", "--steps", "1"]),
    ("data factory file", ["train", "zoo:mnist-mlp", "--data", "{fifo}.py:make", "--steps", "1"]),
])
def test_a_pipe_named_as_an_input_is_called_one(what, argv, tmp_path, capfd):
    # `--weights /dev/stdin`, `<(...)`: "does not exist" sent the user looking for a path that is there.
    for suffix in (".pt", ".py", ".onnx", ""):
        os.mkfifo(tmp_path / f"fifo{suffix}")
    argv = [a.format(fifo=tmp_path / "fifo") for a in argv]
    code, _, err = _cli(capfd, *argv, "-o", tmp_path / "out")
    assert code == 2 and f"{what} {tmp_path}/fifo" in err and "is not a regular file" in _one_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "model."])
def test_weights_saved_through_a_wrapper_load_when_the_rest_of_each_key_is_the_models(prefix, tmp_path, capfd):
    # DataParallel and DDP save `module.`, torch.compile `_orig_mod.`, a Lightning module `model.`
    from bngraph.zoo import create_model

    torch.manual_seed(3)
    state = create_model("mnist-mlp").state_dict()
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}, "epoch": 7}, path)
    code, _, err = _cli(capfd, "insert", "zoo:mnist-mlp", "--weights", path, "-o", tmp_path / "out")
    assert code == 0, err
    import bngraph

    loaded = bngraph.load(tmp_path / "out").state_dict()
    torch.testing.assert_close(loaded["fc1.weight"], state["fc1.weight"])
    # One key short: the prefix cannot be proven, so nothing is guessed.
    del state["fc3.bias"]
    torch.save({prefix + k: v for k, v in state.items()}, path)
    code, _, err = _cli(capfd, "insert", "zoo:mnist-mlp", "--weights", path, "-o", tmp_path / "out2")
    assert code == 2 and f"unexpected 7 keys: {prefix}fc1.weight" in _one_line(err)


def test_weights_without_the_batchnorms_counters_load_as_torch_loads_them(tmp_path, capfd):
    # A state dict from before torch 0.4.1 (or trimmed by hand) has no num_batches_tracked;
    # torch's load_state_dict(strict=True) fills it in, and so does --weights.
    from bngraph.zoo import create_model

    torch.manual_seed(3)
    model = create_model("inception-small")
    state = {k: v for k, v in randomize_bn(model).state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    code, _, err = _cli(capfd, "fold", "zoo:inception-small", "--weights", path, "-o", tmp_path / "out")
    assert code == 0, err
    code, out, err = _cli(capfd, "verify", "zoo:inception-small", tmp_path / "out", "--weights", path)
    assert code == 0, out + err


def test_weights_whose_counters_were_popped_load_too(tmp_path, capfd):
    # Popped from the state dict, the counters left its metadata (version 2) saying they were
    # there, so torch did not fill them in: refused as "Error(s) in loading state_dict", no key named.
    source = tmp_path / "net.py"
    source.write_text("from torch import nn\n"
                      "class Net(nn.Module):\n"
                      "    example_input_shape = (2, 3, 8, 8)\n"
                      "    def __init__(self):\n"
                      "        super().__init__()\n"
                      "        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)\n"
                      "    def forward(self, x):\n"
                      "        return self.bn(self.conv(x))\n")
    model = bngraph.load(f"{source}:Net")
    state = randomize_bn(model).state_dict()
    state.pop("bn.num_batches_tracked")
    torch.save(state, tmp_path / "w.pt")
    code, _, err = _cli(capfd, "fold", f"{source}:Net", "--weights", tmp_path / "w.pt", "-o", tmp_path / "out")
    assert code == 0, err
    folded = bngraph.load(tmp_path / "out")
    x = torch.randn(5, 3, 8, 8) * 3 + 1
    with torch.no_grad():
        assert torch.allclose(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_weights_of_a_model_with_lazy_layers_load_after_the_layers_take_their_shapes(tmp_path, capfd):
    # The user ran the model once (materializing LazyConv2d) and saved its state dict.
    source = tmp_path / "lazy.py"
    source.write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    example_input_shape = (2, 3, 8, 8)\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.LazyConv2d(8, 3)\n"
        "        self.bn = nn.BatchNorm2d(8)\n"
        "    def forward(self, x):\n"
        "        return self.bn(self.conv(x))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        from lazy import Net
    finally:
        sys.path.remove(str(tmp_path))
    model = Net()
    model(torch.randn(2, 3, 8, 8))
    path = tmp_path / "lazy.pt"
    torch.save(randomize_bn(model).state_dict(), path)
    code, _, err = _cli(capfd, "fold", f"{source}:Net", "--weights", path, "-o", tmp_path / "out")
    assert code == 0, err
    code, out, err = _cli(capfd, "verify", f"{source}:Net", tmp_path / "out", "--weights", path)
    assert code == 0, out + err


# 3. A failed ONNX export: one line, and the exporter's whole log in the file it names.


def test_a_failed_export_is_one_line_and_its_log_is_kept(tmp_path, capfd):
    code, out, err = _cli(capfd, "export", f"{ERROR_MODELS}:DataDependentSteps", "-o", tmp_path / "m.onnx")
    assert code == 2 and out == ""
    _one_line(err)
    assert "torch.onnx.export could not export DataDependentSteps" in err
    log = re.search(r"the exporter's full log: (\S+)\)$", err.strip()).group(1)
    text = open(log).read()
    assert "Traceback" in text and "\x1b[" not in text  # the whole story, without colour codes
    assert not (tmp_path / "m.onnx").exists()


def test_an_export_error_caused_by_an_interrupt_is_an_interruption(tmp_path, capfd, monkeypatch):
    # A signal that lands inside torch's exporter can come out as the exporter's own error,
    # chained to the KeyboardInterrupt: it is a stop (exit 130), not a failed export with a log.
    def exporter_stopped(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise RuntimeError("Failed to export the model with torch.export") from stop

    monkeypatch.setattr(torch.onnx, "export", exporter_stopped)
    logs_before = set(Path(tempfile.gettempdir()).glob("bngraph-export-*"))
    code, out, err = _cli(capfd, "export", "zoo:mnist-mlp", "-o", tmp_path / "m.onnx")
    assert (code, err) == (130, "bngraph: interrupted\n")
    assert set(Path(tempfile.gettempdir()).glob("bngraph-export-*")) == logs_before
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["forward", "module level"])
def test_a_model_that_calls_sys_exit_is_one_line_and_exit_2(where, tmp_path, capfd):
    # A script's habit (`sys.exit(main())` at the bottom, a guard that exits): SystemExit is no
    # Exception, and bngraph ended with the model's exit code and not a word.
    body = "        sys.exit(3)\n" if where == "forward" else "        return self.fc(x)\n\n\nsys.exit(3)\n"
    (tmp_path / "model.py").write_text(
        "import sys\nfrom torch import nn\n\n\nclass Net(nn.Module):\n    example_input_shape = (2, 4)\n\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(4, 4)\n\n"
        "    def forward(self, x):\n" + body
    )
    code, out, err = _cli(capfd, "insert", tmp_path / "model.py", "-o", tmp_path / "out")
    assert (code, out) == (2, "")
    assert _one_line(err).startswith(f"bngraph: error: the model's code called sys.exit(3) at {tmp_path / 'model.py'}:")
    assert not (tmp_path / "out").exists()


def test_zero_epochs_are_refused_not_read_as_the_default(tmp_path, capfd, mnist_dir):
    code, _, err = _cli(capfd, "train", "zoo:mnist-mlp", "--data", mnist_dir, "--epochs", 0, "-o", tmp_path / "run")
    assert code == 2 and _one_line(err) == "bngraph: error: --epochs must be positive, not 0.0\n"
    assert not (tmp_path / "run").exists()


# 4. Nothing to recalibrate.


def test_recalibrating_a_model_without_batchnorm_is_refused(tmp_path, capfd, mnist_dir):
    code, out, err = _cli(capfd, "recalibrate", f"{ERROR_MODELS}:NoBatchNorm", "--data", mnist_dir, "-o", tmp_path / "o")
    assert code == 2 and out == ""
    assert _one_line(err) == "bngraph: error: nothing to recalibrate: the model has no BatchNorm\n"
    assert not (tmp_path / "o").exists()


# 5. A loss that is not finite stops the run: a failed check, exit 1.


def test_training_that_diverges_stops_with_exit_1(tmp_path, capfd, mnist_dir):
    code, _, err = _cli(capfd, "train", "zoo:mnist-mlp", "--data", mnist_dir, "--steps", 200, "--eval-every", 100,
                        "--lr", 1e38, "--quiet", "-o", tmp_path / "run")
    assert code == 1
    _one_line(err, "bngraph: check failed: ")
    assert re.search(r"training diverged: the training loss is nan \(mean over steps 1-25\) at --lr 1e\+38; lower --lr",
                     err)
    assert "nothing of this run is kept" in err and not (tmp_path / "run").exists()


def test_a_run_that_diverges_after_a_checkpoint_keeps_it_whole(tmp_path, capfd):
    run = tmp_path / "run"
    code, _, err = _cli(capfd, *_tiny_run(tmp_path), "--steps", 40, "--eval-every", 5, "--lr", 100)
    assert code == 1
    kept = re.search(r"keeps the checkpoint of step (\d+), from before", _one_line(err, "bngraph: check failed: "))
    step = int(kept.group(1))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == step  # resumable, no NaN in it
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step and all(row["train_loss"] < float("inf") for row in rows)


TINY_CONV_NET = """
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 1, 6, 6)

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))
"""


def _tiny_run(tmp_path, *, scale: float = 1.0):
    (tmp_path / "tiny.py").write_text(TINY_CONV_NET)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 77)
    x = ((rng.random((77, 6, 6)) + y[:, None, None] * 0.3) * scale).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    return ["train", f"{tmp_path / 'tiny.py'}:Net", "--data", tmp_path / "d.npz", "--batch-size", 8, "--quiet",
            "-o", tmp_path / "run"]


@pytest.mark.parametrize("steps, lr, says", [
    (1, 1e30, "the test loss is nan after step 1"),  # the one step blew up: no training loss looked at since
    (8, 1e3, "the test loss is {} after step 8"),
])
def test_a_run_whose_test_loss_is_not_finite_is_not_a_success(tmp_path, capfd, steps, lr, says):
    # It exited 0, wrote the model, and reported the accuracy of always guessing class 0.
    code, _, err = _cli(capfd, *_tiny_run(tmp_path), "--steps", steps, "--eval-every", 4, "--lr", lr)
    line = _one_line(err, "bngraph: check failed: training diverged: ")
    assert code == 1 and any(says.format(value) in line for value in ("nan", "inf"))
    assert not (tmp_path / "run" / "model").exists()


def test_a_checkpoint_between_the_looks_at_the_loss_never_holds_what_diverged(tmp_path, capfd):
    # The loss is looked at every 25 steps and at evaluations; a checkpoint written every 2 steps
    # held NaN weights and was named "from before" the divergence.
    code, _, err = _cli(capfd, *_tiny_run(tmp_path), "--steps", 50, "--eval-every", 50, "--checkpoint-every", 2,
                        "--lr", 1e12)
    assert code == 1
    kept = re.search(r"keeps the checkpoint of step (\d+), from before", _one_line(err, "bngraph: check failed: "))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == int(kept.group(1))
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point())


def test_inputs_that_overflow_a_batchnorms_variance_stop_the_run(tmp_path, capfd):
    # Finite images of 1e19: the batch variance is inf in float32, the loss stays finite (nothing
    # is learned), and the run wrote a model with running_var = inf and exited 0.
    code, _, err = _cli(capfd, *_tiny_run(tmp_path, scale=1e19), "--steps", 6, "--eval-every", 6)
    assert code == 1
    assert "the model's bn.running_var is no longer finite after step" in _one_line(err, "bngraph: check failed: ")
    assert not (tmp_path / "run" / "model").exists()


def test_reproduce_that_diverges_stops_with_exit_1(tmp_path, capfd, mnist_dir):
    code, _, err = _cli(capfd, "reproduce", "mnist", "--data", mnist_dir, "--steps", 40, "--eval-every", 20,
                        "--lr", 1e38, "--workers", 1, "--quiet", "-o", tmp_path / "repro")
    assert code == 1
    assert "training diverged: the weights are not finite at step 20" in _one_line(err, "bngraph: check failed: ")
    assert not (tmp_path / "repro").exists()


# 6. --json: JSON alone on stdout, numbers as numbers.


def _json(capfd, *argv) -> dict:
    code, out, _ = _cli(capfd, *argv, "--json")
    assert code == 0
    return json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_every_command_prints_only_json_with_numbers(tmp_path, capfd, mnist_dir):
    a, onnx = tmp_path / "a", tmp_path / "a.onnx"
    assert _json(capfd, "insert", "zoo:mnist-mlp", "-o", a)["inserted"][0]["features"] == 100
    fold = _json(capfd, "fold", a, "-o", tmp_path / "b")
    assert (fold["batchnorms_before"], fold["batchnorms_after"]) == (3, 0)
    export = _json(capfd, "export", a, "-o", onnx)
    verify = _json(capfd, "verify", a, onnx)
    for report in (export, verify):
        row = report["verification"][0]
        assert isinstance(row["elements"], int) and isinstance(row["failed_elements"], int)
        assert isinstance(row["max_abs"], float)
    onnx_fold = _json(capfd, "fold", onnx, "-o", tmp_path / "c.onnx")
    assert all(isinstance(v, (int, float)) for k, v in onnx_fold.items() if k.endswith(("_before", "_after")))
    graph = _json(capfd, "graph", tmp_path / "b", "-o", tmp_path / "g.dot")
    assert (graph["inserted"], graph["folded"], graph["left"]) == (3, 3, 0)
    assert isinstance(_json(capfd, "zoo")["models"][0]["parameters"], int)
    train = _json(capfd, "train", a, "--data", mnist_dir, "--steps", 10, "--eval-every", 5, "--quiet", "-o",
                  tmp_path / "t")
    row = train["evaluations"][-1]
    assert isinstance(row["step"], int) and isinstance(row["test_accuracy"], float)
    assert len(repr(row["test_loss"])) <= 10  # 6 significant digits, not float32 noise
    recal = _json(capfd, "recalibrate", a, "--data", mnist_dir, "--batches", 2, "-o", tmp_path / "r")
    assert (recal["batches"], recal["batch_size"]) == (2, 60)
    repro = _json(capfd, "reproduce", "mnist", "--data", mnist_dir, "--steps", 10, "--eval-every", 5,
                  "--workers", 1, "--quiet", "-o", tmp_path / "p")
    assert all(isinstance(v["best_test_accuracy"], float) for v in repro["results"])


def test_json_has_no_nan_and_rounds_floats_by_meaning():
    from bngraph.report import Report

    report = Report("t", facts={"loss": float("nan"), "lr": 0.008633292175601102, "max_abs": 1.23456789e-7,
                                "steps": torch.tensor(3), "accuracy": torch.tensor(0.1135, dtype=torch.float32)})
    assert report.to_json() == {"loss": None, "lr": 0.00863329, "max_abs": 1.235e-07, "steps": 3, "accuracy": 0.1135,
                                "notes": []}


WARNS_PY = '''
import warnings

import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 3, 8, 8)

    def __init__(self, fail=False):
        super().__init__()
        self.conv, self.fail = nn.Conv2d(3, 4, 3), fail

    def forward(self, x):
        warnings.warn("this model warns on every call")
        if self.fail:
            return torch.relu(self.conv(x["image"]))  # a batch dict the example is not
        return torch.relu(self.conv(x))


def failing():
    return Net(fail=True)
'''


def test_warnings_are_shown_after_a_result_and_not_before_the_one_error_line(tmp_path):
    # A torch or model warning printed before the error made "one line" three.
    # A process of its own, as a user's: pytest records warnings in place of printing them.
    (tmp_path / "warns.py").write_text(WARNS_PY)

    def run(symbol, out):
        done = subprocess.run([sys.executable, "-m", "bngraph", "insert", f"{tmp_path / 'warns.py'}:{symbol}", "-o",
                               str(tmp_path / out)], capture_output=True, text=True)
        return done.returncode, done.stderr

    code, err = run("failing", "bad")
    assert code == 2 and "the model raised at" in _one_line(err)
    code, err = run("Net", "good")
    assert code == 0 and err.count("UserWarning: this model warns on every call") == 1


CONV_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))
'''


@pytest.mark.parametrize("command", [["insert", "--dry-run"], ["verify", "{model}"]])
def test_an_input_shape_too_large_for_memory_is_one_line_naming_its_size(command, tmp_path, capfd):
    # A typo of 100000 for 100 ended in torch's allocator traceback, exit 1.
    model = tmp_path / "conv.py"
    model.write_text(CONV_PY)
    argv = [command[0], model, *(a.format(model=model) for a in command[1:])]
    code, _, err = _cli(capfd, *argv, "--input-shape", "2,3,100000,100000")
    assert code == 2 and "GB, more memory than this machine can give" in _one_line(err)


SEQUENTIAL_PY = '''
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


class OneInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make()

    def forward(self, x):
        return self.body(x)
'''


@pytest.mark.parametrize("command", [["fold", "-o", "{out}"], ["export", "-o", "{out}.onnx"], ["insert", "-o", "{out}"],
                                     ["verify", "{model}"]])
@pytest.mark.parametrize(("symbol", "shape"), [("make", "2,5,8,8"), ("OneInput", "2,3,8,8;2,3")])
def test_an_input_the_model_cannot_take_is_one_line_where_no_user_code_runs(command, symbol, shape, tmp_path, capfd):
    # 5 channels for an nn.Sequential's 3 (torch raises with no frame of the user's), and two
    # inputs for one (the call itself raises): fold and export ended in a traceback, exit 1.
    spec = f"{tmp_path / 'model.py'}:{symbol}"
    (tmp_path / "model.py").write_text(SEQUENTIAL_PY)
    argv = [command[0], spec, *(a.format(model=spec, out=tmp_path / "out") for a in command[1:])]
    code, _, err = _cli(capfd, *argv, "--input-shape", shape)
    assert code == 2 and ("channels" in _one_line(err) or "positional arguments" in _one_line(err)), err


# ---- standard streams the report cannot go to, and names near the file system's limit ------------


def _fold_in_a_shell(tmp_path, redirect: str, *flags: str, output: str = "out.onnx") -> subprocess.CompletedProcess:
    import onnx

    from tests.onnx_models import conv_bn_file

    onnx.save(conv_bn_file(), tmp_path / "in.onnx")
    command = f"{sys.executable} -m bngraph fold in.onnx -o {output} {' '.join(flags)} {redirect}"
    return subprocess.run(["bash", "-c", command], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("flags", [(), ("--json",)])
def test_a_report_that_cannot_be_written_is_one_line_and_exit_2_the_output_whole(tmp_path, flags):
    # `> /dev/full`: tracebacks and exit 1, read by CI as a failed check, after a fold that passed.
    done = _fold_in_a_shell(tmp_path, "> /dev/full", *flags)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("bngraph: error: cannot write the report to standard output: "
                                                   "No space left on device")
    assert (tmp_path / "out.onnx").is_file()


@pytest.mark.parametrize("redirect", [">&-", "--json 2>&-"])
def test_a_closed_stream_is_no_failure(tmp_path, redirect):
    # Closed stdout: AttributeError on None, exit 1; closed stderr under --json: the JSON whole,
    # and exit 1 all the same.
    done = _fold_in_a_shell(tmp_path, redirect)
    assert done.returncode == 0, done.stderr
    if "--json" in redirect:
        assert json.loads(done.stdout)["batchnorms_after"] == 0
    assert (tmp_path / "out.onnx").is_file()


def test_an_output_name_near_the_file_systems_limit_is_written_and_one_past_it_refused(tmp_path):
    # The temporary beside it (".NAME.PID.partial.onnx") passed NAME_MAX: a traceback after the work.
    done = _fold_in_a_shell(tmp_path, "", output="a" * 244 + ".onnx")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("a")] == ["a" * 244 + ".onnx"]
    done = _fold_in_a_shell(tmp_path, "", output="b" * 260 + ".onnx")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "bytes, more than the file system takes" in done.stderr


def test_a_buffer_that_is_infinite_by_design_is_not_a_divergence(tmp_path, capfd):
    # A causal mask of -inf, held by the model from the start, is no sign of a run blowing up.
    args = _tiny_run(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY_CONV_NET.replace(
        "self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(64, 3)",
        "self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(64, 3)\n"
        "        self.register_buffer('mask', torch.full((3, 3), float('-inf')).triu(1))"))
    code, _, err = _cli(capfd, *args, "--steps", 4, "--eval-every", 2)
    assert code == 0, err


def test_a_buffer_the_forward_drops_is_no_longer_watched(tmp_path, capfd):
    # A cache invalidated in training (`self.cache = None`): the finite check looked it up by name
    # and the run died with a KeyError after its steps.
    args = _tiny_run(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY_CONV_NET.replace(
        "self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(64, 3)",
        "self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(64, 3)\n"
        "        self.register_buffer('cache', torch.zeros(3), persistent=False)").replace(
        "        return self.fc(", "        if self.training:\n            self.cache = None\n        return self.fc("))
    code, _, err = _cli(capfd, *args, "--steps", 4, "--eval-every", 2)
    assert code == 0, err


def test_a_run_given_up_before_its_first_checkpoint_keeps_a_file_the_user_put_in_its_folder(tmp_path, capfd):
    # The whole folder went with shutil.rmtree, the user's notes with it.
    args = _tiny_run(tmp_path)
    notes = tmp_path / "run" / "notes.txt"
    (tmp_path / "tiny.py").write_text(TINY_CONV_NET.replace(
        "        return self.fc(",
        "        if self.training:\n"
        f"            import pathlib\n"
        f"            pathlib.Path({str(notes)!r}).write_text('mine')  # the user, while the run goes on\n"
        f"            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)) * float('nan')\n"
        "        return self.fc("))
    code, _, err = _cli(capfd, *args, "--steps", 30, "--eval-every", 30)
    assert code == 1 and "training diverged" in err
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]  # bngraph's files went


def test_a_picture_that_cannot_be_written_after_the_model_says_the_run_is_done(tmp_path):
    # Past a 20 KB file-size limit the model and checkpoint fit, the picture of the tracked inputs
    # does not: the line said "nothing was written" of a finished run.
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    args = [str(a) for a in _tiny_run(tmp_path) if a != "--quiet"]
    done = subprocess.run([sys.executable, "-m", "bngraph", *args, "--steps", "4", "--eval-every", "2", "--quiet",
                           "--track-inputs"], capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr, "bngraph: error: cannot write ")
    assert "inputs.png" in line and "the run itself is done: its model and checkpoint are in" in line
    assert (tmp_path / "run" / "model" / "weights.pt").is_file()


def test_a_working_folder_removed_under_the_shell_is_one_line(tmp_path):
    # os.getcwd() raised FileNotFoundError: a traceback, exit 1.
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f"cd {gone} && rmdir {gone} && exec {sys.executable} -m bngraph verify zoo:mnist-mlp zoo:mnist-mlp"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "the working folder no longer exists" in done.stderr


def test_a_model_file_is_read_as_utf8_under_any_locale(tmp_path):
    # Under LC_ALL=C (PYTHONUTF8=0), a comment's "José" was a UnicodeDecodeError traceback, and a
    # class named in Cyrillic was "not found" (argv decoded by the locale, names by UTF-8).
    source = ("# Net by José\nimport torch.nn as nn\nclass {name}(nn.Module):\n    example_input_shape = (2, 4)\n"
              "    def __init__(self):\n        super().__init__()\n        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)\n"
              "    def forward(self, x):\n        return self.fc2(self.fc1(x).relu())\n")
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "PYTHONPATH": str(REPO)}
    for name in ("Net", "Сеть"):
        (tmp_path / "m.py").write_text(source.format(name=name), encoding="utf-8")
        out = tmp_path / f"out-{len(name)}"
        done = subprocess.run([sys.executable, "-m", "bngraph", "insert", f"m.py:{name}", "-o",
                               str(out)], cwd=tmp_path, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode(errors="replace")


class _WithoutNotes(RuntimeError):
    """An exception as Python 3.10 makes them (the wheel says >=3.10): no add_note."""

    def __getattribute__(self, name):
        if name == "add_note":
            raise AttributeError(f"'RuntimeError' object has no attribute {name!r}")
        return super().__getattribute__(name)


@torch.fx.wrap
def _layer_that_fails(x):
    raise _WithoutNotes("shape mismatch in my layer")


class _FailsInALayer(nn.Module):
    def forward(self, x):
        return _layer_that_fails(x)


def test_a_failure_is_named_on_a_python_without_exception_notes():
    # On 3.10, bngraph's own err.add_note raised AttributeError in place of the model's error.
    from bngraph.trace import record_shapes

    gm = torch.fx.symbolic_trace(_FailsInALayer())
    with pytest.raises(Exception, match="at node _layer_that_fails: _WithoutNotes: shape mismatch in my layer"):
        record_shapes(gm, [torch.randn(2, 4)])

    @graph_pass(in_place=True)
    def broken(model):
        raise _WithoutNotes("a bug in a pass")

    with pytest.raises(_WithoutNotes, match="a bug in a pass") as raised:
        run_passes(nn.Linear(2, 2), [broken])
    assert raised.value.__notes__ == ["bngraph: raised in pass 'broken' (after none)"]
