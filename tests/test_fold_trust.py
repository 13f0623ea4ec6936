"""fold, insert and save on models written the way people write them: in-place statements, hooks,
scripted and opaque submodules, parametrized and lazy layers, modules in plain containers, string
constructor arguments. Each result either computes what the model computed, or is refused with
the reason (issue 10)."""

from __future__ import annotations

import copy
import json
import operator
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bngraph
from bngraph.equivalence import check_same_function
from bngraph.cli import main
from bngraph.errors import CheckFailed, ModelNotAFunction, UserError
from bngraph.fold import fold
from bngraph.passes.remove_dead_code import remove_dead_code
from bngraph.trace import TraceFailed, copy_module, trace
from tests.passes.fold_util import assert_matches, batch_norms_left
from tests.util import randomize_bn


def folded_rows(report) -> dict[str, str]:
    return {row["node"]: row["how"] for row in report.sections["folded"]}


def skip_reasons(report) -> dict[str, str]:
    return {s.site: s.reason for r in report.passes.values() for s in r.skipped}


# ---- in-place statements ---------------------------------------------------------------------


class InPlaceStatements(nn.Module):
    """No BatchNorm at all; every in-place form whose return value nobody reads."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(6, 6), nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.fc(x)
        out.add_(x)
        scores = out * 2
        scores.masked_fill_(x > 0.5, -1e4)
        scores.clamp_(min=-3.0)
        hidden = out - 1
        hidden.relu_()
        F.relu(out, inplace=True)
        torch.ops.aten.mul_.Tensor(scores, 0.5)
        flat = scores.view(-1)
        flat.sub_(1.0)  # through a view: writes into scores
        gated = hidden + 0
        self.act(gated)  # an inplace module whose result is dropped
        return scores.softmax(-1) + hidden + gated


def test_in_place_statements_survive_fold_of_a_model_without_batchnorm():
    model, x = InPlaceStatements().eval(), torch.randn(4, 6)
    gm, report = fold(model, [x])
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    kept = {n.target for n in gm.graph.nodes if n.op in ("call_method", "call_function", "call_module")}
    assert {"add_", "masked_fill_", "clamp_", "relu_", "sub_", "act", F.relu, torch.ops.aten.mul_.Tensor} <= kept
    assert report.facts["batchnorms_before"] == 0


def test_remove_dead_code_keeps_setitem_and_augmented_assignment():
    # fx's tracer cannot record `x[i] = v` on a proxy; graphs built by other tools hold it.
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.mul, (x, 2.0))
    graph.call_function(operator.setitem, (y, 0, 0.0))
    graph.call_function(operator.iadd, (y, x))
    graph.call_function(torch.neg, (x,))  # really dead
    graph.output(y)
    gm = fx.GraphModule(nn.Module(), graph)
    result = remove_dead_code(gm)
    assert result.changed == ["neg"]
    x_value = torch.ones(2, 3)
    expected = x_value * 2
    expected[0] = 0.0
    assert torch.equal(gm(x_value), expected + x_value)


class ResidualBlock(nn.Module):
    """torchvision's BasicBlock, as written there: inplace ReLU and `out += identity`."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out += identity
        out = self.relu(out)
        return out


def test_residual_block_with_in_place_add_folds_exactly():
    model = randomize_bn(nn.Sequential(ResidualBlock(), ResidualBlock()))
    x = torch.randn(2, 4, 6, 6)
    gm, report = fold(model, [x])
    assert batch_norms_left(gm) == [] and set(folded_rows(report).values()) == {"into the layer before it"}
    assert_matches(gm, model, x)


class WritesIntoBnInput(nn.Module):
    """The BN's input is written in place after the BN read it, before the Linear reads the BN."""

    def __init__(self, through_view: bool):
        super().__init__()
        self.through_view = through_view
        self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        hidden = torch.tanh(x)
        normalized = self.bn(hidden)
        target = hidden.view(-1) if self.through_view else hidden
        target.mul_(3.0)
        return self.fc(normalized) + hidden.sum(1, keepdim=True)


@pytest.mark.parametrize("through_view", [False, True])
def test_bn_whose_input_is_then_written_in_place_is_not_moved_into_the_next_layer(through_view):
    model = randomize_bn(WritesIntoBnInput(through_view))
    x = torch.randn(5, 6)
    gm, report = fold(model, [x])
    assert "writes in place into tanh, the BN's input, before fc would read it" in skip_reasons(report)["bn"]
    assert folded_rows(report) == {"bn": "multiply-add"}
    assert_matches(gm, model, x)


# ---- hooks -----------------------------------------------------------------------------------


class ConvBnHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.head_bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.head_bn(y.mean((2, 3))))


def test_hooks_on_the_layer_or_the_bn_stop_the_fold_and_still_see_what_they_saw():
    model = randomize_bn(ConvBnHead())
    seen = {"conv": [], "fc_in": [], "bn": []}
    model.conv.register_forward_hook(lambda m, i, out: seen["conv"].append(out.clone()))
    model.fc.register_forward_pre_hook(lambda m, args: seen["fc_in"].append(args[0].clone()))
    model.bn.register_forward_hook(lambda m, i, out: seen["bn"].append(out.clone()))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    expected = {k: v[-1] for k, v in seen.items()}
    gm, report = fold(model, [x])
    reasons = skip_reasons(report)
    assert reasons["bn"] == "bn has a forward hook; folding it away would change what it sees"
    assert reasons["head_bn"] == "fc has a forward pre-hook; folding a BatchNorm into it would change what it sees"
    assert report.sections["remaining"] == [{"node": "bn", "reason": reasons["bn"]}]
    assert folded_rows(report) == {"head_bn": "multiply-add"}
    for values in seen.values():
        values.clear()
    with torch.no_grad():
        assert torch.allclose(gm(x), want, atol=1e-6)
    for name, value in expected.items():  # each hook ran once in the folded model, on the same values
        assert len(seen[name]) == 1 and torch.allclose(seen[name][0], value, atol=1e-6), name


class HookedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class FeatureNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.fc = HookedBlock(), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


def test_a_hooked_block_stays_one_call_whose_hook_fires_and_is_folded_inside():
    model = randomize_bn(FeatureNet())
    features = []
    model.block.register_forward_hook(lambda m, i, out: features.append(out))
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, [x], training=False)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["block", "fc"]
    with torch.no_grad():
        want = model(x)
        features.clear()
        gm(x)
    assert len(features) == 1  # hooks run in the GraphModule
    folded, report = fold(model, [x])
    assert folded_rows(report) == {"block.bn": "into the layer before it"} and report.sections["remaining"] == []
    assert report.facts["batchnorms_before"] == 1 and report.facts["batchnorms_after"] == 0
    assert batch_norms_left(folded.block) == []
    features.clear()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
    assert len(features) == 1  # the hook still fires, on the block's unchanged output
    with torch.no_grad():
        torch.testing.assert_close(features[0], model.block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reads, why", [
    (lambda m, i, out: out * m.bn.running_var.view(1, -1, 1, 1), "they raise on the folded module (AttributeError"),
    (lambda m, i, out: out * m.conv.weight.mean(), "folded, it computes something else with them"),
], ids=["the-bn", "the-conv-weight"])
def test_a_hook_reading_the_block_itself_keeps_the_block_whole(reads, why):
    # A monitoring hook reads the block's BN or weights: folded inside, the block had no `bn`
    # (the fold refused saying the model raised) or a scaled weight (refused: check failed).
    model = randomize_bn(FeatureNet())
    model.block.register_forward_hook(reads)
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model, [x])
    [left] = report.sections["remaining"]
    assert left["node"] == "block.bn" and why in left["reason"]
    assert_matches(folded, model, x)


def test_fold_writes_an_artifact_of_a_model_with_a_hooked_block(tmp_path, monkeypatch):
    # The artifact's model.py rebuilds the hooked block from the user's code, unfolded, beside
    # the folded block's weights: the reload check failed, naming the hidden temporary folder.
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

            def forward(self, x):
                return torch.relu(self.bn(self.conv(x)))

        def double(module, inputs, output):
            return output * 2

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.block, self.head = Block(), nn.Conv2d(4, 2, 1)
                self.block.register_forward_hook(double)

            def forward(self, x):
                return self.head(self.block(x))
    """))
    monkeypatch.chdir(tmp_path)
    assert main(["fold", "net.py:Net", "--input-shape", "2,3,4,4", "-o", "folded"]) == 0
    original, written = bngraph.load("net.py:Net"), bngraph.load("folded")
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(written.eval()(x), original.eval()(x))
    assert written.block._forward_hooks  # the hook is the user's code's, registered again on loading


def test_a_hook_on_the_model_itself_is_not_dropped_by_tracing():
    model = randomize_bn(ConvBnHead())
    model.register_forward_hook(lambda m, i, out: out * 2)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UserError, match="ConvBnHead itself has a forward hook, which a traced graph cannot keep"):
        trace(model, [x])
    folded, report = fold(model, [x])  # module by module instead, the hook kept
    assert report.facts["tracing"] == "module-level fallback"
    assert_matches(folded, model, x)


# ---- BatchNorms no pass can reach --------------------------------------------------------------


SCRIPTED_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.stem(x)))
"""


def test_bn_inside_a_scripted_submodule_is_listed_and_strict_fails(tmp_path, capsys):
    from bngraph.cli import main

    (tmp_path / "net.py").write_text(SCRIPTED_MODEL)
    code = main(["fold", str(tmp_path / "net.py"), "--strict", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["batchnorms_before"] == 2 and report["batchnorms_after"] == 1
    assert report["remaining"] == [{"node": "stem.1", "reason": "it is inside stem (a TorchScript module, which "
                                                                "torch.fx calls as a whole), so it cannot be folded"}]


# ---- parametrized and lazy layers ------------------------------------------------------------


def _parametrized(kind: str) -> nn.Module:
    conv = nn.Conv1d(3, 4, 3)
    wrap = {
        "weight_norm": torch.nn.utils.parametrizations.weight_norm,
        "spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
        "classic weight_norm": torch.nn.utils.weight_norm,
        "classic spectral_norm": torch.nn.utils.spectral_norm,
    }[kind]
    return nn.Sequential(wrap(conv), nn.BatchNorm1d(4), nn.GELU(), nn.Conv1d(4, 2, 1))


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "classic weight_norm", "classic spectral_norm"])
def test_fold_into_a_parametrized_layer_makes_its_weight_plain(kind):
    model = _parametrized(kind).train()
    x = torch.randn(4, 3, 10)
    model(x)  # a training step's forward: spectral_norm's power iteration moves its vectors
    model = randomize_bn(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm, report = fold(model, [x])
    (row,) = report.sections["folded"]
    assert row["into"] == "0" and "removed its" in row["note"] and "plain parameters" in row["note"]
    assert type(gm.get_submodule("0")) is nn.Conv1d and isinstance(gm.get_submodule("0").weight, nn.Parameter)
    assert_matches(gm, model, x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model is untouched


def test_insert_copies_parametrized_layers():
    model = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3)), nn.ReLU()).eval()
    x = torch.randn(2, 3, 10)
    bn_model, _ = bngraph.insert(model, [x], preserve=True)
    with torch.no_grad():
        torch.testing.assert_close(bn_model.eval()(x), model(x), rtol=1e-5, atol=1e-5)
        model[0].parametrizations.weight.original0.mul_(2)  # the copy does not follow the original
        assert not torch.allclose(bn_model(x), model(x), atol=1e-3)


class LazyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.LazyLinear(2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_lazy_layers_take_their_shapes_from_the_example_input():
    x = torch.randn(2, 3, 6, 6)
    model = LazyNet()
    gm, report = fold(model, [x])
    assert folded_rows(report) == {"bn": "into the layer before it"}
    assert model.conv.weight.shape == (4, 3, 3, 3)  # materialized on the model itself, once
    randomize_bn(model)
    gm, _ = fold(model, [x])
    assert_matches(gm, model, x)
    bn_model, _ = bngraph.insert(LazyNet(), [x])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn_model.modules()) == 1


def test_a_file_of_lazy_layers_names_the_same_weights_on_every_load_and_verifies_its_fold(tmp_path, capsys):
    # Their weights were drawn at their first call, from torch's unseeded generator: two loads of
    # one spec differed, and verify, which did not run the example first, blamed the model.
    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n    example_input_shape = (2, 3, 6, 6)\n\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.conv, self.bn, self.fc = nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.LazyLinear(3)\n\n"
        "    def forward(self, x):\n        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))\n")
    spec = f"{tmp_path / 'm.py'}:Net"
    first, again = bngraph.load(spec).state_dict(), bngraph.load(spec).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert main(["fold", spec, "-o", str(tmp_path / "folded")]) == 0
    assert main(["verify", spec, str(tmp_path / "folded")]) == 0


# ---- modules in plain containers ---------------------------------------------------------------


class RoutedNet(nn.Module):
    """Layers registered in a ModuleList, and called through a plain list and dict, as some
    models keep their routing."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)])
        self.order = [self.blocks[2], self.blocks[0], self.blocks[1]]
        self.heads = {"out": self.blocks[2]}

    def forward(self, x):
        for layer in self.order:
            x = torch.tanh(layer(x))
        return self.heads["out"](x)


def test_the_copy_is_independent_of_layers_in_plain_lists_and_dicts():
    model, x = randomize_bn(RoutedNet()), torch.randn(5, 4)
    copied = copy_module(model)
    assert copied.order[0] is copied.blocks[2] and copied.heads["out"] is copied.blocks[2]
    bn_model, _ = bngraph.insert(model, [x], preserve=True)
    folded, _ = fold(model, [x])
    with torch.no_grad():
        before = (bn_model.eval()(x), folded(x))
        for p in model.parameters():
            p.add_(1.0)  # editing the original after the fact
        assert torch.equal(bn_model(x), before[0]) and torch.equal(folded(x), before[1])
    # Training the copy trains the layers its forward calls.
    weights = [p.detach().clone() for p in bn_model.parameters()]
    optimizer = torch.optim.SGD(bn_model.parameters(), lr=0.1)
    bn_model.train()(x).square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(w, p) for w, p in zip(weights, bn_model.parameters()) if p.grad is not None)
    with torch.no_grad():
        assert not torch.equal(bn_model.eval()(x), before[0])


class UnregisteredList(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(4, 4), nn.ReLU()]  # not a ModuleList: invisible to named_modules

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_layers_held_only_in_a_plain_list_stay_private_to_the_copy():
    model, x = UnregisteredList(), torch.randn(3, 4)
    with pytest.raises(UserError, match="could not trace UnregisteredList"):
        trace(model, [x])
    folded, report = fold(model, [x])
    assert report.facts["tracing"] == "module-level fallback" and folded.layers[0] is not model.layers[0]
    copied = copy_module(model)
    assert copied.layers[0] is not model.layers[0]
    assert torch.equal(copied.layers[0].weight, model.layers[0].weight)
    with torch.no_grad():
        model.layers[0].weight.zero_()
    assert not torch.equal(copied.layers[0].weight, model.layers[0].weight)


# ---- generated code with string arguments ---------------------------------------------------


class StringArguments(nn.Module):
    def __init__(self):
        super().__init__()
        self.valid = nn.Conv2d(3, 4, 3, padding="valid")
        self.same = nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.GELU(approximate="tanh")
        self.up = nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        return self.pool(self.up(self.act(self.bn(self.same(self.valid(x))))))


def test_string_constructor_arguments_round_trip_through_model_py(tmp_path):
    model, x = randomize_bn(StringArguments()), torch.randn(2, 3, 9, 9)
    bngraph.save(model, tmp_path / "a", example_inputs=[x])
    code = (tmp_path / "a" / "model.py").read_text()
    assert "padding='valid'" in code and "padding_mode='reflect'" in code and "approximate='tanh'" in code
    loaded = bngraph.load(tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    folded, _ = fold(model, [x])
    bngraph.save(folded, tmp_path / "f", example_inputs=[x])
    with torch.no_grad():
        torch.testing.assert_close(bngraph.load(tmp_path / "f").eval()(x), model(x), rtol=1e-5, atol=1e-5)


# ---- the checks themselves -----------------------------------------------------------------


class CountsItsCalls(nn.Module):
    """A warm-up schedule kept in Python: tracing froze the count it had then."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.calls = nn.Linear(4, 4), nn.BatchNorm1d(4), 0

    def forward(self, x):
        self.calls += 1
        return self.bn(self.fc(x)) * min(self.calls, 10)


def test_a_trace_that_froze_python_state_is_refused():
    model, x = randomize_bn(CountsItsCalls()), torch.randn(3, 4)
    # Tracing sees the forward set an attribute (the graph would keep the count of that one
    # trace), refuses, and puts the attribute back as it was.
    with pytest.raises(TraceFailed, match="sets self.calls in its forward"):
        trace(model, [x], training=False)
    assert model.calls == 0
    assert issubclass(ModelNotAFunction, UserError)
    with pytest.raises(ModelNotAFunction, match="the model computes something else each time it runs on the same input"):
        fold(model, [x])  # no way computes what a model that counts its calls computes


COUNTS_INTO_A_BUFFER_PY = """
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 4, 6, 6)

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps += 1  # a warm-up kept in a buffer: the output depends on how often it ran
        return torch.relu(self.bn(self.conv(x))) / self.steps.clamp(max=10)
"""


@pytest.mark.parametrize("argv", [["fold"], ["insert", "--preserve"], ["export"]])
def test_a_model_whose_output_depends_on_its_calls_is_refused_by_every_command(tmp_path, capsys, argv):
    # Before, fold blamed rounding ("the original's own float32 rounding ... may explain it": the
    # float64 run was a third call) and export failed its verification with exit 1.
    (tmp_path / "net.py").write_text(COUNTS_INTO_A_BUFFER_PY)
    out = tmp_path / ("out.onnx" if argv[0] == "export" else "out")
    code = main([argv[0], str(tmp_path / "net.py"), *argv[1:], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert "computes something else each time it runs on the same input in eval mode (its forward writes 'steps')" in err


def test_check_same_function_names_the_output_and_the_error():
    class TwoOutputs(nn.Module):
        def __init__(self, shift: float):
            super().__init__()
            self.fc, self.shift = nn.Linear(3, 2), shift

        def forward(self, x):
            return {"logits": self.fc(x), "aux": self.fc(x) * 0 + self.shift}

    original, changed = TwoOutputs(1.0), TwoOutputs(1.0)
    changed.load_state_dict(original.state_dict())
    x = torch.randn(2, 3)
    assert check_same_function(original, changed, [x], what="copy") < 1e-6
    changed.shift = 1.001
    with pytest.raises(CheckFailed, match=r"copy differs from the model it was made from: output 'aux' by up to 0.001"
                       r".*off by 0.001 of the RMS, the model itself by 0: far beyond the model's own float32 rounding"):
        check_same_function(original, changed, [x], what="copy")
    # An output that is 0 everywhere has no RMS to scale the tolerance by: the refusal says so.
    original.shift, changed.shift = 0.0, 1e-8
    with pytest.raises(CheckFailed, match=r"output 'aux' is 0 everywhere in the original .* up to 1e-08 in the transformed"):
        check_same_function(original, changed, [x], what="copy")
    original.train()  # each model's mode is put back after the check
    check_same_function(original, original, [x], what="itself")
    assert original.training and changed.training


def test_a_refusal_says_when_the_model_amplifies_its_own_rounding():
    # Two near-equal features into a LayerNorm: their difference, ~1e-4 of their size, is all the
    # LayerNorm keeps, so float32 rounding of the inputs (1e-7 of their size) becomes ~1e-3 of
    # the output. One ulp more in each weight of a row is then a difference the check cannot
    # accept, and the refusal says that the model's own rounding is of that order.
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2))
    with torch.no_grad():
        original[0].weight[1] = original[0].weight[0] * (1 + 1e-4)
        original[0].bias[1] = original[0].bias[0]
    nudged = copy.deepcopy(original)
    with torch.no_grad():
        row = nudged[0].weight[0]
        row.copy_(torch.nextafter(row, torch.full_like(row, float("inf"))))
    x = torch.randn(8, 4) * 10
    with pytest.raises(CheckFailed, match=r"the model itself by \S+: within 4x the model's own float32 rounding, "
                                          r"but that rounding is beyond the 0.0001 of the RMS"):
        check_same_function(original, nudged, [x], what="nudged")


class AnchoredShifts(nn.Module):
    """Box corners as an anchor (256 px) plus a predicted shift, returned relative to the anchor:
    float32 rounds each at the anchor's scale (ulp(256) = 3e-5), about 2e-5 of the output's RMS,
    twice the check's tolerance, however exact the layers before it are."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.fc = nn.Linear(16, 256)
        self.bn = nn.BatchNorm1d(256) if bn else nn.Identity()
        self.register_buffer("anchor", torch.full((256,), 256.0))

    def forward(self, x):
        boxes = self.anchor + self.bn(self.fc(x))
        return boxes - self.anchor


def _scaled(model: nn.Module, factor: float) -> nn.Module:
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.fc.weight.mul_(factor)
    return scaled


def test_a_difference_within_the_models_own_rounding_passes_and_is_reported():
    from bngraph.equivalence import Reference
    from bngraph.verify import verify

    torch.manual_seed(0)
    model, x = AnchoredShifts().eval(), torch.randn(64, 16)
    # Ten ulps more in each weight: beyond the fixed tolerance, as the rounding at 256 differs...
    close = _scaled(model, 1 + 1e-6)
    assert not verify(model, close, [[x.numpy()]])
    reference = Reference(model, [x])
    assert reference.check(close, what="nudged") > 1
    (note,) = reference.notes
    assert note.startswith("nudged: output 'output' differs from the model's by up to ")
    assert "where the model itself is off by" in note and note.endswith("float32 rounding, which this model amplifies")
    # ...but 1e-3 more is ~30x further from the exact result than the model's own rounding.
    with pytest.raises(CheckFailed, match=r"off by \S+ of the RMS, the model itself by \S+: \d+(\.\d+)?x the model's own"):
        reference.check(_scaled(model, 1 + 1e-3), what="scaled")


def test_fold_of_a_model_that_rounds_more_than_the_tolerance_passes_with_a_note():
    torch.manual_seed(0)
    model = randomize_bn(AnchoredShifts(bn=True)).eval()
    x = torch.randn(64, 16)
    folded, report = fold(model, [x])
    assert not batch_norms_left(folded)
    assert any("float32 rounding, which this model amplifies" in n for n in report.notes)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() > 1e-5 * model(x).pow(2).mean().sqrt()  # beyond the fixed tolerance


def apply_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x) * 1.0


fx.wrap("apply_norm")  # a helper torch.fx records as one call, as libraries wrap theirs


class PassesItsNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.spare_bn = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x):
        return apply_norm(self.bn, self.fc(x))


def test_bn_handed_to_a_wrapped_function_is_listed_and_an_unused_one_noted():
    model, x = randomize_bn(PassesItsNorm()), torch.randn(3, 4)
    gm, report = fold(model, [x])
    assert report.sections["remaining"] == [{"node": "bn", "reason": "the graph passes it as a module to apply_norm, "
                                                                      "which torch.fx does not trace, so it cannot be folded"}]
    assert report.facts["batchnorms_after"] == 1
    assert any("never called by its forward" in n and "spare_bn" in n for n in report.notes)
    assert_matches(gm, model, x)


def test_recalibration_may_change_statistics_and_nothing_else():
    from bngraph.equivalence import check_only_statistics_changed

    model = randomize_bn(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[1].running_mean.add_(1.0)
        model[1].running_var.mul_(2.0)
    check_only_statistics_changed(before, model, what="recalibrated")
    with torch.no_grad():
        model[1].weight.add_(1.0)
    with pytest.raises(CheckFailed, match="recalibrated changed 1.weight, which is not a BatchNorm statistic"):
        check_only_statistics_changed(before, model, what="recalibrated")


def test_export_folds_into_a_weight_norm_layer(tmp_path):
    from bngraph.export import export

    model = randomize_bn(_parametrized("weight_norm"))
    result = export(model, [torch.randn(2, 3, 10)], tmp_path / "m.onnx")
    assert result and result.path is not None
    assert result.report.facts["fx_fold_batchnorms_after"] == 0


def test_a_full_backward_hook_on_the_layer_keeps_its_bn_apart():
    model = randomize_bn(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    model[0].register_full_backward_hook(lambda m, grad_in, grad_out: None)
    x = torch.randn(3, 4)
    gm, report = fold(model, [x])
    (skip,) = report.passes["fold_bn_into_preceding_layer"].skipped
    assert skip.reason == "0 has a backward hook; folding a BatchNorm into it would change what it sees"
    assert folded_rows(report) == {"_1": "multiply-add"}
    assert_matches(gm, model, x)


# ---- a BN with no exact fold in export; a high-gain fold of an untraceable model ---------------

POOLED_BN_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 3, 10, 10)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(6)  # after the pool: no layer before it, a zero-padded conv after it
        self.head = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        x = self.bn(self.pool(torch.relu(self.conv(x))))
        return self.head(x)


def net():
    torch.manual_seed(0)
    model = Net()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.bn.running_mean.normal_(generator=gen)
        model.bn.running_var.uniform_(0.5, 2.0, generator=gen)
        model.bn.weight.normal_(generator=gen)
        model.bn.weight[0] = -abs(float(model.bn.weight[0])) - 0.1  # a negative scale: cannot move before the pool
        model.bn.bias.normal_(generator=gen)
    return model.eval()
"""


def test_export_keeps_a_bn_with_no_exact_fold_as_batchnormalization_or_writes_mul_add(tmp_path, capsys):
    import onnx

    from bngraph.cli import main

    (tmp_path / "net.py").write_text(POOLED_BN_MODEL)
    spec = f"{tmp_path / 'net.py'}:net"
    files = {}
    for form in ("batchnorm", "mul-add"):
        files[form] = tmp_path / f"{form}.onnx"
        flags = [] if form == "batchnorm" else ["--standalone-bn", form]  # the default keeps it
        code = main(["export", spec, "-o", str(files[form]), "--json", *flags])
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and report["passed"] is True and report["onnx_remaining"] == []
        assert [row["node"] for row in report["fx_fold_kept"]] == ["bn"] and report["fx_fold_remaining"] == []
        nodes = onnx.load(str(files[form])).graph.node
        bns = [n for n in nodes if n.op_type == "BatchNormalization"]
        if form == "batchnorm":
            (kept,) = report["onnx_kept"]
            assert kept["form"] == "BatchNormalization" and "MaxPool" in kept["note"]
            assert any(note.startswith("1 BatchNorm(s) with no exact fold kept as BatchNormalization") and ": bn " in note
                       for note in report["notes"])
            assert len(bns) == 1 and all(a.i == 0 for a in bns[0].attribute if a.name == "training_mode")
            initializers = {t.name for t in onnx.load(str(files[form])).graph.initializer}
            assert set(bns[0].input[1:]) <= initializers  # constant statistics
        else:
            assert bns == [] and report["onnx_kept"] == []
            assert {"Mul", "Add"} <= {n.op_type for n in nodes}
    # `bngraph fold` of the PyTorch model is unchanged: the BN becomes one multiply-add.
    namespace: dict = {}
    exec(POOLED_BN_MODEL, namespace)
    model = namespace["net"]()
    x = torch.randn(2, 3, 10, 10)
    gm, report = fold(model, [x])
    assert folded_rows(report) == {"bn": "multiply-add"} and batch_norms_left(gm) == []
    gm, report = fold(model, [x], standalone_bn="keep")
    assert batch_norms_left(gm) == ["bn"] and report.sections["remaining"] == []
    assert [row["node"] for row in report.sections["kept"]] == ["bn"]
    assert_matches(gm, model, x)


class _DataDependent(nn.Module):
    """A forward torch.fx cannot trace (the branch reads a value), with a conv, a BN and a ReLU."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return torch.relu(self.bn(self.conv(x)))


def _nearly_dead(model: _DataDependent) -> _DataDependent:
    """Channel 0 of the conv is almost constant (3 +- 1e-5) and the statistics say so: folding
    magnifies float32 rounding ~1e5-fold (as `tests.passes.fold_util.nearly_dead_channel`)."""
    randomize_bn(model)
    model.bn.eps = 1e-10
    with torch.no_grad():
        model.conv.weight[0] *= 1e-5
        model.conv.bias[0] = 3.0
        model.bn.running_mean[0] = 3.0
        model.bn.running_var[0] = float(model.conv.weight[0].pow(2).sum())
    return model


def test_an_untraceable_high_gain_fold_passes_with_the_traced_folds_tolerance():
    from bngraph.compare import fold_tolerance
    from bngraph.fold_untraced import FALLBACK

    torch.manual_seed(0)
    model = _nearly_dead(_DataDependent())
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model, [x])  # checked against the model inside, within fold_tolerance
    assert report.facts["tracing"] == FALLBACK
    (row,) = report.sections["folded"]
    assert row["node"] == "bn" and row["into"] == "conv" and row["rounding_gain"] > 1e5
    assert any(n.startswith("bn: its variance is so small") for n in report.notes)
    # The difference is float32 rounding magnified: beyond verify's default tolerance (measured:
    # 0.003-0.007 of the output's RMS on seeds 0-2), within the traced fold's.
    with pytest.raises(CheckFailed, match="differs from the model it was made from"):
        check_same_function(model, folded, [x], what="the folded model")
    tolerance = fold_tolerance(row["rounding_gain"])
    check_same_function(model, folded, [x], what="the folded model", atol=tolerance, rtol=tolerance)


def test_an_untraceable_fold_skips_a_layer_with_a_backward_hook():
    torch.manual_seed(0)
    model = randomize_bn(_DataDependent())
    model.conv.register_full_backward_hook(lambda m, grad_in, grad_out: None)
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model, [x])
    assert report.sections["folded"] == []
    assert report.sections["remaining"] == [
        {"node": "bn", "reason": "conv has a backward hook; folding a BatchNorm into it would change what it sees"}
    ]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


class ClampedBN(nn.BatchNorm2d):  # an overflow guard after the BN, as fp16 code adds
    def forward(self, x):
        return super().forward(x).clamp(-8, 8)


def test_an_untraceable_fold_leaves_a_batchnorm_subclass_that_computes_more():
    # Folded module by module, it became an Identity and its clamp was lost: the example input
    # never reached it, the check passed, and inputs x10 were 0.25 off.
    torch.manual_seed(0)
    model = _DataDependent()
    model.bn = ClampedBN(model.bn.num_features)
    randomize_bn(model)
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model, [x])
    assert report.sections["remaining"] == [
        {"node": "bn", "reason": "ClampedBN overrides BatchNorm's forward: folding it would drop what else it computes"}]
    with torch.no_grad():
        torch.testing.assert_close(folded(x * 10), model(x * 10), rtol=0, atol=0)
    # The same forward set on a plain BN's instance was folded, and the whole fold then failed
    # its check (exit 1) instead of leaving that one BN.
    patched = randomize_bn(_DataDependent())
    patched.bn.forward = lambda x, bn=patched.bn: nn.BatchNorm2d.forward(bn, x).clamp(-8, 8)
    folded, report = fold(patched, [x])
    assert report.sections["remaining"] == [
        {"node": "bn", "reason": "its instance overrides BatchNorm's forward: folding it would drop what else it computes"}]


class FixedFilter(nn.Module):
    """A fixed Sobel filter held as a buffer (not trained), as edge and blur layers are written."""

    def __init__(self, persistent: bool = True):
        super().__init__()
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernel", torch.stack([sobel, sobel.T]).unsqueeze(1).repeat(1, 3, 1, 1), persistent=persistent)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.kernel, padding=1))


@pytest.mark.parametrize("persistent", [True, False], ids=["buffer", "non-persistent-buffer"])
def test_a_fold_into_a_weight_held_as_a_buffer_is_what_the_fold_returns(persistent):
    # fold put back every buffer its checks might have moved (a counter) after the check: the
    # folded kernel too, so the result, checked exact, came back 6.6x its RMS off.
    model = randomize_bn(FixedFilter(persistent)).eval()
    folded, report = fold(model, [torch.randn(2, 3, 8, 8)])
    assert batch_norms_left(folded) == [] and [r["node"] for r in report.sections["folded"]] == ["bn"]
    x = torch.rand(5, 3, 8, 8) * 10 + 3
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-4)


class ChecksItsInput(nn.Module):
    """A layer and its BN behind a NaN check torch.fx cannot trace: folded module by module."""

    def __init__(self, layer: nn.Module, channels: int):
        super().__init__()
        self.layer, self.bn = layer, nn.BatchNorm2d(channels)

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("a NaN in the input")
        return torch.relu(self.bn(self.layer(x)))


@pytest.mark.parametrize(("layer", "channels"), [
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), 6),
    (nn.ConvTranspose2d(4, 4, 3, stride=2, groups=4, bias=False), 4),
    (nn.Conv2d(4, 6, 3, groups=2), 6),
], ids=["transposed-grouped", "transposed-depthwise", "grouped"])
def test_a_grouped_layer_folds_module_by_module(layer, channels):
    # torch's fuse_conv_bn_weights(transpose=True) scales the wrong weight axis when groups > 1:
    # a traceback, or a weight of another shape blamed on the model.
    model = randomize_bn(ChecksItsInput(layer, channels)).eval()
    x = torch.randn(2, 4, 5, 5)
    folded, report = fold(model, [x])
    assert [r["node"] for r in report.sections["folded"]] == ["bn"]
    probe = torch.rand(3, 4, 5, 5) * 10 + 3
    with torch.no_grad():
        torch.testing.assert_close(folded(probe), model(probe), rtol=1e-5, atol=1e-4)


class WeightStandardizedConv2d(nn.Conv2d):
    """HuggingFace BiT's: the weight normalized by F.batch_norm(training=True) on each call."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-8).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_batch_norm_of_a_weight_is_no_batchnorm_to_refuse(tmp_path):
    # Export refused it for "normalizing with each batch's statistics": it normalizes no batch.
    model = randomize_bn(nn.Sequential(WeightStandardizedConv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model, [x])
    assert report.sections["remaining"] == [] and batch_norms_left(folded) == []
    assert bngraph.export(model, [x], tmp_path / "m.onnx")


class SharesItsWeightsMemory(nn.Module):
    """Behind a check torch.fx cannot trace: a conv whose weight's memory is also a buffer (made as
    `conv.weight.detach()`), read by a second convolution."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.register_buffer("kernel", self.conv.weight.detach())

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("a NaN in the input")
        return F.conv2d(torch.relu(self.bn(self.conv(x))), self.kernel, padding=1)


class CallsItsBnByAnotherName(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.norm = self.bn

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("a NaN in the input")
        return torch.relu(self.norm(self.conv(x)))


@pytest.mark.parametrize(("model", "reason"), [
    (SharesItsWeightsMemory(), "conv shares its weight or bias (or their memory) with another tensor"),
    (CallsItsBnByAnotherName(), "registered under several names (bn, norm)"),
], ids=["weight-memory-shared", "bn-with-two-names"])
def test_a_module_by_module_fold_leaves_a_bn_it_cannot_fold_everywhere(tmp_path, capsys, model, reason):
    # The copy fold works on held the buffer apart from the weight, so the fold passed its check
    # there and bngraph died on the model rebuilt from what it saved ("bngraph bug", a traceback);
    # the BN known by two names was replaced at one, and the forward called it at the other.
    model = randomize_bn(model).eval()
    folded, report = fold(model, [torch.randn(2, 4, 6, 6)])
    assert any(row["node"] == "bn" and reason in row["reason"] for row in report.sections["remaining"])
    probe = torch.rand(3, 4, 6, 6) * 10 + 3
    with torch.no_grad():
        torch.testing.assert_close(folded(probe), model(probe), rtol=1e-5, atol=1e-4)


class NormalizesAConvsLengthAfterAReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)  # (N, 5, 5): channels == length

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("a NaN in the input")
        return self.bn(self.conv(x).reshape(-1, 5))  # the BN's features are the conv's positions


def test_a_module_by_module_fold_leaves_a_bn_over_a_convs_merged_leading_axes():
    # Taken for LeViT's Linear(x).flatten(0, 1): folded into the conv's channels, refused by the
    # final check (exit 1), so the model could not be folded at all.
    model = randomize_bn(NormalizesAConvsLengthAfterAReshape()).eval()
    folded, report = fold(model, [torch.randn(2, 3, 7)])
    [row] = report.sections["remaining"]
    assert row["node"] == "bn" and "leading axes merged" in row["reason"], row
    probe = torch.rand(4, 3, 7) * 10 + 3
    with torch.no_grad():
        torch.testing.assert_close(folded(probe), model(probe), rtol=1e-5, atol=1e-4)


HANDS_A_CONV_TO_A_FUNCTION_PY = '''
import torch
import torch.nn.functional as F
from torch import nn


def same_padding(x, conv):  # as transformers' apply_tf_padding: reads the conv module itself
    size = int(x.shape[-1])  # a Python int of a size: torch.fx cannot trace it, the call is kept whole
    pad = max(conv.stride[0] - size % conv.stride[0], 0)
    return F.pad(x, (0, pad, 0, pad))


class Net(nn.Module):
    example_input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        self.conv2(same_padding(y, self.conv2))  # computed and unused, as DeepLab's last backbone conv
        return y
'''


def test_a_layer_handed_whole_to_a_function_kept_whole_is_rebuilt_as_itself(tmp_path, capsys):
    # Its own call was dead code and removed; the saved model.py rebuilt it as a bare Module of
    # tensors, and the function read conv.stride from it: an AttributeError traceback, exit 1.
    (tmp_path / "net.py").write_text(HANDS_A_CONV_TO_A_FUNCTION_PY)
    assert main(["fold", f"{tmp_path / 'net.py'}:Net", "-o", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    folded = bngraph.load(tmp_path / "out")
    assert isinstance(folded.get_submodule("conv2"), nn.Conv2d)


AUTOCAST_MODELS = '''
import torch
from torch import nn


class Head(nn.Module):  # kept in float32 under the user's AMP, as mixed-precision code does
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.fc(x.float())


class Net(nn.Module):
    example_input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Head()

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class AllInBfloat16(Net):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(x)
'''


@pytest.mark.parametrize("name", ["Net", "AllInBfloat16"])
def test_a_forward_that_enters_autocast_keeps_it_in_the_folded_model(tmp_path, name):
    # torch.fx ran the `with torch.autocast(...)` at trace time and kept none of it: the fold's
    # model computed in float32 what the model computed in bfloat16, and in bfloat16, under the
    # user's AMP, the head the model kept in float32.
    (tmp_path / "m.py").write_text(AUTOCAST_MODELS)
    model = randomize_bn(bngraph.load(f"{tmp_path}/m.py:{name}"), seed=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert main(["fold", f"{tmp_path}/m.py:{name}", "--weights", str(tmp_path / "w.pt"), "-o", str(tmp_path / "f")]) == 0
    folded = bngraph.load(tmp_path / "f")
    assert not [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        head_in = torch.relu(model.bn(model.conv(x))).mean((2, 3))
        assert model.eval()(x).dtype == folded.eval()(x).dtype == torch.float32  # the head ran in float32
        torch.testing.assert_close(folded.head(head_in), model.head(head_in), rtol=0, atol=0)


MODE_KEPT_MODELS = '''
import torch
from torch import nn


class AdaptsAtTest(nn.Module):  # test-time adaptation: the first BN always normalizes with its batch
    example_input_shape = (4, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        self.bn.train()
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


class InBfloat16(nn.Module):
    example_input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.bfloat16()

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x.bfloat16()))).float()
'''


def test_what_fold_leaves_and_export_cannot_fold_is_not_promised_to_export(tmp_path, capsys):
    # The note said "those left can still be folded by `bngraph export`", which then refused them.
    (tmp_path / "m.py").write_text(MODE_KEPT_MODELS)
    assert main(["fold", f"{tmp_path}/m.py:AdaptsAtTest", "-o", str(tmp_path / "f"), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert not [note for note in notes if "bngraph export" in note]
    assert main(["export", f"{tmp_path}/m.py:AdaptsAtTest", "-o", str(tmp_path / "m.onnx")]) == 2


def test_a_bfloat16_model_whose_file_onnx_refuses_is_one_line(tmp_path, capsys):
    # ONNX's Conv takes no bfloat16: the passes' final check ended in two tracebacks, exit 1.
    (tmp_path / "m.py").write_text(MODE_KEPT_MODELS)
    assert main(["export", f"{tmp_path}/m.py:InBfloat16", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "export the model in float32" in err.strip().splitlines()[-1]
    assert not (tmp_path / "m.onnx").exists()


WITH_DROPOUT_PY = '''
import torch.nn as nn, torch.nn.functional as F

class Net(nn.Module):
    example_input_shape = (2, 3, 28, 28)
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(8, 4)
    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(self.drop(F.dropout(x, 0.3, self.training)))
'''


@pytest.mark.parametrize(("models", "extra", "says"), [
    ("AUTOCAST_MODELS", ["--input-shape", "2,3,28,28"], "it trained with no BatchNorm;"),
    # The note named the BatchNorms only: fine-tuning ran without dropout too, without a word.
    ("WITH_DROPOUT_PY", [], "it trained with no BatchNorm and without the dropout the fold removed"),
], ids=["batchnorms", "dropout"])
def test_training_a_folded_model_says_what_it_trains_without(models, extra, says, tmp_path, capsys):
    from tests.test_data_formats import write_npz

    (tmp_path / "m.py").write_text(globals()[models])
    assert main(["fold", f"{tmp_path}/m.py:Net", "-o", str(tmp_path / "folded")]) == 0
    rng = np.random.default_rng(0)
    data = write_npz(tmp_path / "d.npz", layout="NCHW", y_train=rng.integers(0, 4, 40), y_test=rng.integers(0, 4, 12))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "folded"), "--data", str(data), *extra, "--steps", "2", "--batch-size", "8",
                 "--quiet", "-o", str(tmp_path / "run"), "--json"]) == 0
    assert any(says in note for note in json.loads(capsys.readouterr().out)["notes"])
