"""`bngraph insert` end to end: reports, artifacts, and the error contract (one line, exit 2)."""

import json
import subprocess
import sys

import pytest
import torch

import bngraph
from bngraph.cli import main
from tests.conftest import MODELS_PY, REAL_MNIST


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_insert_writes_a_loadable_artifact_and_a_json_report(tmp_path, capsys):
    code, out, _ = _cli(capsys, "insert", f"{MODELS_PY}:Branches", "-o", str(tmp_path / "b"), "--json")
    assert code == 0
    report = json.loads(out)
    assert {r["node"] for r in report["inserted"]} == {"relu", "relu_1", "relu_2"}
    assert set(report["inserted"][0]) >= {"node", "activation", "norm", "features", "bias_removed"}
    assert report["skipped"] == []
    model = bngraph.load(tmp_path / "b")
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 3
    history = json.loads((tmp_path / "b" / "bngraph.json").read_text())["history"]
    assert history[0]["command"] == "insert" and len(history[0]["report"]["inserted"]) == 3


SUBMODULE_NAMED_SELF = """
import torch
from torch import nn


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x)


class Attention(nn.Module):  # HuggingFace BERT's and DeBERTa's attention.self
    def __init__(self):
        super().__init__()
        self.self = Inner()

    def forward(self, x):
        return torch.relu(self.self(x))


class Net(nn.Module):
    example_input_shape = (4, 8)

    def __init__(self):
        super().__init__()
        self.attention, self.fc = Attention(), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.attention(x))
"""


def test_a_submodule_named_self_keeps_its_path_in_the_written_code(tmp_path, capsys):
    # `attention.self.fc(` was rewritten as a call of the top-level `fc`: a traceback, exit 1.
    (tmp_path / "m.py").write_text(SUBMODULE_NAMED_SELF)
    code, _, err = _cli(capsys, "insert", f"{tmp_path / 'm.py'}:Net", "-o", str(tmp_path / "out"))
    assert code == 0, err
    model = bngraph.load(tmp_path / "out")
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 1


WEIGHT_NORMED = """
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))
"""


def test_a_parametrized_layer_keeps_its_bias_and_the_artifact_loads(tmp_path, capsys):
    # Its bias dropped, the saved weights lacked conv.bias, which the model's own code rebuilds:
    # "cannot load weights.pt" naming a temporary folder, exit 2.
    (tmp_path / "m.py").write_text(WEIGHT_NORMED)
    code, out, err = _cli(capsys, "insert", f"{tmp_path / 'm.py'}:Net", "-o", str(tmp_path / "out"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [r["bias_removed"] for r in report["inserted"]] == [False]
    assert any("conv is parametrized (weight_norm, spectral_norm)" in r["reason"] for r in report["skipped"])
    model = bngraph.load(tmp_path / "out")
    assert model.conv.bias is not None


FEATURE_TAP = """
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (4, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 2, 1)
        self.register_buffer("seen", torch.zeros(()))
        self.features = {}
        self.act.register_forward_hook(self._tap)  # a feature extractor's tap, on the model's own state

    def _tap(self, module, inputs, output):
        self.seen += 1
        self.features["act"] = output.detach()

    def forward(self, x):
        return self.head(self.act(self.conv(x)))
"""


def test_a_hook_that_works_on_the_model_itself_keeps_working_on_the_written_model(tmp_path, capsys):
    # Written from a graph, the model rebuilt act with its hook bound to another copy of the
    # model: `seen` and `features` were gone from the written one, and nothing said so.
    (tmp_path / "m.py").write_text(FEATURE_TAP)
    code, out, err = _cli(capsys, "insert", f"{tmp_path / 'm.py'}:Net", "-o", str(tmp_path / "out"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tracing"] == "module-level fallback" and "act's Net._tap works on Net itself" in report["notes"][-1]
    model = bngraph.load(tmp_path / "out")
    model(torch.randn(2, 3, 8, 8))
    assert model.seen.item() == 1 and list(model.features) == ["act"]


def test_insert_on_its_own_output_changes_nothing_and_says_so(tmp_path, capsys):
    assert _cli(capsys, "insert", "zoo:mnist-mlp", "-o", str(tmp_path / "a"))[0] == 0
    code, out, _ = _cli(capsys, "insert", str(tmp_path / "a"), "-o", str(tmp_path / "b"), "--json")
    report = json.loads(out)
    assert code == 0 and report["changed"] is False and report["inserted"] == []
    assert "nothing changed" in report["notes"][0]
    history = json.loads((tmp_path / "b" / "bngraph.json").read_text())["history"]
    assert [h["command"] for h in history] == ["insert", "insert"]


def test_dry_run_writes_nothing(tmp_path, capsys):
    code, out, _ = _cli(capsys, "insert", "zoo:mnist-mlp", "--dry-run", "-o", str(tmp_path / "x"))
    assert code == 0 and "BatchNorm1d" in out and not (tmp_path / "x").exists()
    assert f"--dry-run: nothing written (not {tmp_path / 'x'})" in out  # -o was ignored without a word


def test_weights_and_preserve_keep_a_pretrained_function(tmp_path, capsys):
    from tests.models import Residual

    model = Residual()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    args = ["insert", f"{MODELS_PY}:Residual", "--weights", str(tmp_path / "w.pt"), "--preserve"]
    assert _cli(capsys, *args, "-o", str(tmp_path / "p"))[0] == 0
    x = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(bngraph.load(tmp_path / "p").eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def two_classes(tmp_path):
    path = tmp_path / "two.py"
    path.write_text(
        "import torch\n"
        "class A(torch.nn.Module):\n    def forward(self, x): return x.relu()\n"
        "class B(torch.nn.Module):\n    def __init__(self, width): super().__init__()\n"
        "def broken():\n    return torch.nn.Conv2d(3, '8', 3)\n"
    )
    return path


BAD = {
    "missing file": (["insert", "/nonexistent/model.py:Net", "--input-shape", "2,4", "-o", "{tmp}/o"], "does not exist"),
    "no such symbol": (["insert", f"{MODELS_PY}:Nope", "-o", "{tmp}/o"], "no symbol 'Nope'"),
    "ambiguous file": (["insert", "{two}", "-o", "{tmp}/o"], "defines 2 models"),
    "constructor args": (["insert", "{two}:B", "-o", "{tmp}/o"],
                         "cannot be called without arguments (missing a required argument: 'width'); add a function"),
    # A TypeError raised inside the builder is the user's bug, where it is: not missing arguments.
    "builder raises": (["insert", "{two}:broken", "-o", "{tmp}/o"], "two.py:broken() raised at "),
    "unknown zoo name": (["insert", "zoo:resnet5", "-o", "{tmp}/o"], "no model named 'resnet5'"),
    "bad shape": (["insert", "zoo:mnist-mlp", "--input-shape", "2,x", "-o", "{tmp}/o"], "bad --input-shape"),
    "model fails on input": (["insert", "zoo:mnist-mlp", "--input-shape", "2,3,5", "-o", "{tmp}/o"], "failed on its example input"),
    "no example input": (["insert", "{two}:A", "-o", "{tmp}/o"], "declares no example input"),
    "not an artifact": (["insert", "{tmp}", "-o", "{tmp}/o"], "not a bngraph artifact"),
    # Missing folders above -o are created since issue 9; a file in their place is refused.
    "unwritable output": (["insert", "zoo:mnist-mlp", "-o", "{two}/o"], "is a file, not a folder"),
    "missing -o": (["insert", "zoo:mnist-mlp"], "needs -o"),
    "corrupted artifact": (["insert", "{broken}", "-o", "{tmp}/o"], "is corrupted"),
    "data without preserve": (["insert", "zoo:mnist-mlp", "--data", "{tmp}", "-o", "{tmp}/o"], "add --preserve"),
    "bad weights": (["insert", "zoo:mnist-mlp", "--weights", "{two}", "-o", "{tmp}/o"], "cannot read weights"),
}


@pytest.fixture
def broken_artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken") / "a"
    assert main(["insert", "zoo:mnist-mlp", "-o", str(folder)]) == 0
    (folder / "weights.pt").write_bytes((folder / "weights.pt").read_bytes()[:100])
    return folder


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, two_classes, broken_artifact, capsys):
    argv, message = BAD[case]
    argv = [a.format(tmp=tmp_path, two=two_classes, broken=broken_artifact) for a in argv]
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("bngraph: error: ")
    assert message in err
    assert not (tmp_path / "o").exists()


def test_a_file_with_one_builder_function_needs_no_symbol(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(
        "import torch\n"
        "def build() -> torch.nn.Module:\n    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())\n"
    )
    code, out, _ = _cli(capsys, "insert", str(path), "--input-shape", "2,4", "-o", str(tmp_path / "o"), "--json")
    assert code == 0 and [r["features"] for r in json.loads(out)["inserted"]] == [3]


MODEL_BUILT_AS_THE_FILE_RUNS = """
import torch
from torch import nn

act = nn.ReLU()  # a layer of the model, named at module level too: not a model of its own
model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), act, nn.Linear(6, 2))
example_input_shape = (2, 3, 4)
"""

UNTRACEABLE_MODEL_BUILT_AS_THE_FILE_RUNS = MODEL_BUILT_AS_THE_FILE_RUNS + """

class Gate(nn.Module):  # torch.fx cannot trace it: a branch on the data
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(12, 6), nn.GELU(), nn.Linear(6, 2)

    def forward(self, x):
        x = x.flatten(1)
        if x.sum() > 1e9:
            x = x / 2
        return self.out(self.act(self.fc(x)))


gate = Gate()
"""


@pytest.mark.parametrize(
    "source, symbol",
    [(MODEL_BUILT_AS_THE_FILE_RUNS, ""), (UNTRACEABLE_MODEL_BUILT_AS_THE_FILE_RUNS, ":gate")],
    ids=["traced", "module-level-fallback"],
)
def test_a_model_the_file_builds_as_it_runs_is_the_model(source, symbol, tmp_path, capsys):
    # `model = nn.Sequential(...)` at module level, as quick scripts write it: built under the
    # seeded generator like a class, its BatchNorm in front of the activation, and the artifact
    # (which calls what builds the model) rebuilds the same weights each load.
    path = tmp_path / "net.py"
    path.write_text(source)
    code, out, _ = _cli(capsys, "insert", f"{path}{symbol}", "-o", str(tmp_path / "o"), "--json")
    assert code == 0 and [r["features"] for r in json.loads(out)["inserted"]] == [6]
    original = bngraph.load(f"{path}{symbol}")
    inserted, again = bngraph.load(tmp_path / "o"), bngraph.load(tmp_path / "o")
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in inserted.modules()) == 1
    def linear_weights(model):
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]

    for got, want in zip(linear_weights(inserted), linear_weights(original), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    x = torch.randn(5, 3, 4) * 3 + 1
    torch.testing.assert_close(inserted.eval()(x), again.eval()(x), rtol=0, atol=0)
    assert _cli(capsys, "fold", str(tmp_path / "o"), "-o", str(tmp_path / "f"))[0] == 0
    assert _cli(capsys, "verify", str(tmp_path / "o"), str(tmp_path / "f"))[0] == 0


def test_a_file_without_a_model_says_what_a_model_is(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text("import torch\nbuild = lambda: torch.nn.Linear(4, 3)\n")
    code, _, err = _cli(capsys, "insert", str(path), "-o", str(tmp_path / "o"))
    assert code == 2 and "defines no model (an nn.Module class, a function annotated" in err
    assert _cli(capsys, "insert", f"{path}:build", "--input-shape", "2,4", "-o", str(tmp_path / "o"))[0] == 0


def test_an_example_input_declared_at_the_files_top_level_is_used(tmp_path, capsys):
    # As users write it: a module-level constant beside the class, not a class attribute.
    path = tmp_path / "net.py"
    path.write_text(
        "import torch\n"
        "example_input_shape = (2, 3, 8, 8)\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.act = torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU()\n"
        "    def forward(self, x):\n"
        "        return self.act(self.conv(x))\n"
    )
    code, out, _ = _cli(capsys, "insert", str(path), "-o", str(tmp_path / "o"), "--json")
    assert code == 0 and [r["features"] for r in json.loads(out)["inserted"]] == [5]
    assert bngraph.load(tmp_path / "o")(torch.randn(2, 3, 8, 8)).shape == (2, 5, 6, 6)


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="needs the real MNIST copy")
def test_preserve_calibrates_on_real_data(tmp_path, capsys):
    args = ["insert", "zoo:mnist-mlp", "--preserve", "--data", str(REAL_MNIST), "-o", str(tmp_path / "o")]
    assert _cli(capsys, *args)[0] == 0
    model = bngraph.load(tmp_path / "o").eval()
    from bngraph.data import resolve_dataset

    images = resolve_dataset(str(REAL_MNIST)).as_float()[2][:256]
    with torch.no_grad():
        hidden = model.fc1(model.flatten(images))  # the first BN's input on real test images
    bn = model.act1_bn
    # calibrated on training images: close to the test images' statistics, not to N(0, 1)'s
    torch.testing.assert_close(bn.running_mean, hidden.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(bn.running_var, hidden.var(0), atol=0.01, rtol=0.3)


def test_the_installed_command_follows_the_contract(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bngraph", "insert", f"{tmp_path}/missing.py:Net", "--input-shape", "2,4", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"bngraph: error: model file {tmp_path}/missing.py does not exist"]


def test_an_existing_output_is_replaced_whole(tmp_path, capsys):
    out = tmp_path / "o"
    assert _cli(capsys, "insert", "zoo:mnist-mlp", "-o", str(out))[0] == 0
    # Replacing needs --force since issue 9 (tests/test_outputs.py tests the refusal).
    assert _cli(capsys, "insert", f"{MODELS_PY}:SharedActivation", "-o", str(out), "--force")[0] == 0
    assert "act_bn_1" in (out / "model.py").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary folders left


PRINTS_PY = '''
import torch
from torch import nn

print("loading my model")


class Net(nn.Module):
    example_input_shape = (2, 4)

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        print("x shape", tuple(x.shape))
        return self.fc2(torch.relu(self.fc1(x)))
'''


@pytest.mark.parametrize("command", ["insert", "fold", "export", "verify"])
def test_json_is_alone_on_stdout_when_the_model_prints(command, tmp_path, capsys):
    (tmp_path / "model.py").write_text(PRINTS_PY)
    model = str(tmp_path / "model.py")
    argv = {"insert": ["insert", model, "-o", str(tmp_path / "out")], "fold": ["fold", model, "-o", str(tmp_path / "f")],
            "export": ["export", model, "-o", str(tmp_path / "m.onnx")], "verify": ["verify", model, model]}[command]
    code, out, err = _cli(capsys, *argv, "--json")
    assert code == 0, err
    assert json.loads(out)  # the model's prints went to stderr
    assert "loading my model" in err and "x shape" in err
