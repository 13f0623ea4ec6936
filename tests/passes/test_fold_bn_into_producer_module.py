"""fold_bn_into_producer_module: a BN folds into the layer module before it, judged by runs of
the model (no graph), on the example input and on probes unlike it."""

import torch
from torch import nn

import bngraph
from bngraph.fold_untraced import FALLBACK
from tests.util import randomize_bn


class IterativeRefinement(nn.Module):
    """A shared conv applied until the values are small (a data-dependent loop fx cannot trace),
    then a BN: the conv runs once on N(0, 1) inputs, more often on larger ones."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        h = self.stem(x)
        for _ in range(4):
            new = self.conv(h)
            if h.abs().amax() < 4.0:
                break
            h = torch.tanh(new)
        return self.bn(new)


class RescalesLargeInputs(nn.Module):
    """A branch on the input's range (fx cannot trace it) that leaves the conv called once."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.max() > 100:
            x = x / 255
        return self.bn(self.conv(x))


def test_a_layer_called_more_often_on_other_inputs_keeps_its_bn():
    torch.manual_seed(0)
    model = randomize_bn(IterativeRefinement())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert model.stem(x).abs().amax() < 4.0  # the example runs the conv once
    folded, report = bngraph.fold(model, [x])
    assert report.facts["tracing"] == FALLBACK
    [row] = report.sections["remaining"]
    assert row["node"] == "bn" and "on the example x 10: conv is called 2 times" in row["reason"], row
    for probe in (x, 10 * torch.randn(4, 3, 8, 8)):
        with torch.no_grad():
            torch.testing.assert_close(folded(probe), model(probe), atol=1e-5, rtol=1e-5)


def test_a_fold_without_a_graph_says_which_inputs_it_was_probed_on():
    torch.manual_seed(0)
    model = randomize_bn(RescalesLargeInputs())
    x = torch.randn(2, 3, 8, 8)
    folded, report = bngraph.fold(model, [x])
    assert report.facts["tracing"] == FALLBACK and [r["node"] for r in report.sections["folded"]] == ["bn"]
    assert "probed_on" not in report.sections["folded"][0]
    [note] = [n for n in report.notes if "proven on those inputs only" in n]
    assert "the example x 10" in note and "a batch of 3" in note
    for probe in (x, 300 * torch.rand(3, 3, 8, 8)):
        with torch.no_grad():
            torch.testing.assert_close(folded(probe), model(probe), atol=1e-4, rtol=1e-4)


class ReadsItsLayers(nn.Module):
    """Untraceable (a branch on the input's range), and its forward reads a BN's running mean
    and a conv's weight beyond calling them; a third conv-BN pair is plain."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        if x.max() > 100:
            x = x / 255
        h = self.bn1(self.c1(x)) + self.bn1.running_mean.view(1, -1, 1, 1)
        h = self.bn2(self.c2(h)) * self.c2.weight.abs().mean()
        return self.bn3(self.c3(h))


def test_a_bn_or_layer_the_forward_reads_beyond_a_call_is_left_and_the_rest_folded():
    torch.manual_seed(0)
    model = randomize_bn(ReadsItsLayers())
    x = torch.randn(2, 3, 8, 8)
    folded, report = bngraph.fold(model, [x])
    assert report.facts["tracing"] == FALLBACK
    assert [r["node"] for r in report.sections["folded"]] == ["bn3"]
    reasons = {r["node"]: r["reason"] for r in report.sections["remaining"]}
    assert reasons == {"bn1": "the forward reads its running_mean beyond calling it, and the fold would remove the BN",
                       "bn2": "the forward reads c2's weight beyond calling it, which the fold would change"}
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_probes_keep_each_inputs_dtype_and_leave_indices_alone():
    from bngraph.passes.fold_bn_into_producer_module import _probe_inputs

    features, tokens = torch.randn(2, 3, dtype=torch.bfloat16), torch.tensor([[1, 5], [7, 2]])
    probes = _probe_inputs([features, tokens])
    assert [what for what, _ in probes] == ["the example x 10", "the example + 3", "uniform [0, 1) values", "a batch of 3"]
    for what, (x, ids) in probes:
        assert x.dtype == torch.bfloat16 and ids.dtype == tokens.dtype
        if what != "a batch of 3":
            assert ids is tokens  # scaled, indices would be other indices
    assert probes[-1][1][0].shape == (3, 3)


class ChecksItsRange(nn.Module):
    """Refuses inputs outside the range it was built for (and branches on the batch, which fx
    cannot trace)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        if x.abs().max() > 8:
            raise ValueError("inputs are normalized images")
        return self.bn(self.conv(x))


def test_a_probe_the_model_refuses_is_left_out_and_the_note_names_the_others():
    torch.manual_seed(0)
    model = randomize_bn(ChecksItsRange())
    x = torch.randn(2, 3, 8, 8).clamp(-3, 3)
    folded, report = bngraph.fold(model, [x])
    assert [r["node"] for r in report.sections["folded"]] == ["bn"]
    [note] = [n for n in report.notes if "proven on those inputs only" in n]
    assert "the example x 10" not in note and "the example + 3" in note


class ReadsBnSettings(ReadsItsLayers):
    """Untraceable, and reads a BN's settings (not its tensors) in the forward."""

    def forward(self, x):
        if x.max() > 100:
            x = x / 255
        h = self.bn1(self.c1(x)) / self.bn1.num_features
        h = self.bn2(self.c2(h)) * getattr(self.bn2, "eps", 1.0)
        return self.bn3(self.c3(h))


def test_a_bn_whose_settings_the_forward_reads_is_left_and_the_rest_folded():
    torch.manual_seed(0)
    model = randomize_bn(ReadsBnSettings())
    x = torch.randn(2, 3, 8, 8)
    folded, report = bngraph.fold(model, [x])
    assert [r["node"] for r in report.sections["folded"]] == ["bn3"]
    reasons = {r["node"]: r["reason"] for r in report.sections["remaining"]}
    assert reasons == {
        "bn1": "the forward reads its num_features beyond calling it, and the fold would replace the BN by an "
               "nn.Identity, which has none",
        "bn2": "the forward reads its eps beyond calling it, and the fold would replace the BN by an nn.Identity, "
               "which has none"}
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
