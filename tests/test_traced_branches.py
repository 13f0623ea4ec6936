"""Forwards that branch on shapes or on the mode, traced where the branch is a fact of the
example (`bngraph.trace._Tracer`, `bngraph.partial_trace.InsertTracer`), and refused where it is not.

Whisper's encoder begins with `if input_features.shape[-1] != expected_seq_length: raise`,
HuggingFace's attention checks `attn_weights.size()`, monai's SegResNetDS loops over
`x.shape[2:]`, and BART's encoder skips layers `if self.training and self.layerdrop > 0.0`.
torch.fx stops at each; insert then fell back to wrapping activation modules, and the
nonlinearities called as functions (Whisper's `F.gelu`) got no BatchNorm. Now the graph holds the
branch the example takes, with a guard that raises where a later input would take another, and
a branch on the batch size, on data or on a mode that changes the graph is still refused.
"""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bngraph
from bngraph.cli import main
from tests.util import randomize_bn

GEN = torch.Generator().manual_seed(0)


def _x(*shape):
    return torch.randn(*shape, generator=GEN)


AUDIO_FILE = textwrap.dedent(
    '''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class AudioEncoder(nn.Module):
        """Whisper's encoder stem in miniature: a check of the frame count, then two convs, each
        followed by F.gelu, and a pooled length that depends on the input's length."""

        example_input_shape = (3, 8, 32)

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv1d(8, 16, 3, padding=1)
            self.conv2 = nn.Conv1d(16, 16, 3, stride=2, padding=1)
            self.proj = nn.Linear(16, 4)
            self.expected_seq_length = 32

        def forward(self, input_features):
            if input_features.shape[-1] != self.expected_seq_length:
                raise ValueError(f"expected {self.expected_seq_length} frames, got {input_features.shape[-1]}")
            h = F.gelu(self.conv1(input_features))
            h = F.gelu(self.conv2(h))
            if h.shape[-1] > 8:  # long inputs are pooled: which branch depends on the length
                h = F.avg_pool1d(h, 2)
            return self.proj(h.permute(0, 2, 1))
    '''
)


def _audio_model(tmp_path):
    (tmp_path / "audio.py").write_text(AUDIO_FILE)
    return bngraph.load(f"{tmp_path / 'audio.py'}:AudioEncoder")


def test_a_shape_check_in_the_forward_is_traced_and_every_gelu_gets_its_batchnorm(tmp_path):
    model = _audio_model(tmp_path)
    x = _x(3, 8, 32)
    bn_model, report = bngraph.insert(model, [x], preserve=True)
    assert report.facts["tracing"] == "torch.fx"
    inserted = {(r["activation"], r["features"]) for r in report.sections["inserted"]}
    assert inserted == {("gelu", 16)} and len(report.sections["inserted"]) == 2
    assert bn_model.conv1.bias is None and bn_model.conv2.bias is None  # redundant before a BN: dropped
    # The batch size is free: at 1 and 5 the graph computes what the model does.
    for batch in (1, 5):
        probe = _x(batch, 8, 32)
        with torch.no_grad():
            torch.testing.assert_close(bn_model.eval()(probe), model.eval()(probe), rtol=1e-5, atol=1e-5)


def test_an_input_that_would_take_another_branch_is_refused_by_the_graph_not_computed_wrong(tmp_path):
    model = _audio_model(tmp_path)

    class Shorter(nn.Module):  # the same model without its own frame check: only the pooling branch decides
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_features):
            inner = self.inner
            h = F.gelu(inner.conv1(input_features))
            h = F.gelu(inner.conv2(h))
            if h.shape[-1] > 8:
                h = F.avg_pool1d(h, 2)
            return inner.proj(h.permute(0, 2, 1))

    net = Shorter()
    bn_model, report = bngraph.insert(net, [_x(3, 8, 32)])
    assert report.facts["tracing"] == "torch.fx"
    short = _x(3, 8, 12)  # 6 frames after conv2: the model itself skips the pooling
    assert net(short).shape == (3, 6, 4)
    with pytest.raises(ValueError, match=r"branches on shapes at .*test_traced_branches\.py:\d+, traced where that gave True; "
                                         r"here it gives False"):
        bn_model(short)


def test_a_branch_on_the_batch_size_is_not_taken_from_the_example():
    class SqueezeSingle(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            if x.shape[0] == 1:  # another batch size takes the other branch: no graph holds both
                return h.squeeze(0)
            return h

    model = SqueezeSingle()
    bn_model, report = bngraph.insert(model, [_x(4, 4)])
    assert report.facts["tracing"] == "module-level fallback"
    assert "if x.shape[0] == 1:" in " ".join(report.notes)
    with torch.no_grad():
        assert bn_model.eval()(_x(1, 4)).shape == (4,)  # the model's own code still runs


def test_a_loop_over_the_spatial_shape_is_traced():
    class ShapeFactorNet(nn.Module):  # monai's SegResNetDS checks each spatial size this way
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x):
            if not all(size % factor == 0 for size, factor in zip(x.shape[2:], (4, 4))):
                raise ValueError("spatial sizes must be multiples of 4")
            return F.silu(self.conv(x))

    model = ShapeFactorNet()
    bn_model, report = bngraph.insert(model, [_x(2, 3, 8, 8)], preserve=True)
    assert report.facts["tracing"] == "torch.fx"
    assert [(r["activation"], r["features"]) for r in report.sections["inserted"]] == [("silu", 6)]
    # Only what the loop's body decided is fixed: another size that passes the check runs...
    probe = _x(3, 3, 12, 8)
    with torch.no_grad():
        torch.testing.assert_close(bn_model.eval()(probe), model.eval()(probe), rtol=1e-5, atol=1e-5)
    # ...and one that fails it fails in the graph too, saying why, where the model raised its own error.
    with pytest.raises(ValueError, match="multiples of 4"):
        model(_x(2, 3, 10, 8))
    with pytest.raises(ValueError, match=r"branches on shapes at .*test_traced_branches\.py"):
        bn_model(_x(2, 3, 10, 8))
    # The guarded graph traces again: fold folds it as a graph (the length check once went into
    # the graph as `len`, which torch.fx cannot trace a second time).
    folded, report = bngraph.fold(randomize_bn(bn_model), [_x(2, 3, 8, 8)])
    assert "tracing" not in report.facts and report.facts["batchnorms_after"] == 0


class HeadsAttention(nn.Module):
    """HuggingFace's attention since transformers 4.48: `(*input_shape, -1, head_dim)` asks the
    length of a shape before it unpacks it, where torch.fx stopped (`len` on a Proxy)."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.head_dim = dim // heads
        self.qkv = nn.ModuleList([nn.Linear(dim, dim) for _ in range(3)])
        self.mlp = nn.Linear(dim, dim)

    def forward(self, hidden_states):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(hidden_shape).transpose(1, 2) for proj in self.qkv)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(*input_shape, -1)
        return F.gelu(self.mlp(attended))


def test_a_shape_unpacked_into_a_tuple_is_traced_and_checked():
    model = HeadsAttention()
    bn_model, report = bngraph.insert(model, [_x(3, 5, 8)], preserve=True)
    assert report.facts["tracing"] == "torch.fx" and report.sections["opaque"] == []
    assert [(r["activation"], r["features"]) for r in report.sections["inserted"]] == [("gelu", 8)]
    # The batch and the sequence length stay free...
    for shape in ((1, 5, 8), (4, 9, 8)):
        probe = _x(*shape)
        with torch.no_grad():
            torch.testing.assert_close(bn_model.eval()(probe), model.eval()(probe), rtol=1e-5, atol=1e-5)
    # ...and an input of another rank, whose shape unpacks to another length, is refused by the graph.
    with pytest.raises(ValueError, match=r"branches on shapes at .*test_traced_branches\.py"):
        bn_model(_x(2, 3, 5, 8))


class LayerDropEncoder(nn.Module):
    """BART's encoder loop: in training, each layer is skipped with probability `layerdrop`."""

    def __init__(self, layerdrop: float):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.layerdrop = layerdrop

    def forward(self, x):
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0:
                if torch.rand([]) < self.layerdrop:
                    continue
            x = F.gelu(layer(x))
        return x


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_branch_on_the_mode_that_changes_nothing_is_traced(mode):
    model = LayerDropEncoder(0.0).train(mode == "train")
    bn_model, report = bngraph.insert(model, [_x(6, 8)])
    assert report.facts["tracing"] == "torch.fx"
    assert [r["node"] for r in report.sections["inserted"]] == ["gelu", "gelu_1"]
    assert isinstance(bn_model, torch.fx.GraphModule)


class NoisyInTraining(nn.Module):
    """Gaussian noise on the features in training only (an augmentation inside the model)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return F.gelu(self.fc(x))


@pytest.mark.parametrize(("model", "reason"), [
    (NoisyInTraining(), r"branches on self\.training at .*test_traced_branches\.py:\d+, and the other mode traces to another graph"),
    # The draw decides in Python: a graph would keep the one choice made while tracing, in either mode.
    (LayerDropEncoder(0.5), r"draws random numbers that its input does not feed"),
])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_branch_on_the_mode_that_changes_the_graph_is_refused_saying_why(model, reason, mode):
    state = torch.random.get_rng_state()
    bn_model, report = bngraph.insert(model.train(mode == "train"), [_x(6, 8)])
    assert report.facts["tracing"] == "module-level fallback"
    assert re.search(reason, " ".join(report.notes))
    assert torch.equal(torch.random.get_rng_state(), state)  # what tracing drew is put back


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_guarded_graph_goes_through_the_whole_chain(tmp_path, capsys):
    (tmp_path / "audio.py").write_text(AUDIO_FILE)
    model, bn, folded, onnx = f"{tmp_path / 'audio.py'}:AudioEncoder", tmp_path / "bn", tmp_path / "folded", tmp_path / "m.onnx"
    code, out, err = _cli(capsys, "insert", model, "--preserve", "-o", bn, "--json")
    assert code == 0, err
    assert json.loads(out)["tracing"] == "torch.fx"
    assert "check_traced_shapes" in (bn / "model.py").read_text()  # the guard is part of the saved code
    # model.py says "Plain PyTorch: import it": where bngraph is not installed too (it imported
    # its guards from bngraph.trace).
    x = _x(5, 8, 32)
    torch.save(x, tmp_path / "x.pt")
    plain = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import importlib.util, sys, torch
        sys.modules["bngraph"] = None  # a machine with torch alone
        spec = importlib.util.spec_from_file_location("m", {str(bn / "model.py")!r})
        code = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(code)
        model = code.BngraphModel()
        model.load_state_dict(torch.load({str(bn / "weights.pt")!r}, weights_only=True))
        torch.save(model.eval()(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
        try:
            model(torch.randn(2, 8, 40))
        except ValueError as err:
            print(err)
    """)], capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "branches on shapes" in plain.stdout
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), bngraph.load(bn).eval()(x))
    code, out, err = _cli(capsys, "fold", bn, "-o", folded, "--strict")
    assert code == 0, err
    code, out, err = _cli(capsys, "export", folded, "-o", onnx)  # verified at other batch sizes before it appears
    assert code == 0, err
    code, out, err = _cli(capsys, "verify", model, onnx)
    assert code == 0, out + err
    loaded = bngraph.load(folded)
    with pytest.raises(ValueError, match="branches on shapes"):
        loaded(_x(2, 8, 40))


LOOP_OVER_SIZES_PY = """
import torch.nn.functional as F
from torch import nn

example_input_shape = (2, 3, 8, 8)


class ShapeFactorNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        if not all(size % factor == 0 for size, factor in zip(x.shape[2:], (4, 4))):
            raise ValueError("spatial sizes must be multiples of 4")
        return F.silu(self.conv(x))
"""


def test_a_saved_loop_over_sizes_checks_them_where_bngraph_is_not_installed(tmp_path, capsys):
    # Its length check calls the shapes check: written out, model.py needs both.
    (tmp_path / "net.py").write_text(LOOP_OVER_SIZES_PY)
    code, _, err = _cli(capsys, "insert", f"{tmp_path / 'net.py'}:ShapeFactorNet", "-o", tmp_path / "bn")
    assert code == 0, err
    assert "check_traced_length" in (tmp_path / "bn" / "model.py").read_text()
    plain = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import importlib.util, sys, torch
        sys.modules["bngraph"] = None
        spec = importlib.util.spec_from_file_location("m", {str(tmp_path / "bn" / "model.py")!r})
        code = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(code)
        model = code.BngraphModel().eval()
        print(tuple(model(torch.randn(2, 3, 12, 8)).shape))
        try:
            model(torch.randn(2, 3, 10, 8))
        except ValueError as err:
            print(err)
    """)], capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("(2, 6, 12, 8)\n") and "branches on shapes" in plain.stdout


class WindowedBlock(nn.Module):
    """Swin's layer: it shrinks its window to the input when the input is smaller, setting the
    attribute in its forward (HF's `set_shift_and_window_size`)."""

    def __init__(self):
        super().__init__()
        self.window_size, self.fc = 4, nn.Linear(6, 6)

    def forward(self, x):  # (N, T, 6)
        if x.shape[1] <= self.window_size:
            self.window_size = x.shape[1]
        windows = x.unflatten(1, (-1, self.window_size))
        return F.gelu(self.fc(windows)).flatten(1, 2)


def test_a_forward_that_sets_an_attribute_stays_whole_and_the_model_is_left_as_it_was():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.block = nn.Linear(6, 6), WindowedBlock()

        def forward(self, x):
            return self.block(F.relu(self.proj(x)))

    model = Net()
    bn_model, report = bngraph.insert(model, [_x(2, 3, 6)], preserve=True)
    assert report.facts["tracing"] == "torch.fx"
    (opaque,) = report.sections["opaque"]
    assert opaque["module"] == "block" and "sets self.window_size in its forward" in opaque["reason"]
    # The block runs its own code on every call: its window follows each input, as the model's does.
    for length in (3, 6):
        probe = _x(2, length, 6)
        with torch.no_grad():
            torch.testing.assert_close(bn_model.eval()(probe), model.eval()(probe), rtol=1e-5, atol=1e-5)
        assert bn_model.block.window_size == model.block.window_size


class ClipsItsGradientWhenTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.act, self.head = nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        if h.requires_grad:  # only while gradients flow
            h.register_hook(lambda g: g.clamp(-0.01, 0.01))
        return self.head(self.act(h))


def test_a_branch_on_requires_grad_is_not_fixed_at_the_traces_value():
    # The trace runs without gradients: the branch was kept False behind a shape guard, and
    # every training step of the inserted model raised "branches on shapes".
    model = ClipsItsGradientWhenTraining()
    out, report = bngraph.insert(model, [_x(2, 3, 8, 8)])
    assert report.facts["tracing"] == "module-level fallback"
    assert "it branches on a tensor's requires_grad" in report.notes[-1]
    x = _x(4, 3, 8, 8)
    out.train()(x).square().sum().backward()
    assert out.stem.weight.grad is not None
