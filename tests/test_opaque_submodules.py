"""Activation modules inside a submodule torch.fx cannot trace (HF Swin's blocks) get their
BatchNorm by running the model, and the artifact insert writes carries them through train, fold,
export and verify, all through the command line."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

import bngraph
from bngraph.cli import main

SWIN_STYLE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    class GELUActivation(nn.Module):  # HuggingFace's activation class
        def forward(self, input):
            return F.gelu(input)


    class WindowBlock(nn.Module):
        '''Swin's layer: the window picked from the input's size, a mask written by item assignment,
        which torch.fx cannot trace; attention with a learned relative-position bias, then a gated MLP.'''

        def __init__(self, dim=16, heads=2, window=2):
            super().__init__()
            self.dim, self.heads, self.window = dim, heads, window
            self.norm = nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.relative_position_bias = nn.Parameter(torch.randn(heads, 1, 1) * 0.1)
            self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), GELUActivation(), nn.Linear(2 * dim, dim)
            self.gate = nn.Linear(dim, dim)

        def forward(self, hidden_states, size):
            height, width = size
            window = min(height, width) if min(height, width) <= self.window else self.window
            b, t, c = hidden_states.shape
            x = self.norm(hidden_states).view(b, height // window, window, width // window, window, c)
            x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)
            q, k, v = self.qkv(x).view(x.shape[0], -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            bias = self.relative_position_bias.expand(self.heads, window * window, window * window).unsqueeze(0).clone()
            bias[..., 0, 0] = 0.0  # as HF writes its attention masks
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            attended = self.proj(attended.transpose(1, 2).reshape(x.shape[0], -1, c))
            attended = attended.view(b, height // window, width // window, window, window, c)
            hidden_states = hidden_states + attended.permute(0, 1, 3, 2, 4, 5).reshape(b, t, c)
            mlp = self.fc2(self.act(self.fc1(hidden_states)))
            return hidden_states + mlp * torch.sigmoid(self.gate(hidden_states))


    class Net(nn.Module):
        example_input_shape = (4, 3, 8, 8)

        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 16, 2, stride=2)
            self.block = WindowBlock()
            self.head = nn.Linear(16, 3)

        def forward(self, pixel_values):
            x = self.patch_embed(pixel_values)
            size = x.shape[2:]
            x = self.block(x.flatten(2).transpose(1, 2), size)
            return self.head(x.mean(1))
    """
)

IMAGES_PY = textwrap.dedent(
    """
    import torch
    from torch.utils.data import TensorDataset


    def make():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(96, 3, 8, 8, generator=gen)
        y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
        return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    """
)


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_module_inside_a_block_fx_cannot_trace_gets_a_batchnorm_that_trains_folds_and_exports(tmp_path, capsys):
    (tmp_path / "swin.py").write_text(SWIN_STYLE)
    (tmp_path / "images.py").write_text(IMAGES_PY)
    bn_dir, run, folded, onnx = tmp_path / "bn", tmp_path / "run", tmp_path / "folded", tmp_path / "m.onnx"

    code, out, err = _cli(capsys, "insert", f"{tmp_path / 'swin.py'}:Net", "--preserve", "-o", bn_dir, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tracing"] == "torch.fx"
    assert [o["module"] for o in report["opaque"]] == ["block"]
    assert [(r["node"], r["features"], r["axes"], r["bn"], r["bias_removed"]) for r in report["inserted"]] == [
        ("block.act", 32, "last", "block.act.bn.norm", False)
    ]
    (left,) = report["not_handled"]  # the gate's sigmoid, called as a function: nothing to wrap
    assert (left["module"], left["nonlinearity"]) == ("block", "sigmoid")
    assert "called as a function" in left["reason"] and "kept opaque" in left["reason"]
    inserted = bngraph.load(bn_dir)
    assert isinstance(inserted.block.act.bn.norm, nn.BatchNorm1d)
    code, out, err = _cli(capsys, "insert", bn_dir, "--dry-run", "--json")  # again, on what it wrote: nothing to add
    assert code == 0, err
    again = json.loads(out)
    assert again["inserted"] == []
    rows = {(r["module"], r["nonlinearity"], r["input_normalized"]) for r in again["not_handled"]}
    assert rows == {("block.act.act", "gelu", True), ("block", "sigmoid", False)}  # the GELU has its BN
    assert "1 nonlinearities run inside submodules kept whole, on an input no norm made" in again["notes"][1]

    code, out, err = _cli(capsys, "train", bn_dir, "--data", f"{tmp_path / 'images.py'}:make", "--steps", 6,
                          "--batch-size", 16, "-o", run)
    assert code == 0, err
    trained = bngraph.load(run / "model")
    assert trained.block.act.bn.norm.num_batches_tracked == inserted.block.act.bn.norm.num_batches_tracked + 6
    assert not torch.equal(trained.block.act.bn.norm.running_mean, inserted.block.act.bn.norm.running_mean)

    code, out, err = _cli(capsys, "fold", run / "model", "-o", folded, "--strict", "--json")
    assert code == 0, err
    assert {(r["node"], r["into"]) for r in json.loads(out)["folded"]} == {("block.act.bn.norm", "block.fc1")}
    code, out, err = _cli(capsys, "verify", run / "model", folded)
    assert code == 0, out + err
    code, out, err = _cli(capsys, "export", folded, "-o", onnx)
    assert code == 0, err
    assert "written as matmuls and a softmax" in out  # the block's position-biased attention
    code, out, err = _cli(capsys, "verify", folded, onnx)
    assert code == 0, out + err
    # The fold went module by module, editing the generated model: folding that again builds its
    # block from the whole model.py, each generated class from its own base.
    code, out, err = _cli(capsys, "fold", folded, "-o", tmp_path / "again", "--strict")
    assert code == 0, err
    code, out, err = _cli(capsys, "verify", run / "model", tmp_path / "again")
    assert code == 0, out + err


def test_no_fallback_leaves_the_activations_inside_a_block_fx_keeps_whole_and_lists_them():
    namespace: dict = {}
    exec(SWIN_STYLE, namespace)  # noqa: S102 (the test's own model source)
    model, x = namespace["Net"](), torch.randn(4, 3, 8, 8)
    _, report = bngraph.insert(model, [x], fallback=False)
    assert report.sections["inserted"] == []
    rows = {(r["module"], r["nonlinearity"]): r["reason"] for r in report.sections["not_handled"]}
    assert set(rows) == {("block.act", "gelu"), ("block", "sigmoid")}
    assert "kept opaque" in rows[("block.act", "gelu")]
    wrapped, _ = bngraph.insert(model, [x])  # the default wraps it
    assert isinstance(wrapped.get_submodule("block.act.bn.norm"), nn.BatchNorm1d)


STEM_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Embeddings(nn.Module):  # HuggingFace's, with a len() of a tensor, which torch.fx cannot trace
        def __init__(self):
            super().__init__()
            self.convolution = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.normalization = nn.BatchNorm2d(8)

        def forward(self, pixel_values):
            if len(pixel_values) == 0:
                raise ValueError("an empty batch")
            return torch.relu(self.normalization(self.convolution(pixel_values)))


    class Net(nn.Module):
        example_input_shape = (2, 3, 8, 8)

        def __init__(self):
            super().__init__()
            self.embedder = Embeddings()
            self.conv, self.bn, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 3)
            with torch.no_grad():
                for bn in (self.embedder.normalization, self.bn):
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.normal_()
                    bn.bias.normal_()

        def forward(self, pixel_values):
            x = self.embedder(pixel_values)
            return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
    """
)


def test_a_batchnorm_inside_a_submodule_fx_keeps_whole_folds_and_the_folder_loads(tmp_path, capsys):
    """HF ResNet's embedder: the graph's passes fold the outer BN, and the embedder's BN folds
    module by module into its bias-free conv, which gains a bias; the folder rebuilds both."""
    (tmp_path / "stem.py").write_text(STEM_FILE)
    folded = tmp_path / "folded"
    code, out, err = _cli(capsys, "fold", f"{tmp_path / 'stem.py'}:Net", "-o", folded, "--strict", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {(r["node"], r["into"]) for r in report["folded"]} >= {("embedder.normalization", "embedder.convolution")}
    assert (report["batchnorms_before"], report["batchnorms_after"]) == (2, 0)
    assert "tracing" not in report  # the traced graph, not the module-by-module fallback for the whole model
    loaded = bngraph.load(folded)
    assert isinstance(loaded.embedder.normalization, nn.Identity) and loaded.embedder.convolution.bias is not None
    code, out, err = _cli(capsys, "verify", f"{tmp_path / 'stem.py'}:Net", folded)
    assert code == 0, out + err


class BlockTakingAnActivation(nn.Module):
    """A block handed its parent's activation module, with a mode branch: kept whole."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc, self.act = nn.Linear(6, 6), act

    def forward(self, x):
        if self.training:
            x = x * 1.0
        return self.act(self.fc(x))


class SharesItsActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.GELU()
        self.fc, self.block, self.out = nn.Linear(6, 6), BlockTakingAnActivation(self.act), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.block(self.act(self.fc(x))))


def test_an_activation_module_also_called_inside_a_block_kept_whole_is_named_there():
    # Registered as `act`, not `block.act`: its call inside the opaque block got no BatchNorm and
    # no line in the report.
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    _, report = bngraph.insert(SharesItsActivation(), [x])
    assert [r["node"] for r in report.sections["inserted"]] == ["act"]  # the traced call
    (row,) = report.sections["not_handled"]
    assert (row["module"], row["nonlinearity"]) == ("act", "GELU") and row["reason"].startswith("inside block")


RANDOM_FEATURES = '''
import pytest
import torch
from torch import nn


class Fourier(nn.Module):
    """Random Fourier features: a fixed random projection made in __init__, never saved."""

    def __init__(self):
        super().__init__()
        self.register_buffer("projection", torch.randn(8, 8), persistent=False)

    def forward(self, x):
        if self.training:  # kept whole: torch.fx cannot trace a branch on the mode here
            x = x + 0.01 * torch.randn_like(x)
        return torch.cat([torch.sin(x @ self.projection), torch.cos(x @ self.projection)], -1)


class Net(nn.Module):
    example_input_shape = (4, 8)

    def __init__(self):
        super().__init__()
        self.features, self.fc, self.head = Fourier(), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.features(x))))
'''


def test_a_submodule_kept_whole_is_rebuilt_as_the_model_was_built(tmp_path, capsys):
    # Built again from the model's code at each load without a seed, its random projection was
    # another: the round-trip check ended insert in a "bngraph bug" traceback.
    (tmp_path / "m.py").write_text(RANDOM_FEATURES)
    code, _, err = _cli(capsys, "insert", f"{tmp_path / 'm.py'}:Net", "--preserve", "-o", tmp_path / "bn")
    assert code == 0, err
    original = bngraph.load(f"{tmp_path / 'm.py'}:Net").eval()
    x = torch.randn(5, 8)
    for seed in (0, 1):  # whatever the random state the loader finds
        torch.manual_seed(seed)
        inserted = bngraph.load(tmp_path / "bn").eval()
        with torch.no_grad():
            torch.testing.assert_close(inserted(x), original(x), rtol=1e-5, atol=1e-5)


class ReadsTheConvThroughAList(nn.Module):
    """Kept whole (a branch on self.training); calls the model's conv through a plain list, which
    no graph shows: the conv's bias is read here too."""

    def __init__(self, conv: nn.Conv2d, read_the_bias: bool):
        super().__init__()
        self.src, self.read_the_bias = [conv], read_the_bias

    def forward(self, y):
        if self.training:
            y = y * 1.0
        if self.read_the_bias:
            return y + self.src[0].bias.view(1, -1, 1, 1)
        return self.src[0](y)


class SharesItsConv(nn.Module):
    def __init__(self, read_the_bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = ReadsTheConvThroughAList(self.conv, read_the_bias)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


@pytest.mark.parametrize("read_the_bias", [False, True], ids=["calls-the-conv", "reads-its-bias"])
def test_a_bias_read_again_where_no_graph_shows_it_is_kept(read_the_bias):
    # The bias before the new BatchNorm was dropped as redundant: the submodule's call then ran
    # without it (0.4-0.7 of the output's RMS off, returned without a word) or raised on None.
    torch.manual_seed(0)
    model = SharesItsConv(read_the_bias).eval()
    inserted, report = bngraph.insert(model, [torch.randn(2, 4, 8, 8)])
    assert inserted.conv.bias is not None and [row["bias_removed"] for row in report.sections["inserted"]] == [False]
    assert any("the biases before the new BatchNorms are kept: with them dropped" in note for note in report.notes)
    x = torch.randn(5, 4, 8, 8) * 10 + 3
    with torch.no_grad():
        expected, got = model(x), inserted.eval()(x)
    assert ((got - expected).abs().max() / expected.pow(2).mean().sqrt()) < 1e-4  # the fresh BN's eps alone
