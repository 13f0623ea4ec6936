"""The whole life of a BN model on both zoo models, through the command line:
insert, a few training steps, fold, export, verify, with the errors printed."""

import json
import shutil
import subprocess
import sys

import onnx
import pytest
import torch

import bngraph
from bngraph.cli import main
from tests.mnist_like import write_learnable


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_learnable(tmp_path_factory.mktemp("mnist"), n_train=120, n_test=40)


def _json(capsys, *argv) -> dict:
    code = main([str(a) for a in argv] + ["--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


@pytest.mark.parametrize("name", ["mnist-mlp", "inception-small"])
def test_insert_train_fold_export_verify(name, data, tmp_path, capsys):
    inserted = _json(capsys, "insert", f"zoo:{name}", "-o", tmp_path / "bn")
    assert inserted["inserted"]
    _json(capsys, "train", tmp_path / "bn", "--data", data, "--steps", 4, "--batch-size", 16,
          "--lr", 0.1, "--eval-every", 2, "--quiet", "-o", tmp_path / "run")
    trained = bngraph.load(tmp_path / "run")
    assert any(not torch.equal(trained.state_dict()[k], bngraph.load(tmp_path / "bn").state_dict()[k])
               for k in trained.state_dict() if "running_mean" in k)

    folded = _json(capsys, "fold", tmp_path / "run", "-o", tmp_path / "folded", "--strict")
    assert folded["batchnorms_before"] == len(inserted["inserted"]) and folded["batchnorms_after"] == 0
    exported = _json(capsys, "export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert exported["passed"] is True
    for candidate in (tmp_path / "folded", tmp_path / "m.onnx"):
        verified = _json(capsys, "verify", tmp_path / "run", candidate, "--data", data)
        assert verified["passed"] is True
        errors = {o["runtime"]: o["max_abs"] for o in verified["verification"]}
        with capsys.disabled():  # the errors, for whoever runs this with -s
            print(f"\n{name}: {candidate.name} vs the trained BN model, max abs error {errors}")
        assert max(errors.values()) < 1e-4


HF_STYLE_PY = '''
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ImageClassifierOutput:  # HuggingFace's style, in the user's own file
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None


class Classifier(nn.Module):
    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.act = nn.GELU()
        self.head = nn.Linear(6, 10)

    def forward(self, pixel_values):
        hidden = self.act(self.conv(pixel_values))
        return ImageClassifierOutput(logits=self.head(hidden.mean((2, 3))), hidden_states=(hidden,))


class Pair(Classifier):
    def forward(self, pixel_values):
        out = super().forward(pixel_values)
        return out.logits, out.hidden_states[0]


class WithAuxiliaryHead(Classifier):
    """GoogLeNet's way: auxiliary logits beside the logits, in training mode only."""

    def forward(self, pixel_values):
        out = super().forward(pixel_values)
        return (out.logits, out.logits.detach() * 0.5) if self.training else out.logits


class Probabilities(Classifier):
    def forward(self, pixel_values):
        return super().forward(pixel_values).logits.softmax(-1)


class ProbabilitiesInTraining(Classifier):
    def forward(self, pixel_values):
        logits = super().forward(pixel_values).logits
        return logits.softmax(-1) if self.training else logits


class Bfloat16Probabilities(Classifier):
    def forward(self, pixel_values):  # rows sum to 1 within bfloat16's rounding, 2e-3
        return (3 * super().forward(pixel_values).logits).bfloat16().softmax(-1).float()


class SigmoidScores(Classifier):
    def forward(self, pixel_values):
        return torch.sigmoid(super().forward(pixel_values).logits)


class SigmoidView(Classifier):
    def forward(self, pixel_values):
        return torch.sigmoid(super().forward(pixel_values).logits).view(-1, 10)


class HardSigmoid(Classifier):
    def forward(self, pixel_values):
        return nn.functional.hardsigmoid(super().forward(pixel_values).logits)


class InPlaceGate(Classifier):
    def forward(self, pixel_values):  # autograd needs the sigmoid's output, which *= overwrites
        logits = super().forward(pixel_values).logits
        gate = torch.sigmoid(logits)
        gate *= 4 * logits
        return gate


class NearOneHalf(Classifier):
    def forward(self, pixel_values):  # logits that happen to lie in (0, 1): no sigmoid made them
        return 0.5 + 0.01 * super().forward(pixel_values).logits


class LogProbabilities(Classifier):
    def forward(self, pixel_values):
        return super().forward(pixel_values).logits.log_softmax(-1)
'''


def test_a_model_returning_its_own_output_dataclass_goes_through_the_chain(data, tmp_path, capsys):
    # The user's dataclass lives in their file: every artifact carries that code, training reads
    # its `logits`, and the exporter gets its tensors.
    (tmp_path / "hf_style.py").write_text(HF_STYLE_PY)
    _json(capsys, "insert", tmp_path / "hf_style.py:Classifier", "-o", tmp_path / "bn")
    _json(capsys, "train", tmp_path / "bn", "--data", data, "--steps", 4, "--batch-size", 16, "--quiet",
          "-o", tmp_path / "run")
    folded = _json(capsys, "fold", tmp_path / "run", "-o", tmp_path / "folded", "--strict")
    assert folded["batchnorms_after"] == 0
    output = bngraph.load(tmp_path / "folded").eval()(torch.randn(3, 1, 28, 28))
    assert type(output).__name__ == "ImageClassifierOutput" and output.logits.shape == (3, 10)
    exported = _json(capsys, "export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert exported["passed"] is True
    # Handed the .onnx alone, a user fed it 0-255 pixels: the scale it trained on is in the file now.
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["bngraph_input_scale"] == "uint8 pixels / 255 (values in [0, 1])"
    assert any("bngraph_input_scale" in note for note in exported["notes"])
    verified = _json(capsys, "verify", tmp_path / "run", tmp_path / "m.onnx", "--data", data)
    assert verified["passed"] is True and len({o["output"] for o in verified["verification"]}) == 2


@pytest.mark.parametrize("model, says", [
    ("Pair", "in eval mode the model's output is tuple"),
    ("WithAuxiliaryHead", "in training mode the model's output is tuple"),
    # Cross-entropy would apply a second softmax: it runs, and learns little.
    ("Probabilities", "the model's outputs are probabilities"),
    # The eval-mode probe saw logits; the first step's outputs are checked before any update.
    ("ProbabilitiesInTraining", "in training mode the model's outputs are probabilities"),
    ("Bfloat16Probabilities", "the model's outputs are probabilities"),
    ("SigmoidScores", "the model returns a sigmoid's outputs"),
    ("SigmoidView", "the model returns a sigmoid's outputs"),
    ("HardSigmoid", "the model returns a sigmoid's outputs"),
    # A gate written in place is logits, not a sigmoid's outputs; its backward fails, in torch's C++.
    ("InPlaceGate", "the model's backward failed on a training batch: RuntimeError: one of the variables needed"),
])
def test_training_a_model_with_no_logits_to_read_is_one_line(data, tmp_path, capsys, model, says):
    (tmp_path / "hf_style.py").write_text(HF_STYLE_PY)
    code = main(["train", f"{tmp_path / 'hf_style.py'}:{model}", "--data", str(data), "--steps", "2", "--quiet",
                 "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "run").exists()
    assert says in err and ("logits" in err or model == "InPlaceGate")


@pytest.mark.parametrize("model", [
    "LogProbabilities",  # log_softmax is idempotent: cross-entropy on log-probabilities is on the logits
    "NearOneHalf",  # told from a sigmoid's outputs by the function that made them, not by their values
])
def test_log_probabilities_and_logits_between_0_and_1_train(data, tmp_path, capsys, model):
    (tmp_path / "hf_style.py").write_text(HF_STYLE_PY)
    _json(capsys, "train", f"{tmp_path / 'hf_style.py'}:{model}", "--data", data, "--steps", 2,
          "--batch-size", 16, "--quiet", "-o", tmp_path / "run")


OPAQUE_PY = '''
import torch
from torch import nn


class Gate(nn.Module):
    """torch.fx cannot follow this: it branches on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.mean() > 0:
            return torch.tanh(self.fc(x))
        return self.fc(x)


class Net(nn.Module):
    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(784, 16)
        self.gate = Gate()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.stem(x.flatten(1)))))
'''


def test_a_model_with_a_part_fx_cannot_trace_trains_and_folds_from_its_artifact(data, tmp_path, capsys):
    # insert keeps Gate opaque and the artifact rebuilds it from the user's code; train saves the
    # trained artifact around it the same way, and fold folds what it can reach.
    (tmp_path / "opaque.py").write_text(OPAQUE_PY)
    inserted = _json(capsys, "insert", tmp_path / "opaque.py:Net", "-o", tmp_path / "bn")
    assert [row["module"] for row in inserted["opaque"]] == ["gate"] and len(inserted["inserted"]) == 1
    _json(capsys, "train", tmp_path / "bn", "--data", data, "--steps", 4, "--batch-size", 16, "--quiet",
          "-o", tmp_path / "run")
    folded = _json(capsys, "fold", tmp_path / "run", "-o", tmp_path / "folded", "--strict")
    assert folded["batchnorms_before"] == 1 and folded["batchnorms_after"] == 0
    trained, fold_of_it = bngraph.load(tmp_path / "run").eval(), bngraph.load(tmp_path / "folded").eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fold_of_it(x), trained(x), rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(v, bngraph.load(tmp_path / "bn").state_dict()[k])
               for k, v in trained.state_dict().items())  # it trained
    assert main(["graph", str(tmp_path / "run"), "-o", str(tmp_path / "graph.svg")]) == 0  # drawn around it too
    assert "gate" in (tmp_path / "graph.svg").read_text()


PROJECT = {
    "netblocks/__init__.py": "from .conv import ConvAct\n",
    "netblocks/conv.py": '''
from torch import nn


class ConvAct(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv, self.act = nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x))
''',
    "netops.py": '''
import torch


def nonlinearity(x):
    return x * torch.sigmoid(x)
''',
    "model.py": '''
import torch
from torch import nn

from netblocks import ConvAct
from netops import nonlinearity


class Net(nn.Module):
    example_input_shape = (2, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.block = ConvAct(1, 4)
        self.conv = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        h = nonlinearity(self.conv(self.block(x)))
        return self.head(h.mean((2, 3)))
''',
}


def test_a_model_that_imports_its_siblings_goes_through_the_chain_and_its_artifacts_load_anywhere(data, tmp_path,
                                                                                                      capsys):
    # `python model.py` finds netblocks/ and netops.py beside it: so does every command, and each
    # artifact carries them (code/), so that a copy elsewhere loads in a fresh process.
    project = tmp_path / "project"
    for name, text in PROJECT.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    inserted = _json(capsys, "insert", project / "model.py:Net", "-o", tmp_path / "bn")
    assert [r["activation"] for r in inserted["inserted"]] == ["SiLU", "sigmoid in mul"]
    assert sorted(p.relative_to(tmp_path / "bn" / "code").as_posix() for p in (tmp_path / "bn" / "code").rglob("*.py")) \
        == ["netblocks/__init__.py", "netblocks/conv.py", "netops.py"]
    _json(capsys, "train", tmp_path / "bn", "--data", data, "--steps", 2, "--batch-size", 16, "--quiet",
          "-o", tmp_path / "run")
    _json(capsys, "fold", tmp_path / "run", "-o", tmp_path / "folded", "--strict")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(tmp_path / "folded", elsewhere / "folded")
    for argv in (["export", project / "model.py:Net", "-o", elsewhere / "net.onnx"],
                 ["verify", elsewhere / "folded", tmp_path / "run"]):
        done = subprocess.run([sys.executable, "-m", "bngraph", *map(str, argv)], cwd=elsewhere, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
    assert "PASSED" in done.stdout


SIBLING_MODEL_PY = """
from torch import nn

from blocks import Block


class Net(nn.Module):
    example_input_shape = (3, 4)

    def __init__(self):
        super().__init__()
        self.fc, self.block = nn.Linear(4, 4), Block()

    def forward(self, x):
        return self.block(self.fc(x))
"""

SIBLING_BLOCK_PY = """
from torch import nn


class Block(nn.Module):
    def forward(self, x):
        return x.{}
"""


def test_each_model_file_gets_the_modules_beside_it_afresh(tmp_path, capsys):
    # The second model file's `from blocks import Block` got the first's blocks.py, cached by
    # name: verify compared a model with itself and passed two different ones. In one process
    # (a notebook), a blocks.py edited since was not read again, nor another folder's in place
    # of a module of that name the user made.
    import types

    from bngraph.cli import main

    for folder, activation in (("a", "relu()"), ("b", "sigmoid() * 5")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.py").write_text(SIBLING_MODEL_PY)
        (tmp_path / folder / "blocks.py").write_text(SIBLING_BLOCK_PY.format(activation))
    assert main(["verify", f"{tmp_path}/a/model.py", f"{tmp_path}/b/model.py"]) == 1
    assert "FAILED" in capsys.readouterr().out
    users_own = sys.modules["blocks"] = types.ModuleType("blocks")
    try:
        first = bngraph.load(f"{tmp_path}/a/model.py")
        (tmp_path / "a" / "blocks.py").write_text(SIBLING_BLOCK_PY.format("tanh()"))
        again = bngraph.load(f"{tmp_path}/a/model.py")
        x = torch.randn(3, 4)
        with torch.no_grad():
            torch.testing.assert_close(again.block(x), x.tanh())
            torch.testing.assert_close(first.block(x), x.relu())
        assert sys.modules["blocks"] is users_own  # the caller's own module of that name is theirs again
    finally:
        sys.modules.pop("blocks", None)
    # An artifact carries the blocks.py its model ran.
    assert main(["insert", f"{tmp_path}/a/model.py", "-o", str(tmp_path / "art")]) == 0
    assert (tmp_path / "art" / "code" / "blocks.py").read_text() == SIBLING_BLOCK_PY.format("tanh()")


CONFIGURED_MODEL_PY = """
import torch
from torch import nn

import settings

settings.SCALE = 3.0  # configured as the file runs, read again later


class Net(nn.Module):
    example_input_shape = (3, 4)

    def __init__(self):
        from blocks import Block  # imported as the model is built

        super().__init__()
        self.block, self.fc = Block(), nn.Linear(4, 4)

    def forward(self, x):
        import settings as s  # and as it runs
        if x.sum() > -1e9:  # data-dependent: its artifacts keep this code
            x = x + 0
        return self.block(self.fc(x)) * s.SCALE
"""


def test_the_modules_beside_a_model_stay_imported_as_a_scripts_do(tmp_path, capsys):
    # Forgotten once the file had run: a forward's `import settings` got a fresh, unconfigured
    # copy (an export 3x too small, verified), an artifact lacked the blocks.py its constructor
    # imported, and torch.save of the model failed (another Block class than blocks.Block).
    import io

    from bngraph.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.py").write_text(CONFIGURED_MODEL_PY)
    (tmp_path / "m" / "settings.py").write_text("SCALE = 1.0\n")
    (tmp_path / "m" / "blocks.py").write_text(SIBLING_BLOCK_PY.format("relu()"))
    try:
        model = bngraph.load(f"{tmp_path}/m/model.py")
        x = torch.randn(3, 4)
        with torch.no_grad():
            torch.testing.assert_close(model(x), model.fc(x).relu() * 3)
        torch.save(model, io.BytesIO())
        # An artifact's settings.py is its own only while it loads: its forward's `import settings`
        # took a fresh, unconfigured copy loaded elsewhere (SCALE 1, not 3), so it is refused.
        assert main(["insert", f"{tmp_path}/m/model.py", "-o", str(tmp_path / "art")]) == 2
        assert "model.py:20 imports settings inside forward" in capsys.readouterr().err
        # Read through the name the file imported at its top, it is the artifact's own, configured.
        (tmp_path / "m" / "model.py").write_text(CONFIGURED_MODEL_PY.replace("import settings as s  #", "s = settings  #"))
        assert main(["insert", f"{tmp_path}/m/model.py", "-o", str(tmp_path / "art")]) == 0
        assert (tmp_path / "art" / "code" / "blocks.py").is_file()
        x = torch.randn(3, 4)
        with torch.no_grad():  # the model's own SCALE, 3, read in this process
            torch.save((x, bngraph.load(f"{tmp_path}/m/model.py").eval()(x)), tmp_path / "want.pt")
        script = ("import torch, bngraph\nm = bngraph.load('art').eval()\nx, want = torch.load('want.pt')\n"
                  "torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)")
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    finally:
        for name in ("settings", "blocks"):
            sys.modules.pop(name, None)


LAZY_MODEL_PY = """
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (3, 4)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.scaled(self.fc(x))

    def scaled(self, x):
        from lazyscale import scale  # imported as it runs, in a method the forward calls
        return scale(x)
"""


def test_a_forward_importing_its_folders_module_is_refused_where_another_of_that_name_is_held(tmp_path, capsys):
    # The second model's forward took the first's lazyscale.py (x2 for x3): verify PASSED two
    # different models; with the caller's own lazyscale imported, the model ran that one.
    from bngraph.cli import main

    for folder, factor in (("a", 2), ("b", 3)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.py").write_text(LAZY_MODEL_PY)
        (tmp_path / folder / "lazyscale.py").write_text(f"def scale(x):\n    return x * {factor}\n")
    try:
        assert main(["verify", f"{tmp_path}/a/model.py", f"{tmp_path}/b/model.py"]) == 2
        err = capsys.readouterr().err
        assert f"the forward of the model in {tmp_path / 'a'} imports lazyscale as it runs, and so does" in err
    finally:
        sys.modules.pop("lazyscale", None)
    # In a fresh process (this one remembers a's forward), the caller's own lazyscale imported first.
    script = (f"import sys, types, bngraph\nsys.modules['lazyscale'] = types.ModuleType('lazyscale')\n"
              f"bngraph.load({str(tmp_path / 'b' / 'model.py')!r})")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "this process already holds its own 'lazyscale'" in done.stderr, done.stderr


def test_a_helper_edited_behind_a_sibling_is_read_again(tmp_path):
    # Only the edited file was imported anew: blocks.py kept the function it took from the old
    # helpers.py (and a file rewritten at the same size and time passed for unchanged).
    import os

    (tmp_path / "model.py").write_text(SIBLING_MODEL_PY)
    (tmp_path / "blocks.py").write_text("from torch import nn\nfrom helpers import act\n\n\nclass Block(nn.Module):\n"
                                        "    def forward(self, x):\n        return act(x)\n")
    (tmp_path / "helpers.py").write_text("def act(x):\n    return x.relu()\n")
    try:
        first = bngraph.load(f"{tmp_path}/model.py")
        stat = (tmp_path / "helpers.py").stat()
        (tmp_path / "helpers.py").write_text("def act(x):\n    return x.tanh()\n")
        os.utime(tmp_path / "helpers.py", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        again = bngraph.load(f"{tmp_path}/model.py")
        x = torch.randn(3, 4)
        with torch.no_grad():
            torch.testing.assert_close(again.block(x), x.tanh())
            torch.testing.assert_close(first.block(x), x.relu())
    finally:
        for name in ("blocks", "helpers"):
            sys.modules.pop(name, None)


def test_the_users_folder_leads_sys_path_only_while_their_file_imports(tmp_path):
    # Later imports (inside a forward) still find the user's modules, and a user's onnx.py beside
    # their model does not shadow the onnx package that bngraph imports after it.
    from bngraph.user_modules import importing_beside

    folder = str(tmp_path)
    with importing_beside(tmp_path):
        assert sys.path[0] == folder
    assert sys.path[-1] == folder and sys.path.count(folder) == 1
    sys.path.remove(folder)


BLOCK_PY = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.mean() > 100:  # data-dependent: torch.fx keeps the block whole, run from its code
            return x
        return torch.relu(self.conv(x))
'''

BLOCK_MODEL_PY = '''
from torch import nn

from editedblocks import Block


class Net(nn.Module):
    example_input_shape = (2, 4, 8, 8)

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x)
'''


def test_an_artifact_runs_the_modules_it_carries_not_the_users_edited_ones(tmp_path, capsys):
    # The user edits editedblocks.py after folding: verify must compare the artifact's own copy
    # (relu) with the edited model (tanh), not import the edited file for both and pass.
    (tmp_path / "editedblocks.py").write_text(BLOCK_PY)
    (tmp_path / "model.py").write_text(BLOCK_MODEL_PY)
    _json(capsys, "fold", tmp_path / "model.py:Net", "-o", tmp_path / "folded")
    (tmp_path / "editedblocks.py").write_text(BLOCK_PY.replace("torch.relu", "torch.tanh"))
    done = subprocess.run([sys.executable, "-m", "bngraph", "verify", str(tmp_path / "model.py:Net"),
                           str(tmp_path / "folded")], capture_output=True, text=True)  # a new process, as a user's
    assert done.returncode == 1 and "FAILED" in done.stdout, done.stdout + done.stderr


def test_a_forward_importing_a_standard_library_module_is_not_refused_for_a_file_of_that_name(tmp_path, capsys):
    # Both folders held a signal.py, and both forwards' `import signal` got the standard library's:
    # verify was refused, "from another signal".
    from bngraph.cli import main

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.py").write_text(LAZY_MODEL_PY.replace("from lazyscale import scale", "import signal")
                                                    .replace("return scale(x)", "return x * int(signal.SIGINT)"))
        (tmp_path / folder / "signal.py").write_text("SIGINT = 7\n")
    assert main(["verify", f"{tmp_path}/a/model.py", f"{tmp_path}/b/model.py"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(("source", "found"), [
    ("class S:\n    def __call__(self, x):\n        import cfg\n        return x * cfg.SCALE\n", True),  # a callable object
    ("class N:\n    @property\n    def scale(self):\n        import cfg\n        return cfg.SCALE\n", True),
    ("def _scaled(x):\n    import cfg\n    return x * cfg.SCALE\nclass N:\n    def __init__(self):\n"
     "        self.post = _scaled\n", True),  # a function handed around as a value
    ("def build():\n    from cfg import Block\n    return Block()\nclass N:\n    def __init__(self):\n"
     "        self.b = build()\n    def forward(self, x):\n        return self.b(x)\n", False),  # runs as it is built
], ids=["__call__", "property", "value", "factory"])
def test_imports_made_as_the_model_runs_are_found_wherever_the_forward_reaches(source, found):
    # Only forward and the functions it called by name were read: verify PASSED two models whose
    # callable object, property or stored function imported a different cfg.py as they ran.
    from bngraph.user_modules import imports_in_forward

    assert bool(imports_in_forward({"model.py": source.encode()}, {"cfg"})) == found
