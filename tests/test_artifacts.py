"""Save/load round trips: every tested model, in this process and in a fresh one."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import bngraph
from bngraph.artifacts import load_artifact
from bngraph.errors import UserError
from tests import models
from tests.conftest import REPO
from tests.util import randomize_bn

CASES = [*models.TRACEABLE, models.Untraceable]


def _inserted(cls):
    x = torch.randn(*cls.example_input_shape, generator=torch.Generator().manual_seed(1))
    out, report = bngraph.insert(cls(), [x])
    return randomize_bn(out, seed=2), x, report


@pytest.mark.parametrize("cls", models.TRACEABLE, ids=lambda c: c.__name__)
def test_round_trip_gives_the_same_module(cls, tmp_path):
    out, x, _ = _inserted(cls)
    bngraph.save(out, tmp_path / "a", example_inputs=[x])
    loaded = bngraph.load(tmp_path / "a")
    assert not isinstance(loaded, torch.fx.GraphModule)  # plain, readable PyTorch
    assert loaded.state_dict().keys() == out.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), out.eval()(x), rtol=0, atol=0)
    loaded.train()(torch.randn(3, *x.shape[1:])).float().sum().backward()  # still trainable
    assert json.loads((tmp_path / "a" / "bngraph.json").read_text())["input_shapes"] == [list(x.shape)]


def test_tied_weights_stay_tied(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    bngraph.save(Tied(), tmp_path / "t", example_inputs=[torch.randn(2, 4)])
    loaded = bngraph.load(tmp_path / "t")
    assert loaded.a.weight is loaded.b.weight


def test_weights_in_a_parameter_list_are_saved_and_load(tmp_path):
    # nn.ParameterList names its entries '0', '1': no attribute, so the generated code registers
    # them by name (it wrote `self.get_submodule('p').0 = ...`, a SyntaxError).
    class ParamList(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(4, 3, 3, 3)), torch.nn.Parameter(torch.randn(4))])
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(torch.nn.functional.conv2d(x, self.p[0], self.p[1])))

    x = torch.randn(2, 3, 8, 8)
    inserted, _ = bngraph.insert(ParamList(), [x])
    bngraph.save(inserted, tmp_path / "i", example_inputs=[x])
    loaded = bngraph.load(tmp_path / "i")
    assert isinstance(loaded.get_parameter("p.0"), torch.nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), inserted.eval()(x), rtol=0, atol=0)


def test_a_model_that_computes_nan_is_saved_as_it_is(tmp_path):
    # NaN is not equal to NaN: the round-trip check must still see the same computation (a user's
    # example with a NaN, a log of a negative, a diverged weight) and not call it a bngraph bug.
    class LogNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.log(self.fc(x))

    torch.manual_seed(0)  # weights for which some outputs are NaN and some not (log of a negative is NaN too)
    net = LogNet()
    with torch.no_grad():
        net.fc.bias[0] = float("nan")
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    bngraph.save(net, tmp_path / "n", example_inputs=[x])
    loaded = bngraph.load(tmp_path / "n")
    with torch.no_grad():
        want, got = net(x), loaded(x)
    assert want.isnan().any() and not want.isnan().all()  # some outputs NaN, some not
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_fresh_process_loads_artifacts_without_the_model_file(tmp_path):
    """A new interpreter that never imports tests/models.py rebuilds every model exactly."""
    expected = {}
    for cls in models.TRACEABLE:
        out, x, _ = _inserted(cls)
        bngraph.save(out, tmp_path / cls.__name__, example_inputs=[x])
        with torch.no_grad():
            expected[cls.__name__] = (x, out.eval()(x))
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, torch, bngraph
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
for name, (x, y) in expected.items():
    model = bngraph.load({str(tmp_path)!r} + "/" + name).eval()
    with torch.no_grad():
        assert torch.equal(model(x), y), name
assert not any("models" in m for m in sys.modules if m.startswith("tests")), "imported the original"
print("ok", len(expected))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok {len(models.TRACEABLE)}"


POSTPONED_ANNOTATIONS_PY = """
from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):  # monai's style: every file postpones its annotations
    example_input_shape = (2, 8)

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.a(x))
        return self.b(h), h
"""


def test_a_forward_with_postponed_annotations_saves_as_code(tmp_path):
    # fx keeps "tuple[torch.Tensor, torch.Tensor]" as a global of the graph's code: the save
    # refused it ("has no import path"), and with it monai's VarAutoEncoder.
    (tmp_path / "net.py").write_text(POSTPONED_ANNOTATIONS_PY)
    from bngraph.cli import main

    assert main(["insert", f"{tmp_path / 'net.py'}:Net", "-o", str(tmp_path / "bn")]) == 0
    model = bngraph.load(tmp_path / "bn").eval()
    out = model(torch.randn(3, 8))
    assert isinstance(out, tuple) and [t.shape for t in out] == [(3, 3), (3, 8)]


def test_untraceable_model_round_trips_through_its_source(tmp_path):
    from bngraph.cli import main

    out = tmp_path / "u"
    assert main(["insert", f"{REPO}/tests/models.py:Untraceable", "-o", str(out)]) == 0
    loaded = bngraph.load(out)
    assert isinstance(loaded.act1.bn, torch.nn.BatchNorm1d)
    assert "_BNGRAPH_WRAPS" in (out / "model.py").read_text()


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_code", "bad_json", "missing_weights"])
def test_corrupted_artifacts_are_refused(tmp_path, damage):
    out, x, _ = _inserted(models.Residual)
    folder = bngraph.save(out, tmp_path / "a", example_inputs=[x])
    if damage == "truncate_weights":
        data = (folder / "weights.pt").read_bytes()
        (folder / "weights.pt").write_bytes(data[: len(data) // 2])
    elif damage == "flip_code":
        (folder / "model.py").write_text((folder / "model.py").read_text().replace("relu", "tanh"))
    elif damage == "bad_json":
        (folder / "bngraph.json").write_text("{not json")
    else:
        (folder / "weights.pt").unlink()
    with pytest.raises(UserError, match="corrupted|incomplete"):
        load_artifact(folder)


def test_failed_save_leaves_no_folder(tmp_path):
    class Outer(torch.nn.Module):  # a weight_norm-parametrized layer: no torch.nn constructor builds it
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 4))

        def forward(self, x):
            return self.layer(x)

    with pytest.raises(UserError, match="cannot save layer 'layer'"):
        bngraph.save(Outer(), tmp_path / "x", example_inputs=[torch.randn(2, 3, 4)])
    assert list(tmp_path.iterdir()) == []


FLOAT64_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (4, 3, 8, 8)
    example_input_dtypes = ["float64"]

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.double()

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
'''


def test_a_float64_model_saves_its_layers_and_batchnorms_in_float64(tmp_path):
    # The code written for a layer left its dtype out, so a float64 layer was taken from the
    # user's own class, which has no inserted BN: insert ended in an AttributeError traceback.
    from bngraph.cli import main

    (tmp_path / "net.py").write_text(FLOAT64_MODEL)
    assert main(["insert", str(tmp_path / "net.py"), "-o", str(tmp_path / "inserted")]) == 0
    inserted = bngraph.load(tmp_path / "inserted")
    assert {p.dtype for p in inserted.parameters()} == {torch.float64} and inserted.conv.bias is None
    randomize_bn(inserted)
    torch.save(inserted.state_dict(), tmp_path / "trained.pt")
    assert main(["fold", str(tmp_path / "inserted"), "--weights", str(tmp_path / "trained.pt"),
                 "-o", str(tmp_path / "folded")]) == 0
    folded, x = bngraph.load(tmp_path / "folded"), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), inserted.eval()(x), rtol=1e-10, atol=1e-10)


def test_a_model_built_under_a_float64_default_loads_in_float64_elsewhere(tmp_path):
    # A user's file that calls torch.set_default_dtype(torch.float64): the saved code built its
    # layers without a dtype, so a process with torch's own default made them float32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        inserted, _ = bngraph.insert(model, [torch.randn(3, 4)])
        bngraph.save(inserted, tmp_path / "inserted", example_inputs=[torch.randn(3, 4)])
    finally:
        torch.set_default_dtype(previous)
    assert {p.dtype for p in bngraph.load(tmp_path / "inserted").parameters()} == {torch.float64}


def test_saving_a_model_torch_fx_cannot_trace_says_what_to_do_instead(tmp_path):
    # The README's API flow, insert then save, on a model insert took through its fallback.
    model = models.Untraceable()
    x = torch.randn(*model.example_input_shape, generator=torch.Generator().manual_seed(0))
    inserted, report = bngraph.insert(model, [x])
    assert report.facts["tracing"] == "module-level fallback"
    with pytest.raises(UserError, match=r"cannot save Untraceable as an artifact: .* run the command on the model.s file"):
        bngraph.save(inserted, tmp_path / "out", example_inputs=[x])
    assert not (tmp_path / "out").exists()


# ---- code that depends on the mode, written for both modes -------------------------------------

MODE_DEPENDENT = '''
import torch
import torch.nn.functional as F
from torch import nn


class Noisy(nn.Module):  # a top-level forward that branches on the mode
    example_input_shape = (6, 1, 28, 28)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.fc(x.flatten(1))))
        if self.training:
            h = h * 2.0 + 0.5
        return self.out(h)


class Dropping(Noisy):  # dropout that reads the mode
    def forward(self, x):
        h = torch.relu(self.bn(self.fc(x.flatten(1))))
        return self.out(F.dropout(h, 0.5, training=self.training))
'''


def _assert_same_in_both_modes(model, loaded, x):
    for training in (False, True):
        outputs = []
        for m in (model, loaded):
            m = copy.deepcopy(m).train(training)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(3)
                outputs.append(m(x))
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0, msg=f"training={training}")


@pytest.mark.parametrize("verb", ["train", "recalibrate"])
@pytest.mark.parametrize("name", ["Noisy", "Dropping"])
def test_a_trained_or_recalibrated_model_computes_what_the_users_does_in_both_modes(tmp_path, verb, name):
    # Written from a trace in the mode the model was in: `recalibrate` ran the train-only branch
    # and dropout at inference, `train` lost them for fine-tuning, both checked only against the trace.
    from bngraph.cli import main
    from tests.test_data_formats import write_npz

    (tmp_path / "m.py").write_text(MODE_DEPENDENT)
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    argv = (["train", f"{tmp_path}/m.py:{name}", "--steps", "3", "--batch-size", "8", "--quiet"] if verb == "train" else
            ["recalibrate", f"{tmp_path}/m.py:{name}", "--batches", "2", "--batch-size", "8"])
    assert main([*argv, "--data", str(data), "-o", str(out)]) == 0
    artifact = out / "model" if verb == "train" else out
    loaded = bngraph.load(artifact)
    users = getattr(load_module(tmp_path / "m.py"), name)()
    users.load_state_dict(torch.load(artifact / "weights.pt", weights_only=True))
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    _assert_same_in_both_modes(users, loaded, x)


@pytest.mark.parametrize("training", [True, False])
def test_saving_keeps_dropout_reading_the_mode_whatever_mode_the_model_is_in(tmp_path, training):
    module = load_module_from_text(tmp_path, MODE_DEPENDENT)
    model = randomize_bn(module.Dropping(), seed=1).train(training)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    bngraph.save(model, tmp_path / "a", example_inputs=[x])
    _assert_same_in_both_modes(model, bngraph.load(tmp_path / "a"), x)
    # A branch on the mode in the top-level forward: no traced code holds both modes.
    with pytest.raises(UserError, match="branches on self.training"):
        bngraph.save(module.Noisy().train(training), tmp_path / "b", example_inputs=[x])
    assert not (tmp_path / "b").exists()


def load_module(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"users_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_module_from_text(folder, text):
    (folder / "m.py").write_text(text)
    return load_module(folder / "m.py")


OUTPUT_TYPES = '''
import collections, dataclasses
import torch, torch.nn as nn
try:
    from transformers.modeling_outputs import ModelOutput, SequenceClassifierOutput
except ImportError:  # the HF cases are skipped without it
    ModelOutput, SequenceClassifierOutput = collections.OrderedDict, None

@dataclasses.dataclass
class Heads(ModelOutput):  # a user's own output class, in the model's own file
    logits: torch.Tensor = None
    features: torch.Tensor = None

class Net(nn.Module):
    example_input_shape = (4, 8)
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)
    def forward(self, x):
        h = self.act(self.fc1(x))
        y = self.fc2(h)
        if self.kind == "hf":
            return SequenceClassifierOutput(logits=y, hidden_states=(h,))
        if self.kind == "ordered":
            return collections.OrderedDict(z=y, a=h)
        return Heads(logits=y, features=h)

def HF(): return Net("hf")
def Ordered(): return Net("ordered")
def Own(): return Net("own")
'''


@pytest.mark.parametrize("symbol", ["HF", "Ordered", "Own"])
@pytest.mark.parametrize("verb", ["insert", "fold"])
def test_a_model_returning_a_modeloutput_or_ordered_dict_gets_its_type_back_from_the_artifact(symbol, verb, tmp_path):
    # torch.fx writes every dict as a plain one: `out.logits` of the saved model raised.
    from bngraph.cli import main

    if symbol != "Ordered":
        pytest.importorskip("transformers")
    (tmp_path / "m.py").write_text(OUTPUT_TYPES)
    argv = [verb, f"{tmp_path}/m.py:{symbol}", "-o", str(tmp_path / "out")]
    assert main([*argv, "--input-shape", "4,8"]) == 0
    script = f"""
import sys, bngraph, torch
sys.path.insert(0, {str(tmp_path)!r})
import m
x = torch.randn(5, 8)
want = getattr(m, {symbol!r})().eval()(x)
got = bngraph.load({str(tmp_path / "out")!r}).eval()(x)
assert type(got).__name__ == type(want).__name__, (type(got), type(want))
assert list(got.keys()) == list(want.keys()), (list(got.keys()), list(want.keys()))
print(type(got).__name__, got[list(got.keys())[0]].shape[0])
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "5"


GLOBAL_HOOK = '''
import torch, torch.nn as nn

def _double_convs(module, inputs, output):
    return output * 2 if isinstance(module, nn.Conv2d) else None

nn.modules.module.register_module_forward_hook(_double_convs)

class Net(nn.Module):
    example_input_shape = (2, 3, 28, 28)
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)
    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
'''


@pytest.mark.parametrize("verb", ["insert", "fold", "train"])
def test_a_hook_registered_for_every_module_is_refused_before_writing(verb, tmp_path):
    # The artifact had no hook; the check ran in this process, where the hook ran on it too, and
    # passed: loaded elsewhere, the model was off by twice its RMS.
    from tests.test_data_formats import write_npz

    (tmp_path / "m.py").write_text(GLOBAL_HOOK)
    extra = ["--data", str(write_npz(tmp_path / "d.npz", layout="NCHW")), "--steps", "2", "--quiet"] if verb == "train" else []
    script = f"""
import sys
from bngraph.cli import main
sys.exit(main({[verb, f"{tmp_path}/m.py:Net", "-o", str(tmp_path / "out"), *extra]!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "a global forward hook is registered for every module" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


NUMPY_MASK = '''
import numpy as np
import torch, torch.nn as nn

class Net(nn.Module):  # a train-mode mask drawn with numpy, as HuggingFace's SpecAugment draws it
    example_input_shape = (4, 16)
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)
    def forward(self, x):
        h = self.fc1(x)
        if self.training:
            h = h * torch.from_numpy(np.random.rand(*h.shape) > 0.3).to(h.dtype)
        return self.fc2(self.act(h))
'''


def test_a_model_drawing_with_numpy_in_train_mode_is_written(tmp_path, capsys):
    # Each run of the train-mode check drew another mask: refused as "computes something else in train mode".
    from bngraph.cli import main

    (tmp_path / "m.py").write_text(NUMPY_MASK)
    assert main(["insert", f"{tmp_path}/m.py:Net", "-o", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    state = np.random.get_state()[1].copy()
    bngraph.load(tmp_path / "out")
    assert (np.random.get_state()[1] == state).all()  # the caller's numpy generator is left as it was


SET_AFTER = '''
import dataclasses
from typing import Optional
import torch, torch.nn as nn
from transformers.modeling_outputs import ModelOutput

@dataclasses.dataclass
class Out(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
    def forward(self, x):
        out = Out(logits=self.b(torch.relu(self.bn(self.a(x)))))
        out.loss = out.logits.pow(2).mean()  # set after: the key comes after logits
        return out
'''


def test_a_modeloutput_whose_keys_are_not_in_field_order_is_never_rebuilt_reordered(tmp_path):
    # Rebuilt as Out(**items), the loss came first: out[0] was the loss, not the logits, silently.
    pytest.importorskip("transformers")
    module = load_module_from_text(tmp_path, SET_AFTER)
    model = randomize_bn(module.Net(), seed=1).eval()
    x = torch.randn(5, 4)
    folded, _ = bngraph.fold(model, [x])
    got, want = folded(x), model(x)
    assert list(got.keys()) == list(want.keys())
    torch.testing.assert_close(list(got.values())[0], want[0])


REBUILT_OTHERWISE = '''
import collections, dataclasses
from typing import Optional
import torch, torch.nn as nn
from transformers.modeling_outputs import ModelOutput

@dataclasses.dataclass
class Scaled(collections.OrderedDict):  # its own __post_init__ changes a value: built twice, twice divided
    logits: torch.Tensor = None
    def __post_init__(self):
        self["logits"] = self.logits = self.logits / 2

@dataclasses.dataclass
class Out(ModelOutput):
    logits: torch.Tensor = None
    feats: Optional[torch.Tensor] = None

class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.a, self.bn, self.b = kind, nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
    def forward(self, x):
        y = self.b(torch.relu(self.bn(self.a(x))))
        if self.kind == "scaled":
            return Scaled(logits=y)
        out = Out(logits=y, feats=2 * y)
        out.feats = None  # HF keeps the key, holding the tensor, where the attribute is None
        return out
'''


@pytest.mark.parametrize("kind", ["scaled", "set-to-none"])
def test_an_output_that_building_again_would_change_stays_a_dict(kind, tmp_path):
    # Rebuilt in the graph, the logits were divided twice (insert said "nothing changed"), and a
    # field set to None came back holding its tensor.
    pytest.importorskip("transformers")
    module = load_module_from_text(tmp_path, REBUILT_OTHERWISE)
    model = randomize_bn(module.Net(kind), seed=1).eval()
    x = torch.randn(5, 4)
    for verb in (bngraph.insert, bngraph.fold):
        result = verb(model, [x])[0].eval()
        with torch.no_grad():
            got, want = result(x), model(x)
        assert type(got) is dict or type(got) is type(want)
        torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)
        assert getattr(got, "feats", None) is None


def test_a_scripts_own_output_class_is_not_written_as_an_import_from_main(tmp_path):
    # `from __main__ import MyOut` in model.py: the check passed in the script's process, and every
    # other process failed to load the artifact.
    pytest.importorskip("transformers")
    script = f"""
import dataclasses, torch, torch.nn as nn, bngraph
from transformers.modeling_outputs import ModelOutput

@dataclasses.dataclass
class MyOut(ModelOutput):
    logits: torch.Tensor = None

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)
    def forward(self, x):
        return MyOut(logits=self.fc2(self.act(self.fc1(x))))

x = torch.randn(2, 4)
bngraph.save(bngraph.insert(Net(), [x])[0], {str(tmp_path / "art")!r}, example_inputs=[x])
"""
    for code in (script, f"import bngraph\nbngraph.load({str(tmp_path / 'art')!r})"):
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_the_callers_numpy_generator_is_left_as_it_was(tmp_path):
    # A model drawing from numpy as it runs moved the caller's numpy state (torch's and Python's were put back).
    module = load_module_from_text(tmp_path, NUMPY_MASK)
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    bngraph.insert(module.Net(), [torch.randn(4, 16)])
    assert np.random.rand() == expected
