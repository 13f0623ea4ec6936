"""insert's module-level fallback, decided by running the model: the sites, the axes, the dtypes,
and an artifact that fold, export and verify take. Models are written as HuggingFace writes them:
blocks holding conv/normalization/activation as attributes, activation classes wrapping
F.gelu, a shape check in forward (what stops torch.fx), layers held as plain attributes."""

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bngraph
from bngraph.cli import main
from bngraph.passes.wrap_activation_modules import wrap_activation_modules
from bngraph.trace import copy_module
from tests.util import randomize_bn


class GELUActivation(nn.Module):
    """HuggingFace's: the function is an attribute, so the module is no nn.GELU."""

    def __init__(self):
        super().__init__()
        self.act = F.gelu

    def forward(self, input):
        return self.act(input)


class SiLUActivation(nn.Module):
    def forward(self, input):
        return input * torch.sigmoid(input)


class NewGELUActivation(nn.Module):
    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class ConvLayer(nn.Module):
    """HF MobileNetV2's block: conv, normalization, activation as attributes, called in order."""

    def __init__(self, cin, cout, stride=1, activation=True):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU6() if activation else None

    def forward(self, features):
        features = self.normalization(self.convolution(features))
        if self.activation is not None:
            features = self.activation(features)
        return features


class HFStyleNet(nn.Module):
    """Conv blocks with their own norms, a residual written in place, a hand-written SiLU after
    a bare conv, and a head whose Linear is a plain attribute behind a Dropout."""

    def __init__(self):
        super().__init__()
        self.stem = ConvLayer(3, 8, stride=2)
        self.block = ConvLayer(8, 8, activation=False)
        self.residual_act = nn.ReLU()
        self.expand = nn.Conv2d(8, 12, 1)
        self.expand_act = SiLUActivation()
        self.proj = nn.Linear(12, 16)
        self.dropout = nn.Dropout(0.1)
        self.intermediate_act_fn = GELUActivation()
        self.head = nn.Linear(16, 5)

    def forward(self, pixel_values):
        if len(pixel_values) == 0:  # len() of a tensor: torch.fx cannot trace it
            raise ValueError("an empty batch")
        x = self.stem(pixel_values)
        hidden = self.block(x)
        hidden += x  # ResNet's `hidden_state += residual`: no longer normalized
        hidden = self.residual_act(hidden)
        hidden = self.expand_act(self.expand(hidden))
        pooled = hidden.mean((2, 3))
        return self.head(self.intermediate_act_fn(self.dropout(self.proj(pooled))))


def _wrap(model, *inputs):
    return wrap_activation_modules(copy_module(model), list(inputs))


def _sites(result):
    return {row["node"]: (row["norm"], row["features"], row["axis"]) for row in result.details}


def _reasons(result):
    return {s.site: s.reason for s in result.skipped}


def test_sites_come_from_what_the_model_runs():
    result = _wrap(HFStyleNet(), torch.randn(4, 3, 16, 16))
    assert _sites(result) == {
        "residual_act": ("BatchNorm2d", 8, "1"),  # behind the in-place add: the conv's channels
        "expand_act": ("BatchNorm2d", 12, "1"),  # a hand-written SiLU is an activation
        "intermediate_act_fn": ("BatchNorm1d", 16, "1"),  # proj's features, found through the Dropout
    }
    assert _reasons(result) == {"stem.activation": "input already normalized by stem.normalization (BatchNorm2d)"}
    wrapped = result.graph
    assert isinstance(wrapped.intermediate_act_fn, nn.Sequential)
    assert isinstance(wrapped.intermediate_act_fn.act, GELUActivation)


def test_insert_uses_the_fallback_and_preserve_keeps_the_eval_function():
    model = randomize_bn(HFStyleNet()).eval()
    x = torch.randn(4, 3, 16, 16)
    out, report = bngraph.insert(model, [x], preserve=True)
    assert report.facts["tracing"] == "module-level fallback"
    assert {r["node"] for r in report.sections["inserted"]} == {"residual_act", "expand_act", "intermediate_act_fn"}
    y = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        first, second = out.eval()(y), out.eval()(y)
        torch.testing.assert_close(first, model(y), rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)
    out.train()(torch.randn(6, 3, 16, 16)).sum().backward()  # trainable


class TokenMixer(nn.Module):
    """Linear on (N, T, C), held as a plain attribute, behind a Dropout: features in the last axis."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 10)
        self.drop = nn.Dropout(0.0)
        self.act = NewGELUActivation()

    def forward(self, x):
        if len(x) == 0:  # len() of a tensor: torch.fx cannot trace it
            raise ValueError("an empty batch")
        return self.act(self.drop(self.fc(x)))


def test_features_in_the_last_axis_of_a_sequence_get_a_batchnorm_over_that_axis():
    # T == 10 == C: a BatchNorm1d over axis 1 would run without error, normalizing over time.
    model = TokenMixer()
    x = torch.randn(4, 10, 6)
    result = _wrap(model, x)
    assert _sites(result) == {"act": ("BatchNorm1d", 10, "last")}
    bn = result.graph.act.bn.norm
    assert isinstance(bn, nn.BatchNorm1d) and result.details[0]["bn"] == "act.bn.norm"
    bn.momentum = None  # a cumulative average: after one batch, that batch's statistics
    result.graph.train()(x)
    features = model.fc(x).detach().reshape(-1, 10)  # each feature over every example and position
    torch.testing.assert_close(bn.running_mean, features.mean(0))
    torch.testing.assert_close(bn.running_var, features.var(0))


def test_linear_on_a_batch_of_vectors_gets_its_output_features():
    result = _wrap(TokenMixer(), torch.randn(4, 6))
    assert _sites(result) == {"act": ("BatchNorm1d", 10, "1")}


def test_linear_held_in_a_plain_list_is_still_found_by_running():
    class Held(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(6, 12)]  # not registered: no module path, only its F.linear call
            self.act = nn.Tanh()

        def forward(self, x):
            if len(x) == 0:  # len() of a tensor: torch.fx cannot trace it
                raise ValueError
            return self.act(self.layers[0](x))

    result = _wrap(Held(), torch.randn(4, 6))
    assert _sites(result) == {"act": ("BatchNorm1d", 12, "1")}
    assert result.details[0]["input"] == "linear"


class PerChannelPReLU(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, dtype=dtype)
        self.act = nn.PReLU(6, dtype=dtype)
        self.head = nn.Conv2d(6, 2, 1, dtype=dtype)

    def forward(self, x):
        if len(x) == 0:  # len() of a tensor: torch.fx cannot trace it
            raise ValueError("an empty batch")
        return self.head(self.act(self.conv(x)))


def test_per_channel_prelu_is_wrapped():
    result = _wrap(PerChannelPReLU(), torch.randn(2, 3, 8, 8))
    assert _sites(result) == {"act": ("BatchNorm2d", 6, "1")}
    assert result.graph.act.act.num_parameters == 6


def test_float64_model_gets_float64_batchnorms_and_keeps_its_function():
    model = PerChannelPReLU(torch.float64).eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    out, report = bngraph.insert(model, [x], preserve=True)
    assert report.sections["inserted"][0]["features"] == 6
    bn = out.act.bn
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float64
    y = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(y), model(y), rtol=1e-10, atol=1e-10)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: untraceable
            x = x / 2
        return self.fc2(F.relu(self.fc1(x))).sigmoid()


def test_functional_nonlinearities_are_reported_not_silently_ignored():
    result = _wrap(Functional(), torch.randn(4, 4))
    assert result.changed == []
    assert _reasons(result) == {
        "forward:relu#0": "relu called as a function in the model's forward: without a traced graph only activation "
        "modules can be wrapped",
        "forward:sigmoid#1": "sigmoid called as a function in the model's forward: without a traced graph only "
        "activation modules can be wrapped",
    }
    # and insert's report does not say that nothing needed a BatchNorm
    _, report = bngraph.insert(Functional(), [torch.randn(4, 4)])
    assert "nothing changed: 2 nonlinearities got no BatchNorm (see 'skipped' for why)" in report.notes
    _, report = bngraph.insert(bngraph.insert(HFStyleNet(), [torch.randn(4, 3, 16, 16)])[0], [torch.randn(4, 3, 16, 16)])
    assert "nothing changed: no nonlinearity needs a BatchNorm (already inserted?)" in report.notes


class InPlaceReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        if len(x) == 0:  # len() of a tensor: torch.fx cannot trace it
            raise ValueError
        y = self.conv(x)
        z = self.act(y)  # mutates y: y and z are one tensor
        return z + y


class InPlaceResultDropped(InPlaceReused):
    def forward(self, x):
        if len(x) == 0:
            raise ValueError
        y = self.conv(x)
        self.act(y)  # y is activated, though its result is not used: wrapped, y stayed as it was
        return y


@pytest.mark.parametrize("model", [InPlaceReused, InPlaceResultDropped])
def test_an_in_place_activation_is_skipped(model):
    result = _wrap(model(), torch.randn(2, 3, 4, 4))
    assert result.changed == []
    assert "in-place activation (inplace=True)" in _reasons(result)["act"]


class SharedAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.Tanh()

    def forward(self, x):
        if len(x) == 0:  # len() of a tensor: torch.fx cannot trace it
            raise ValueError
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_shared_activation_module_is_refused():
    result = _wrap(SharedAct(), torch.randn(3, 4))
    assert _reasons(result) == {"act": "called 2 times; without a graph one BatchNorm would mix their statistics"}


def test_already_wrapped_model_is_left_as_it_is():
    once = _wrap(HFStyleNet(), torch.randn(4, 3, 16, 16)).graph
    again = _wrap(once, torch.randn(4, 3, 16, 16))
    assert again.changed == []


HF_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn
    import torch.nn.functional as F


    class GELUActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = F.gelu

        def forward(self, input):
            return self.act(input)


    class ConvLayer(nn.Module):
        def __init__(self, cin, cout, stride=1, activation=True):
            super().__init__()
            self.convolution = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.normalization = nn.BatchNorm2d(cout)
            self.activation = nn.ReLU6() if activation else None

        def forward(self, x):
            x = self.normalization(self.convolution(x))
            return self.activation(x) if self.activation is not None else x


    class Net(nn.Module):
        example_input_shape = (4, 3, 8, 8)

        def __init__(self):
            super().__init__()
            self.stem, self.block = ConvLayer(3, 8, 2), ConvLayer(8, 8, activation=False)
            self.conv, self.act = nn.Conv2d(8, 8, 1), nn.ReLU()
            self.proj, self.dropout, self.gelu = nn.Linear(8, 16), nn.Dropout(0.1), GELUActivation()
            self.head = nn.Linear(16, 3)
            with torch.no_grad():
                for bn in (self.stem.normalization, self.block.normalization):
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.normal_()
                    bn.bias.normal_()

        def forward(self, pixel_values):
            pixel_values = pixel_values.clone()
            pixel_values[:, :, 0, 0] = 0  # item assignment (wav2vec2 writes its masks so): torch.fx cannot trace it
            x = self.stem(pixel_values)
            y = self.block(x)
            y += x
            y = self.act(self.conv(y))
            return self.head(self.gelu(self.dropout(self.proj(y.mean((2, 3))))))
    """
)


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_fallback_artifact_folds_exports_and_verifies(tmp_path, capsys):
    """Whatever insert writes, fold and export take: the artifact is the user's source plus the
    recorded wraps, and fold folds each wrapped BN into the layer that produced its input."""
    (tmp_path / "hf.py").write_text(HF_FILE)
    bn_dir, folded, onnx = tmp_path / "bn", tmp_path / "folded", tmp_path / "m.onnx"
    code, out, err = _cli(capsys, "insert", f"{tmp_path / 'hf.py'}:Net", "--preserve", "-o", bn_dir)
    assert code == 0, err
    assert "module-level fallback" in out
    code, out, err = _cli(capsys, "fold", bn_dir, "-o", folded, "--strict", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {(r["node"], r["into"]) for r in report["folded"]} == {
        ("stem.normalization", "stem.convolution"), ("block.normalization", "block.convolution"),
        ("act.bn", "conv"), ("gelu.bn", "proj"),
    }
    assert report["batchnorms_after"] == 0
    loaded = bngraph.load(folded)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.modules())
    # Two edit steps (insert's wraps, fold's folds) on the user's source; what applies them once.
    source = (folded / "model.py").read_text()
    assert source.startswith(HF_FILE) and source.count("# --- Appended by bngraph:") == 2
    assert source.count("def _bngraph_edit(") == 1
    code, out, err = _cli(capsys, "fold", folded, "-o", tmp_path / "again")  # nothing left to fold: nothing appended
    assert code == 0, err
    assert (tmp_path / "again" / "model.py").read_text() == source
    code, out, err = _cli(capsys, "verify", bn_dir, folded)
    assert code == 0, out + err
    code, out, err = _cli(capsys, "export", folded, "-o", onnx)  # verified against `folded` before it appears
    assert code == 0, err
    assert onnx.is_file()


GPT_FILE = textwrap.dedent(
    """
    import math
    import torch
    from torch import nn


    class Conv1D(nn.Module):  # HuggingFace's: a Linear whose weight is stored (in, out)
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
            self.bias = nn.Parameter(torch.randn(nf) * 0.1)

        def forward(self, x):
            size_out = x.size()[:-1] + (self.nf,)
            x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
            return x.view(size_out)


    class NewGELUActivation(nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


    class GPT2MLP(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)
            self.act, self.dropout = NewGELUActivation(), nn.Dropout(0.1)

        def forward(self, hidden_states):
            return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


    class FeedForward(nn.Module):  # wav2vec2's and ConvBERT's: nn.Linear and an activation module
        def __init__(self, d):
            super().__init__()
            self.intermediate_dense, self.intermediate_act_fn = nn.Linear(d, 3 * d), nn.GELU()
            self.output_dense = nn.Linear(3 * d, d)

        def forward(self, hidden_states):
            return self.output_dense(self.intermediate_act_fn(self.intermediate_dense(hidden_states)))


    class Net(nn.Module):
        example_input_shape = (2, 6, 8)

        def __init__(self, d=8):
            super().__init__()
            self.ln_1, self.mlp, self.feed_forward = nn.LayerNorm(d), GPT2MLP(d), FeedForward(d)
            self.score = nn.Linear(d, 3)

        def forward(self, inputs_embeds):
            inputs_embeds = inputs_embeds.clone()
            inputs_embeds[:, 0] = 0  # item assignment (wav2vec2 writes its masks so): torch.fx cannot trace it
            hidden_states = inputs_embeds + self.mlp(self.ln_1(inputs_embeds))
            hidden_states = hidden_states + self.feed_forward(hidden_states)
            return self.score(hidden_states.mean(1))
    """
)

SEQUENCES_PY = textwrap.dedent(
    """
    import torch
    from torch.utils.data import TensorDataset


    def make():  # (T, C) sequences for a model taking (N, T, C)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(96, 6, 8, generator=gen)
        y = (x[:, :, 0].mean(1) > 0).long() + (x[:, :, 1].mean(1) > 0).long()
        return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    """
)


def test_a_transformer_mlp_gets_batchnorms_over_its_features_which_fold_into_conv1d_and_linear(tmp_path, capsys):
    """A GPT-2-style model fx cannot trace: the MLP's features are the last axis of (N, T, C), made
    by HuggingFace's Conv1D (addmm, then a view) and by nn.Linear. insert, train on a factory of
    sequences, fold, export and verify, through the command line."""
    (tmp_path / "gpt.py").write_text(GPT_FILE)
    (tmp_path / "seqs.py").write_text(SEQUENCES_PY)
    bn_dir, run, folded, onnx = tmp_path / "bn", tmp_path / "run", tmp_path / "folded", tmp_path / "m.onnx"
    code, out, err = _cli(capsys, "insert", f"{tmp_path / 'gpt.py'}:Net", "-o", bn_dir, "--json")
    assert code == 0, err
    inserted = {r["node"]: (r["features"], r["axes"], r["bn"]) for r in json.loads(out)["inserted"]}
    assert inserted == {
        "mlp.act": (32, "last", "mlp.act.bn.norm"),
        "feed_forward.intermediate_act_fn": (24, "last", "feed_forward.intermediate_act_fn.bn.norm"),
    }
    code, out, err = _cli(capsys, "train", bn_dir, "--data", f"{tmp_path / 'seqs.py'}:make", "--steps", 12,
                          "--batch-size", 16, "-o", run)
    assert code == 0, err  # the trained model is saved as the source it came from: fx cannot trace it
    trained = bngraph.load(run / "model")
    assert trained.mlp.act.bn.norm.num_batches_tracked == 12
    code, out, err = _cli(capsys, "fold", run / "model", "-o", folded, "--strict", "--json")
    assert code == 0, err
    assert {(r["node"], r["into"]) for r in json.loads(out)["folded"]} == {
        ("mlp.act.bn.norm", "mlp.c_fc"), ("feed_forward.intermediate_act_fn.bn.norm", "feed_forward.intermediate_dense"),
    }
    code, out, err = _cli(capsys, "verify", run / "model", folded)
    assert code == 0, out + err
    code, out, err = _cli(capsys, "export", folded, "-o", onnx)
    assert code == 0, err


def test_a_bn_folds_into_a_conv1d_exactly_and_a_look_alike_is_left():
    namespace = {}
    exec(GPT_FILE, namespace)
    model = namespace["Net"]()
    x = torch.randn(5, 4, 8)
    wrapped = randomize_bn(bngraph.insert(model, [x])[0])
    folded, report = bngraph.fold(wrapped, [x])
    assert {r["node"] for r in report.sections["folded"]} == {"mlp.act.bn.norm", "feed_forward.intermediate_act_fn.bn.norm"}
    assert folded.mlp.c_fc.weight.shape == (8, 32)  # still (in, out), as the module computes with it
    with torch.no_grad():
        torch.testing.assert_close(folded(x), wrapped(x), rtol=1e-5, atol=1e-5)

    # The same module computing x @ weight.T (a weight that is (out, in) after all) is no Conv1D.
    class Transposed(namespace["Conv1D"]):
        def forward(self, x):
            size_out = x.size()[:-1] + (self.nf,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight.t()).view(size_out)

    square = namespace["Net"]()
    square.mlp.c_fc = Transposed(8, 8)
    square.mlp.c_proj = namespace["Conv1D"](8, 8)
    wrapped = randomize_bn(bngraph.insert(square, [x])[0])
    folded, report = bngraph.fold(wrapped, [x])
    assert "mlp.act.bn.norm" not in {r["node"] for r in report.sections["folded"]}
    with torch.no_grad():
        torch.testing.assert_close(folded(x), wrapped(x), rtol=1e-5, atol=1e-5)


class SamePadLayer(nn.Module):  # wav2vec2's: an even kernel's extra position cut off
    def __init__(self, num_pad_remove):
        super().__init__()
        self.num_pad_remove = num_pad_remove

    def forward(self, hidden_states):
        if self.num_pad_remove > 0:
            hidden_states = hidden_states[:, :, : -self.num_pad_remove]
        return hidden_states


class PositionalConvEmbedding(nn.Module):
    def __init__(self, weight_norm=False):
        super().__init__()
        self.conv = nn.Conv1d(6, 6, kernel_size=4, padding=2, groups=2)
        if weight_norm:  # as wav2vec2's: the weight computed in each call from two parameters
            self.conv = nn.utils.parametrizations.weight_norm(self.conv, name="weight", dim=2)
        self.padding, self.activation = SamePadLayer(1), GELUActivation()

    def forward(self, hidden_states):
        if len(hidden_states) == 0:  # len() of a tensor: torch.fx cannot trace it
            raise ValueError("an empty batch")
        hidden_states = self.conv(hidden_states.transpose(1, 2))
        hidden_states = self.activation(self.padding(hidden_states))
        return hidden_states.transpose(1, 2)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_a_slice_that_keeps_the_channels_keeps_the_feature_axis_and_the_fold(weight_norm):
    x = torch.randn(4, 10, 6)
    result = _wrap(PositionalConvEmbedding(weight_norm), x)
    assert _sites(result) == {"activation": ("BatchNorm1d", 6, "1")}  # through x[:, :, :-1], from the conv
    wrapped = randomize_bn(result.graph)
    folded, report = bngraph.fold(wrapped, [x])
    assert [(r["node"], r["into"]) for r in report.sections["folded"]] == [("activation.bn", "conv")]
    assert not nn.utils.parametrize.is_parametrized(folded.conv)  # the weight it computed, plain
    with torch.no_grad():
        torch.testing.assert_close(folded(x), wrapped(x), rtol=1e-5, atol=1e-5)


WEIGHT_NORM_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        example_input_shape = (2, 10, 6)

        def __init__(self):
            super().__init__()
            conv = nn.Conv1d(6, 6, kernel_size=4, padding=2, groups=2)
            self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
            self.act = nn.GELU()

        def forward(self, x):
            if len(x) == 0:  # len() of a tensor: torch.fx cannot trace it
                raise ValueError("an empty batch")
            return self.act(self.conv(x.transpose(1, 2))[:, :, :-1]).transpose(1, 2)
    """
)


def test_a_fold_into_a_weight_normed_conv_writes_a_folder_that_loads(tmp_path, capsys):
    # The folded model's source builds the conv with its weight_norm, the state dict holds the
    # plain weight: the edits the fold appends make the built conv's weight plain before loading.
    (tmp_path / "wn.py").write_text(WEIGHT_NORM_FILE)
    bn_dir, folded = tmp_path / "bn", tmp_path / "folded"
    code, _, err = _cli(capsys, "insert", f"{tmp_path / 'wn.py'}:Net", "-o", bn_dir)
    assert code == 0, err
    with torch.no_grad():  # statistics of its own: a fold against fresh ones would prove little
        bn = bngraph.load(bn_dir)
        randomize_bn(bn)
        bngraph.save(bn, tmp_path / "bn-random", example_inputs=[torch.randn(2, 10, 6)],
                     code=(bn_dir / "model.py").read_text())
    code, out, err = _cli(capsys, "fold", tmp_path / "bn-random", "-o", folded, "--strict")
    assert code == 0, err
    code, out, err = _cli(capsys, "verify", tmp_path / "bn-random", folded)
    assert code == 0, out + err


def test_untraced_fold_leaves_a_bn_whose_layer_output_is_read_twice():
    class ReadTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            if len(x) == 0:  # len() of a tensor: torch.fx cannot trace it
                raise ValueError
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_bn(ReadTwice())
    x = torch.randn(2, 3, 4, 4)
    folded, report = bngraph.fold(model, [x])
    assert report.sections["remaining"] == [{"node": "bn", "reason": "conv's output is read 2 times, not only by the BN"}]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("bias", [True, False])
def test_untraced_fold_is_exact_with_and_without_a_conv_bias(bias):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            if len(x) == 0:  # len() of a tensor: torch.fx cannot trace it
                raise ValueError
            return self.act(self.bn(self.conv(x)))

    model = randomize_bn(Block())
    x = torch.randn(3, 3, 6, 6)
    folded, report = bngraph.fold(model, [x])
    assert [r["node"] for r in report.sections["folded"]] == ["bn"]
    assert isinstance(folded.bn, nn.Identity) and folded.conv.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class PicksItsGain(nn.Module):
    """Reads its activation module, not only calls it (He's gain for a leaky ReLU; a block that
    scales when its activation is one kind), and checks its input for NaN: not traceable."""

    def __init__(self, read: str):
        super().__init__()
        self.read = read
        self.fc, self.act, self.head = nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 3)
        self.fc2, self.act2 = nn.Linear(8, 8), nn.Tanh()

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("NaN input")
        h = self.fc(x)
        if self.read == "attribute":
            h = h * (2.0 / (1 + self.act.negative_slope ** 2)) ** 0.5
        elif isinstance(self.act, nn.LeakyReLU):
            h = h * 3.0
        return self.head(self.act2(self.fc2(self.act(h))))


@pytest.mark.parametrize("read", ["attribute", "isinstance"])
def test_an_activation_module_the_code_reads_is_not_wrapped(read):
    # A Sequential(bn, act) in its place has no negative_slope and is no LeakyReLU: the fallback
    # crashed on the first, and silently computed without the gain on the second.
    model = PicksItsGain(read)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    out, report = bngraph.insert(model, [x], preserve=True)
    assert report.facts["tracing"] == "module-level fallback"
    assert [r["node"] for r in report.sections["inserted"]] == ["act2"]
    reason = {r["node"]: r["reason"] for r in report.sections["skipped"]}["act"]
    assert reason.startswith("the code reads the module itself, not only calls it (")
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x * 3 + 1), model.eval()(x * 3 + 1), rtol=1e-5, atol=1e-5)


class ReadsItsActivationOutsideTheForward(nn.Module):
    """Reads its activation in __init__ (He's gain) and extra_repr, and tests it for truth in the
    forward: none of that changes with a BatchNorm in front, so it is wrapped."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 3)
        nn.init.kaiming_uniform_(self.fc.weight, a=self.act.negative_slope)

    def extra_repr(self):
        return f"act={self.act}"

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("NaN input")
        h = self.fc(x)
        return self.head(self.act(h) if self.act else h)


def test_an_activation_read_only_outside_the_forward_or_for_truth_is_wrapped():
    model = ReadsItsActivationOutsideTheForward()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    _, report = bngraph.insert(model, [x])
    assert report.facts["tracing"] == "module-level fallback"
    assert [r["node"] for r in report.sections["inserted"]] == ["act"]


class Pyramid(nn.Module):
    """Halves its feature map until 4 wide, with one activation module: once at 8x8, three times at 32x32."""

    def __init__(self):
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.act, self.head = nn.ReLU(), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        if h.mean() > 1e6:  # on data: torch.fx cannot trace it
            h = h * 0
        while h.shape[-1] > 4:
            h = self.act(self.down(h))
        return self.head(h).mean((2, 3))


def test_an_activation_called_once_only_at_the_examples_size_is_not_wrapped():
    # Called once on the example, it got a BatchNorm, which on larger images normalized three
    # stages of the pyramid together.
    out, report = bngraph.insert(Pyramid(), [torch.randn(4, 3, 8, 8)])
    assert report.facts["tracing"] == "module-level fallback"
    reasons = {s["node"]: s["reason"] for s in report.sections["skipped"]}
    assert reasons["act"] == ("called once on the example input but 2 times on an input of (4, 3, 16, 16); "
                              "one BatchNorm would mix their statistics")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())


class CountsExamples(nn.Module):
    """Counts the examples it has seen in a buffer, and branches on data (the fallback)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(4, 3)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += x.shape[0]
        h = self.act(self.conv(x))
        if h.sum() > -1e9:
            h = h * 1.0
        return self.fc(self.bn(h).mean((2, 3)))


def test_bngraphs_own_runs_leave_a_counter_the_forward_keeps_where_it_was():
    # insert saved seen = 6 and fold 18: the examples of their own traces, checks and probes.
    model = CountsExamples()
    out, _ = bngraph.insert(model, [torch.randn(2, 3, 8, 8)])
    folded, _ = bngraph.fold(randomize_bn(model), [torch.randn(2, 3, 8, 8)])
    assert model.seen.item() == out.seen.item() == folded.seen.item() == 0


class ChecksForNaN(nn.Module):
    """A check of the data torch.fx cannot follow, in front of `body`."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("a NaN in the input")
        return self.body(x)


class Aliased(nn.Module):  # the activation is self.act and, through the block, block.1
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.GELU()
        self.block = nn.Sequential(self.fc, self.act)

    def forward(self, x):
        return self.block(x)


class CalledFromAList(nn.Module):  # the forward reaches its layers through a plain list, as dispatch code does
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.SiLU()
        self._order = [self.fc, self.act]

    def forward(self, x):
        for layer in self._order:
            x = layer(x)
        return x


class EncoderLayer(nn.TransformerEncoderLayer):  # a subclass, its activation a module
    def __init__(self):
        super().__init__(8, 2, dim_feedforward=16, dropout=0.0, activation=nn.ReLU(), batch_first=True)


@pytest.mark.parametrize(("body", "site", "reason"), [
    (Aliased(), "act", "registered under several names (body.act, body.block.1)"),
    (EncoderLayer(), "activation", "fused eval path"),
    (CalledFromAList(), "act", "through another reference than its name (a list"),
], ids=["second-name", "transformer-encoder-layer", "called-from-a-list"])
def test_an_activation_a_wrap_would_not_reach_is_skipped_with_the_reason(body, site, reason):
    # Reported inserted, the BatchNorm never ran: the forward called the module through its other
    # name or a list, and the encoder layer's fused path (eval, without gradients) never calls its
    # activation.
    model = ChecksForNaN(body).eval()
    x = torch.randn(3, 5, 8)
    out, report = bngraph.insert(model, [x])
    assert report.facts["tracing"] == "module-level fallback" and report.sections["inserted"] == []
    assert any(row["node"] == f"body.{site}" and reason in row["reason"] for row in report.sections["skipped"])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())


class CountsInside(nn.Module):  # kept whole by the partial trace: a branch on its data
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("calls", torch.tensor(7))

    def forward(self, x):
        self.calls += 1
        if x.sum() > 1e9:
            x = x * 0
        return F.relu(self.conv(x))


class HoldsACounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.inner, self.head = nn.Conv2d(3, 4, 1), CountsInside(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.inner(F.gelu(self.stem(x))))


@pytest.mark.parametrize("preserve", [False, True], ids=["insert", "insert-preserve"])
def test_a_counter_in_a_submodule_kept_whole_is_where_the_model_had_it(preserve):
    # bngraph's runs of its copies (the trace, the calibration, the checks) moved it: 7 became 9.
    model = HoldsACounter()
    out, report = bngraph.insert(model, [torch.randn(2, 3, 8, 8)], preserve=preserve)
    assert report.facts["tracing"] != "module-level fallback" and len(report.sections["inserted"]) == 1
    assert int(out.inner.calls) == int(model.inner.calls) == 7
