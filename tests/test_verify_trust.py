"""verify says PASSED only when it is true: a scale-free tolerance, every output compared
(dataclasses, dicts, nested), 0-d outputs, and each side with its own weights."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bngraph
from bngraph.cli import main
from bngraph.errors import UserError
from bngraph.export import export
from bngraph.fold import fold
from bngraph.runners import named_tensors, random_batches
from bngraph.compare import ONNX_TOLERANCE, TORCH_TOLERANCE, compare
from bngraph.verify import verify
from tests.util import randomize_bn


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# ---- the rule scales with the output ---------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
@pytest.mark.parametrize("tolerance", [ONNX_TOLERANCE, TORCH_TOLERANCE])
def test_a_one_percent_error_fails_at_any_output_scale(scale, tolerance):
    rng = np.random.default_rng(0)
    reference = [scale * rng.standard_normal((7, 10)) for _ in range(3)]
    relative = [r * 1.01 for r in reference]  # 1% of each element
    noise = [r + 0.01 * scale * rng.standard_normal(r.shape) for r in reference]  # 1% of the output's size
    for candidate in (relative, noise):
        diff = compare("y", reference, candidate, tolerance, tolerance)
        assert not diff.passed and diff.excess > 10, diff.line()


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_float32_rounding_passes_at_any_output_scale(scale):
    rng = np.random.default_rng(1)
    reference = [scale * rng.standard_normal((7, 10)) for _ in range(3)]
    # float32 keeps 24 bits: a float32 copy is what another kernel's rounding looks like, 10x over.
    candidate = [r + 10 * (r.astype(np.float32).astype(np.float64) - r) for r in reference]
    diff = compare("y", reference, candidate, TORCH_TOLERANCE, TORCH_TOLERANCE)
    assert diff.passed and diff.excess < 0.1, diff.line()


def test_the_issue_example_67_percent_off_a_tiny_output_fails():
    reference = np.full((4, 10), 4e-5)
    diff = compare("y", [reference], [reference * 1.67], ONNX_TOLERANCE, ONNX_TOLERANCE)
    assert not diff.passed and diff.failed_elements == 40


class TinyOutput(nn.Module):
    """A conv-BN net whose output is of magnitude ~1e-5 (as a loss term or a small head can be)."""

    def __init__(self, factor: float):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.factor = factor

    def forward(self, x):
        out = self.bn(self.conv(x)).relu().mean((2, 3))
        return self.head(out) * self.factor


@pytest.mark.parametrize("factor", [1e-6, 1.0, 1e6])
def test_a_correct_fold_passes_and_a_one_percent_wrong_one_fails(factor):
    torch.manual_seed(0)
    model = randomize_bn(TinyOutput(factor))
    x = torch.randn(2, 3, 8, 8)
    folded, _ = fold(model, [x])
    batches = random_batches([(2, 3, 8, 8)])
    result = verify(model, folded, batches)
    assert result, result.lines()
    with torch.no_grad():  # the folded model off by 1%, as a fold with a wrong statistic would be
        folded.head.weight.mul_(1.01)
    assert not verify(model, folded, batches)


HALF_PY = """
import torch
from torch import nn


class Half(nn.Module):
    example_input_shape = (2, 3, 8, 8)
    example_input_dtypes = ["float16"]

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)
        self.bn.weight.data.uniform_(0.5, 1.5)
        self.bn.bias.data.uniform_(-1, 1)
        self.half()

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))
"""


def test_a_float16_model_folds_and_exports_and_a_one_percent_wrong_fold_still_fails(tmp_path):
    # The fold rounds W * s to float16: ~3 of its epsilons (passes at --atol 0.0029), which
    # float32's tolerances refused: a correct fold of a float16 model could not be written. Its
    # outputs get 4 epsilons.
    (tmp_path / "half.py").write_text(HALF_PY)
    model = tmp_path / "half.py:Half"
    code, out, err = run_cli("fold", model, "-o", tmp_path / "folded", "--json")
    assert code == 0, err
    assert json.loads(out)["batchnorms_after"] == 0
    code, out, err = run_cli("export", model, "-o", tmp_path / "half.onnx", "--json")
    assert code == 0 and json.loads(out)["passed"] is True, err
    code, out, _ = run_cli("verify", model, tmp_path / "half.onnx", "--json")
    report = json.loads(out)
    assert code == 0 and report["atol"] == report["rtol"] == [4 * float(np.finfo(np.float16).eps)]

    import bngraph

    folded = bngraph.load(tmp_path / "folded")
    assert folded.conv.weight.dtype == torch.float16
    with torch.no_grad():  # as a fold with a statistic 1% off would be
        folded.head.weight.mul_(1.01)
    original = bngraph.load(str(model))
    batches = random_batches([(2, 3, 8, 8)], dtypes=["float16"])
    assert verify(original, bngraph.load(tmp_path / "folded"), batches)
    assert not verify(original, folded, batches)


def test_the_passing_line_states_the_rule_and_the_margin():
    reference = [np.linspace(-1, 1, 50)]
    candidate = [reference[0] + 1e-6]
    line = compare("logits", reference, candidate, 1e-4, 1e-4, ("torch", "ort-enable-all")).line()
    scale = np.sqrt(np.mean(reference[0] ** 2))
    assert line.startswith("PASSED | Output: 'logits' | ort-enable-all vs torch | 1 batches, 50 elements | ")
    assert f"|c - r| <= 0.0001 x {scale:.3g} (output RMS) + 0.0001 x |r| everywhere, worst at " in line
    assert "max |c - r| 1e-06" in line


def test_json_rows_hold_numbers_not_strings():
    diff = compare("y", [np.array([1.0, 0.0])], [np.array([1.0, np.nan])], 1e-4, 1e-4)
    row = diff.row()
    assert row["failed_elements"] == 1 and row["elements"] == 2
    assert row["max_abs"] is None and row["excess"] is None  # inf is not JSON: null
    json.dumps(row, allow_nan=False)
    for key, value in row.items():
        assert not isinstance(value, str) or key in ("output", "runtime"), key


# ---- a failure says whether the model's own float32 rounding explains it ----------------------


class NearlyEqualFeatures(nn.Module):
    """A LayerNorm over features that differ by 5e-4 of their size: subtracting their mean cancels
    most of float32's digits, so the model's float32 output strays from its exact result."""

    def __init__(self, offset: float = 100.0, gain: float = 1.0):
        super().__init__()
        self.offset, self.gain = offset, gain
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.offset + 0.05 * x) * self.gain


@pytest.mark.parametrize("gain, verdict", [(1.0, "not a wrong result"), (1.01, "computes something else")])
def test_a_failure_against_an_ill_conditioned_model_says_whether_rounding_explains_it(gain, verdict):
    # The candidate drops the offset, which LayerNorm removes anyway: exact to float32 (gain 1),
    # or 1% off (gain 1.01). Both fail the 1e-5 check against the model's own noisy float32.
    torch.manual_seed(0)
    reference = NearlyEqualFeatures()
    candidate = NearlyEqualFeatures(offset=0.0, gain=gain)
    candidate.load_state_dict(reference.state_dict())
    result = verify(reference, candidate, random_batches([(4, 16)], (1, 7)))
    assert not result
    theirs, own = result.worst.from_exact
    assert 1e-5 < own < 1e-3  # the model's own float32 output is off its float64 one
    assert (theirs < own) if gain == 1.0 else (theirs > 10 * own)
    assert verdict in result.lines()[-1] and result.lines()[-1].startswith("FAILED | against torch's exact (float64)")
    assert result.worst.row()["reference_from_exact"] == pytest.approx(own, rel=1e-3)


class RandomMasking(nn.Module):
    """ViTMAE's embeddings in miniature: a random half of the patches kept, in eval mode too."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x):  # (N, T, 16)
        noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
        keep = noise.argsort(dim=1)[:, : x.shape[1] // 2]
        return self.proj(torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])))


def test_a_model_that_draws_random_numbers_is_named_as_such_not_as_rounding(tmp_path):
    torch.manual_seed(0)
    result = export(RandomMasking(), [torch.randn(2, 6, 16)], tmp_path / "mae.onnx")
    assert not result and not (tmp_path / "mae.onnx").exists()
    assert result.verification.worst.reference_varies and result.verification.worst.from_exact is None
    assert "gives another output when run again on the same batch" in result.verification.lines()[-1]


class Float64Branch(nn.Module):
    """Computes something else in float64 than in float32: its float64 run is no exact result."""

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return x * (3.0 if x.dtype == torch.float64 else self.gain)


def test_a_model_that_branches_on_float64_gets_no_rounding_verdict():
    result = verify(Float64Branch(), Float64Branch(1.01), random_batches([(4, 16)], (1, 7)))
    assert not result and result.worst.from_exact is not None
    verdict = result.lines()[-1]
    assert "says nothing about the candidate" in verdict and "rounding that this model amplifies" not in verdict


def test_a_passing_check_runs_no_float64_copy():
    result = verify(NearlyEqualFeatures(offset=0.0), NearlyEqualFeatures(offset=0.0), random_batches([(4, 16)], (1, 7)))
    assert result and all(d.from_exact is None for d in result.diffs)


# ---- every output is compared ------------------------------------------------------------------


@dataclasses.dataclass
class ModelOutput(OrderedDict):
    """HuggingFace's ModelOutput in miniature: a dataclass AND an OrderedDict of its non-None fields."""

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


@dataclasses.dataclass
class PlainOutput:
    loss: torch.Tensor
    extra: dict
    steps: int = 3  # not a tensor: not an output to compare


class Pair(NamedTuple):
    mean: torch.Tensor
    spread: torch.Tensor


class HfStyle(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.classifier = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        hidden = torch.tanh(self.embed(x))
        return ModelOutput(logits=self.classifier(hidden), hidden_states=(x, hidden))


def test_named_tensors_flattens_user_structures():
    t = torch.zeros(1)
    out = {
        "hf": ModelOutput(logits=t, hidden_states=(t, t)),
        "plain": PlainOutput(loss=t, extra={"pair": Pair(t, t), "none": None}),
        "list": [t, None, "text"],
    }
    names = [name for name, _ in named_tensors(out)]
    assert names == ["hf.logits", "hf.hidden_states.0", "hf.hidden_states.1", "plain.loss",
                     "plain.extra.pair.mean", "plain.extra.pair.spread", "list.0"]
    assert [n for n, _ in named_tensors((t, t))] == ["output.0", "output.1"]
    assert [n for n, _ in named_tensors(t)] == ["output"]


def test_dataclass_outputs_are_compared_and_two_unrelated_models_fail():
    batches = random_batches([(2, 6)])
    same = verify(HfStyle(0), HfStyle(0), batches)
    assert same and [d.output for d in same.diffs] == ["logits", "hidden_states.0", "hidden_states.1"]
    other = verify(HfStyle(0), HfStyle(1), batches)
    assert not other and {d.output for d in other.diffs if not d.passed} == {"logits", "hidden_states.1"}


class Returns(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.layer = kind, nn.Linear(6, 3)

    def forward(self, x):
        y = self.layer(x)
        if self.kind == "nothing":
            return {"steps": 3, "name": "none"}
        if self.kind == "two":
            return {"logits": y, "probs": y.softmax(-1)}
        return {"logits": y}


def test_comparing_nothing_is_an_error():
    with pytest.raises(UserError, match="nothing to compare"):
        verify(Returns("nothing"), Returns("nothing"), random_batches([(2, 6)]))


def test_different_output_structures_fail_with_the_reason():
    result = verify(Returns("one"), Returns("two"), random_batches([(2, 6)]))
    assert not result and "output structures differ" in result.diffs[0].problem
    assert "'probs'" in result.lines()[-1]


def two_output_onnx() -> bytes:
    """y = x @ W and its softmax, as two graph outputs named by the file."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32), "W")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "W"], ["scores"]),
            onnx.helper.make_node("Softmax", ["scores"], ["probs"]),
        ],
        "two",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 6])],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", 3]) for n in ("scores", "probs")],
        [w],
    )
    # IR 8 is opset 17's; make_model's default is the onnx package's newest (14 in onnx 1.23),
    # which an older onnxruntime refuses to load (1.30 reads up to 13).
    model = onnx.helper.make_model(graph, ir_version=8, opset_imports=[onnx.helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_an_onnx_graph_is_paired_by_position_and_counts_are_checked():
    two = two_output_onnx()
    result = verify(two, two, random_batches([(2, 6)]))
    assert result and [d.output for d in result.diffs] == ["scores", "probs"] * 2
    result = verify(Returns("one"), two, random_batches([(2, 6)]))
    assert not result and len(result.diffs) == 2  # one line per onnxruntime level
    assert all(
        d.problem and d.problem.startswith("2 outputs ['scores', 'probs'] vs 1 ['logits']") for d in result.diffs
    )


# ---- 0-d outputs ---------------------------------------------------------------------------------


class MeanLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += 1.0  # in place, as users write it
        return out.relu().mean()


def bn_then_mean_onnx() -> bytes:
    """Conv -> BatchNormalization (random statistics) -> the mean of everything: a 0-d output."""
    rng = np.random.default_rng(0)

    def init(name, *shape, low=None):
        values = rng.uniform(low, 2.0, shape) if low else rng.standard_normal(shape)
        return onnx.numpy_helper.from_array(values.astype(np.float32), name)

    nodes = [
        onnx.helper.make_node("Conv", ["x", "W"], ["c"]),
        onnx.helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"]),
        onnx.helper.make_node("Relu", ["n"], ["r"]),
        onnx.helper.make_node("ReduceMean", ["r"], ["loss"], keepdims=0),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "loss",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, [])],
        [init("W", 4, 3, 3, 3), init("gamma", 4), init("beta", 4), init("mean", 4), init("var", 4, low=0.5)],
    )
    model = onnx.helper.make_model(graph, ir_version=8, opset_imports=[onnx.helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_a_0d_output_verifies_exports_and_folds_in_onnx(tmp_path):
    model = randomize_bn(MeanLoss())
    batches = random_batches([(2, 3, 8, 8)])
    assert verify(model, model, batches)
    result = export(model, [torch.randn(2, 3, 8, 8)], tmp_path / "loss.onnx")
    assert result and result.verification.diffs[0].elements == len(result.verification.batch_sizes)  # one per batch
    (tmp_path / "bn.onnx").write_bytes(bn_then_mean_onnx())
    code, out, err = run_cli("fold", tmp_path / "bn.onnx", "-o", tmp_path / "folded.onnx", "--json")
    assert code == 0 and json.loads(out)["batchnorms_after"] == 0, err
    assert onnx.load(str(tmp_path / "folded.onnx")).graph.output[0].type.tensor_type.shape.dim == []


# ---- each side takes its weights -------------------------------------------------------------------

NET_PY = """
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))
"""


def test_verify_weights_makes_a_correct_fold_pass(tmp_path):
    (tmp_path / "model.py").write_text(NET_PY)
    net_py = f"{tmp_path / 'model.py'}:Net"
    torch.manual_seed(5)
    from bngraph.load import load

    trained = randomize_bn(load(net_py), seed=3)
    torch.save(trained.state_dict(), tmp_path / "net.pt")
    code, _, err = run_cli("fold", net_py, "--weights", tmp_path / "net.pt", "-o", tmp_path / "folded")
    assert code == 0, err
    code, out, _ = run_cli("verify", net_py, tmp_path / "folded")
    assert code == 1  # a fresh init against the folded trained weights
    code, out, err = run_cli("verify", net_py, tmp_path / "folded", "--weights", tmp_path / "net.pt")
    assert code == 0 and out.strip().splitlines()[-1].startswith("PASSED"), out + err
    code, out, err = run_cli("verify", tmp_path / "folded", net_py, "--candidate-weights", tmp_path / "net.pt")
    assert code == 0, out + err
    code, _, err = run_cli("verify", net_py, tmp_path / "folded", "--weights", tmp_path / "folded" / "weights.pt")
    assert code == 2 and err.startswith("bngraph: error: weights") and err.count("\n") == 1


class WithExtras(nn.Module):
    """A classifier that also returns what is not a tensor: a number computed from the output
    (`.item()`), a value of its own, and an entry that may be None."""

    def __init__(self, extra, entry):
        super().__init__()
        self.layer, self.extra, self.entry = nn.Linear(6, 3), extra, entry

    def forward(self, x):
        y = self.layer(x)
        return {"logits": y, "total": y.sum().item(), "extra": self.extra, "entry": self.entry}


def _seeded(build):
    torch.manual_seed(0)
    return build()


def test_what_is_not_a_tensor_is_compared_too():
    batches = random_batches([(2, 6)])
    same = verify(_seeded(lambda: WithExtras(0.5, None)), _seeded(lambda: WithExtras(0.5, None)), batches)
    assert same, same.lines()
    assert {d.output for d in same.diffs} == {"logits", "total", "extra", "entry"}
    number = verify(_seeded(lambda: WithExtras(0.5, None)), _seeded(lambda: WithExtras(-123.0, None)), batches)
    assert not number and [d.output for d in number.diffs if not d.passed] == ["extra"]
    entry = verify(_seeded(lambda: WithExtras(0.5, None)), _seeded(lambda: WithExtras(0.5, "cached")), batches)
    assert not entry and "not the same: 'cached' vs None" in entry.lines()[-1]
    structure = verify(_seeded(lambda: WithExtras(0.5, None)), _seeded(lambda: WithExtras(0.5, [1, 2])), batches)
    assert not structure and "output structures differ" in structure.diffs[0].problem


def test_a_number_computed_from_the_output_is_compared_within_the_tolerance():
    # `.item()` of a sum rounds as the tensors do: a fold that changes the sum by rounding passes,
    # one that changes it by more fails, as its tensor would.
    reference = _seeded(lambda: WithExtras(0.5, None))
    candidate = _seeded(lambda: WithExtras(0.5, None))
    with torch.no_grad():
        candidate.layer.bias += 1e-3
    result = verify(reference, candidate, random_batches([(2, 6)]))
    assert {d.output for d in result.diffs if not d.passed} == {"logits", "total"}


class NaNWhereLarge(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 4)

    def forward(self, x):
        y = self.layer(x)
        return y + torch.where(x[:, :1] > 1.0, float("nan"), 0.0)


def test_nan_against_a_number_fails_at_any_tolerance():
    nan_model = _seeded(lambda: NaNWhereLarge())
    plain = _seeded(lambda: NaNWhereLarge())
    plain.forward = lambda x: plain.layer(x)  # the same layer, without the NaN
    batches = [[np.full((2, 6), 2.0, dtype=np.float32)]]
    result = verify(plain, nan_model, batches, atol=1e30, rtol=1e30)  # inf itself is refused: it passes anything
    assert not result
    assert "NaN or inf on one side only, which no tolerance passes" in result.lines()[-1]


# ---- a forward that writes into its input ----------------------------------------------------

PREPROCESS_IN_PLACE = '''
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (4, 6)

    def __init__(self, preprocess=True):
        super().__init__()
        self.preprocess = preprocess
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        if self.preprocess:
            x.sub_(0.5).div_(0.25)  # the user's normalization, done in place on the input
        return self.out(torch.relu(self.bn(self.fc(x))))


class Plain(Net):
    def __init__(self):
        super().__init__(preprocess=False)
'''


def test_a_forward_that_writes_into_its_input_is_checked_on_the_batch_it_was_given(tmp_path):
    # Each run got the batch the run before had written into: verify passed the model against
    # the same model without its preprocessing (the second run saw preprocessed inputs), and the
    # commands' own checks compared runs on different batches, failing as "random numbers".
    (tmp_path / "net.py").write_text(PREPROCESS_IN_PLACE)
    torch.manual_seed(0)
    net = tmp_path / "net.py"
    weights = tmp_path / "w.pt"
    model = bngraph.load(f"{net}:Net")
    randomize_bn(model)
    torch.save(model.state_dict(), weights)
    code, out, _ = run_cli("verify", f"{net}:Net", f"{net}:Plain", "--weights", weights, "--candidate-weights", weights)
    assert code == 1 and "FAILED" in out
    code, out, err = run_cli("verify", f"{net}:Net", f"{net}:Net", "--weights", weights, "--candidate-weights", weights)
    assert code == 0, out + err
    for verb, target in (("fold", "folded"), ("insert", "inserted"), ("export", "net.onnx")):
        code, out, err = run_cli(verb, f"{net}:Net", "--weights", weights, "-o", tmp_path / target)
        assert code == 0 and (tmp_path / target).exists(), out + err
    code, out, err = run_cli("verify", f"{net}:Net", tmp_path / "folded", "--weights", weights)
    assert code == 0, out + err
    code, out, err = run_cli("verify", f"{net}:Net", tmp_path / "net.onnx", "--weights", weights)
    assert code == 0, out + err


# ---- inputs paired by name -------------------------------------------------------------------


def _difference_file(path, listed, first, second):
    """An ONNX graph computing first - second, its inputs listed in the order `listed`."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sub", [first, second], ["z"])], "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3]) for name in listed],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


class Difference(nn.Module):
    def forward(self, x, y):
        return x - y


def test_inputs_are_paired_by_name_not_by_the_order_a_graph_lists_them(tmp_path):
    # Fed by position, x - y (listing x, y) against y - x (listing y, x) passed, and the same
    # function listed the other way failed. onnxruntime's users feed inputs by name.
    a = _difference_file(tmp_path / "a.onnx", ["x", "y"], "x", "y")
    other = _difference_file(tmp_path / "other.onnx", ["y", "x"], "y", "x")
    same = _difference_file(tmp_path / "same.onnx", ["y", "x"], "x", "y")
    assert run_cli("verify", a, other)[0] == 1
    assert run_cli("verify", a, same)[0] == 0
    batches = random_batches([(1, 3), (1, 3)], (1, 7))
    assert verify(Difference(), same, batches) and not verify(Difference(), other, batches)


# ---- token ids reach every row of the table ---------------------------------------------------

TOKEN_MODELS = '''
import torch
from torch import nn


class Tokens(nn.Module):
    example_input_shape = (4, 7)
    example_input_dtypes = ["int64"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


class FirstRowsOnly(Tokens):
    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.emb.weight[2:] = 0
'''


def test_token_ids_are_drawn_from_the_whole_table(tmp_path):
    # Ids of 0 and 1 only: two models differing in rows 2-99 of their embedding passed.
    (tmp_path / "tokens.py").write_text(TOKEN_MODELS)
    tokens = tmp_path / "tokens.py"
    code, out, _ = run_cli("verify", f"{tokens}:Tokens", f"{tokens}:FirstRowsOnly")
    assert code == 1 and "FAILED" in out
    assert run_cli("export", f"{tokens}:Tokens", "-o", tmp_path / "tokens.onnx")[0] == 0
    from bngraph.runners import embedding_bounds, onnx_inputs

    assert onnx_inputs(tmp_path / "tokens.onnx").index_bounds == [100]
    assert embedding_bounds(bngraph.load(f"{tokens}:Tokens"), [np.zeros((2, 7), np.int64)]) == [100]
    code, out, _ = run_cli("verify", tmp_path / "tokens.onnx", f"{tokens}:FirstRowsOnly")
    assert code == 1 and "FAILED" in out
    assert run_cli("verify", tmp_path / "tokens.onnx", f"{tokens}:Tokens")[0] == 0


@pytest.mark.parametrize("row", [57, 3])
def test_every_row_of_a_table_the_batches_can_reach_is_compared(tmp_path, row):
    # Ids drawn independently left a third of the rows out of the 70 positions of the batches
    # (1, 1, 1 and 7 rows of 7): a model with one row of its table changed passed.
    (tmp_path / "tokens.py").write_text(TOKEN_MODELS.replace("nn.Embedding(100, 8)", "nn.Embedding(60, 8)") + f"""

class OneRowChanged(Tokens):
    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.emb.weight[{row}] *= -1
""")
    tokens = tmp_path / "tokens.py"
    code, out, _ = run_cli("verify", f"{tokens}:Tokens", f"{tokens}:OneRowChanged", "--json")
    assert code == 1 and json.loads(out)["passed"] is False
    # Where the positions are fewer than the rows, the report says how many rows were reached.
    (tmp_path / "wide.py").write_text(TOKEN_MODELS.replace("nn.Embedding(100, 8)", "nn.Embedding(5000, 8)"))
    code, out, _ = run_cli("verify", f"{tmp_path}/wide.py:Tokens", f"{tmp_path}/wide.py:Tokens", "--json")
    assert code == 0
    assert any("a table of 5000 rows, of which the batches reached 70" in note for note in json.loads(out)["notes"])


SEQUENCE_MEAN = '''
import torch
from torch import nn


class SequenceMean(nn.Module):
    example_input_shape = (2, 16, 8)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x.mean(1))


class Baked(SequenceMean):  # what a tracing exporter makes of `x.sum(1) / int(x.shape[1])`
    def forward(self, x):
        return self.fc(x.sum(1) / 16)
'''


def test_a_file_declaring_a_symbolic_length_is_also_compared_at_another(tmp_path):
    # The file declares [batch, seq, 8] but divides by 16: verify compared at the PyTorch
    # example's length alone, and passed it.
    import warnings

    (tmp_path / "seq.py").write_text(SEQUENCE_MEAN)
    module = bngraph.load(f"{tmp_path}/seq.py:Baked")
    for name, model in (("baked", module), ("right", bngraph.load(f"{tmp_path}/seq.py:SequenceMean"))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (torch.randn(2, 16, 8),), tmp_path / f"{name}.onnx", dynamo=False,
                              input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
    code, out, _ = run_cli("verify", f"{tmp_path}/seq.py:SequenceMean", tmp_path / "baked.onnx", "--json")
    assert code == 1 and "also compared at (2, 32, 8)" in " ".join(json.loads(out)["notes"])
    code, out, _ = run_cli("verify", f"{tmp_path}/seq.py:SequenceMean", tmp_path / "right.onnx", "--json")
    assert code == 0 and json.loads(out)["batch_sizes"] == [1, 1, 1, 7, 2]
    # Two files, the length given: compared at twice it too.
    code, out, _ = run_cli("verify", tmp_path / "right.onnx", tmp_path / "baked.onnx", "--input-shape", "2,16,8",
                           "--json")
    assert code == 1 and "also compared at (2, 32, 8)" in " ".join(json.loads(out)["notes"])
    # A length the file fixes, given by --input-shape: one line naming the axis.
    code, _, err = run_cli("verify", f"{tmp_path}/seq.py:SequenceMean", tmp_path / "right.onnx", "--input-shape",
                           "2,16,4")
    assert code == 2 and "size 4 on axis 2; the file declares [?, ?, 8]" in err


def test_a_failure_against_an_onnx_reference_is_measured_against_its_own_levels(tmp_path):
    # A wrong candidate is far beyond what onnxruntime's own optimizations change in the reference.
    from tests.onnx_models import conv_bn_file

    reference = conv_bn_file()
    wrong = onnx.ModelProto()
    wrong.CopyFrom(reference)
    scale = next(t for t in wrong.graph.initializer if t.name == next(
        n.input[1] for n in wrong.graph.node if n.op_type == "BatchNormalization"))
    array = onnx.numpy_helper.to_array(scale) * 1.01
    scale.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), scale.name))
    result = verify(reference, wrong, random_batches([(1, 3, 8, 8)], (1, 7)))
    assert not result and result.worst.levels_apart is not None
    assert "so the candidate computes something else" in result.lines()[-1]


ONE_HOT_TOO = '''
import torch
import torch.nn.functional as F
from torch import nn


class OneHotToo(nn.Module):
    example_input_shape = (4, 7)
    example_input_dtypes = ["int64"]

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 8)

    def forward(self, ids):
        return self.emb(ids).mean(1) + F.one_hot(ids, 10).float().mean(1)[:, :8]
'''


def test_ids_that_also_index_a_smaller_table_stay_within_it(tmp_path):
    # Drawn below the embedding's 1000 rows, the same ids broke F.one_hot(ids, 10): verify of
    # a model against itself failed with the model's own IndexError.
    (tmp_path / "onehot.py").write_text(ONE_HOT_TOO)
    spec = f"{tmp_path / 'onehot.py'}:OneHotToo"
    assert run_cli("verify", spec, spec)[0] == 0


class Predicts(nn.Module):
    """Logits and the predicted token ids, as a language model's generate step returns them."""

    def __init__(self, shift: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.head, self.shift = nn.Linear(16, 50_000), shift

    def forward(self, x):
        logits = self.head(x)
        return {"logits": logits, "ids": logits.argmax(-1) + self.shift}


def test_integer_outputs_are_compared_exactly():
    # Judged as floats, by a fraction of the RMS of ids near 25,000, ids off by 3 passed.
    batches = random_batches([(1, 16)], (1, 7))
    result = verify(Predicts(), Predicts(shift=3), batches)
    ids = next(d for d in result.diffs if d.output == "ids")
    assert not result and not ids.passed and ids.failed_elements == ids.elements == 8
    assert "c == r (integers and booleans: exactly)" in ids.line()
    assert any("integers are compared exactly, whatever --atol says" in line for line in result.lines())
    assert verify(Predicts(), Predicts(), batches)


def _two_outputs_file(path, outputs: dict[str, str]):
    """An ONNX graph of x with the outputs named as `outputs` says ({name: op}), in that order."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node(op, ["x"], [name]) for name, op in outputs.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 5]) for name in outputs])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_outputs_are_paired_by_name_where_both_sides_name_the_same_ones(tmp_path):
    # By position, a=Relu, b=Neg against b=Relu, a=Neg passed: a user reading 'a' gets another function.
    ab = _two_outputs_file(tmp_path / "ab.onnx", {"a": "Relu", "b": "Neg"})
    swapped = _two_outputs_file(tmp_path / "swapped.onnx", {"b": "Relu", "a": "Neg"})
    listed_ba = _two_outputs_file(tmp_path / "ba.onnx", {"b": "Neg", "a": "Relu"})
    assert run_cli("verify", ab, swapped)[0] == 1
    assert run_cli("verify", ab, listed_ba)[0] == 0


class _ZetaAlpha(nn.Module):
    def forward(self, x):
        return {"zeta": torch.relu(x), "alpha": -x}


class _Difference(nn.Module):
    def forward(self, a, b):
        return a - 2 * b


def test_names_both_sides_use_at_other_positions_are_not_paired_by_position(tmp_path):
    # A file whose outputs another tool renamed ['q', 'zeta'] (its zeta holds the model's alpha) PASSED
    # as "Output 'zeta'"; one whose inputs are ['x', 'a'] got b's values in its 'a'.
    from onnx import TensorProto, helper

    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    renamed = _two_outputs_file(tmp_path / "renamed.onnx", {"q": "Relu", "zeta": "Neg"})
    result = verify(_ZetaAlpha(), renamed, [[x]])
    assert not result and "output 'zeta' is output 0 of" in result.diffs[0].problem

    nodes = [helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])),
             helper.make_node("Mul", ["a", "two"], ["twice"]), helper.make_node("Sub", ["x", "twice"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 5]) for n in ("x", "a")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "xa.onnx")
    with pytest.raises(UserError, match="has input .a. at 1, the other side at 0: fed by position"):
        verify(_Difference(), tmp_path / "xa.onnx", [[x, x]])
    # The model's side too, given the file's names (verify_models, for a model declaring no input):
    # a file exported with `b` as a keyword, skipping `a`, failed as "computes something else".
    with pytest.raises(UserError, match="_Difference's forward takes 'a' as input 0, the other side at 1"):
        verify(_Difference(), tmp_path / "xa.onnx", [[x, x]], input_names=["x", "a"])


class _WithOptionalInputs(nn.Module):
    def forward(self, x, past=None, mask=None):  # HF's style: optional inputs, exported as keywords
        y = 2 * x
        if past is not None:
            y = y + past
        return y * mask if mask is not None else y


def _x_and_mask_file(path, op: str):
    """A file of inputs [x, mask] computing op(2 x, mask), as an exporter writes forward(x, mask=m)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])),
             helper.make_node("Mul", ["x", "two"], ["twice"]), helper.make_node(op, ["twice", "mask"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 5]) for n in ("x", "mask")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_a_file_of_some_of_the_forwards_inputs_feeds_the_model_by_keyword(tmp_path):
    # [input_ids, token_type_ids] of HF BERT, fed by position, gave token_type_ids to attention_mask:
    # the correct file failed as "computes something else", a wrong one passed.
    rng = np.random.default_rng(0)
    batch = [rng.standard_normal((3, 5)).astype(np.float32), rng.uniform(0.5, 2, (3, 5)).astype(np.float32)]
    good, wrong = _x_and_mask_file(tmp_path / "good.onnx", "Mul"), _x_and_mask_file(tmp_path / "wrong.onnx", "Add")
    assert verify(_WithOptionalInputs(), good, [batch], input_names=["x", "mask"])
    assert not verify(_WithOptionalInputs(), wrong, [batch], input_names=["x", "mask"])
    assert verify(good, _WithOptionalInputs(), [batch], input_names=["x", "mask"])


OPTIONAL_INPUTS_PY = '''
from torch import nn


class Optional(nn.Module):
    def forward(self, x, past=None, mask=None):
        y = 2 * x
        if past is not None:
            y = y + past
        return y * mask if mask is not None else y


class DeclaresXAndPast(Optional):
    example_input_shapes = [(2, 5), (2, 5)]
'''


def test_a_file_taking_an_input_the_model_declares_no_shape_for_is_refused_naming_it(tmp_path):
    # The model declares (x, past); the file takes (x, mask): fed by position, mask got past's
    # values, and the correct file FAILED as "computes something else".
    (tmp_path / "m.py").write_text(OPTIONAL_INPUTS_PY)
    good = _x_and_mask_file(tmp_path / "good.onnx", "Mul")
    code, _, err = run_cli("verify", f"{tmp_path / 'm.py'}:DeclaresXAndPast", good)
    assert code == 2 and err == (f"bngraph: error: {good} takes input 'mask', which DeclaresXAndPast's forward takes "
                                 "as input 2 but declares no shape for (it declares x, past): a model that declares no "
                                 "input shapes is fed the file's inputs by name\n")
    assert run_cli("verify", f"{tmp_path / 'm.py'}:Optional", good)[0] == 0


UNUSED_INPUT_PY = '''
import torch
from torch import nn


class Unused(nn.Module):
    def forward(self, x, y):  # x is never used: torch.onnx's TorchScript exporter drops it
        return torch.relu(y)
'''


def test_a_file_lacking_an_input_the_forward_requires_is_refused_naming_it(tmp_path):
    # The file's inputs were ['y']; the model was called with one input, and Python's "missing 1
    # required positional argument" came with a hint about --static-input.
    from onnx import TensorProto, helper

    (tmp_path / "m.py").write_text(UNUSED_INPUT_PY)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    graph = helper.make_graph([helper.make_node("Relu", ["y"], ["out"])], "g", [y],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])])
    path = tmp_path / "u.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    code, _, err = run_cli("verify", f"{tmp_path / 'm.py'}:Unused", path)
    assert code == 2 and err == ("bngraph: error: Unused's forward requires ['x'], which the other side does not take "
                                 "(its inputs: ['y']; an exporter drops an input the forward never uses): verify feeds "
                                 "both sides the same inputs\n")


def test_an_onnx_graph_listing_one_output_twice_is_named_as_such(tmp_path):
    # Valid ONNX, which onnxruntime runs; the refusal spoke of dict keys joined with '.'.
    from onnx import TensorProto, helper

    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])], [y, y])
    path = tmp_path / "twice.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    code, out, err = run_cli("verify", path, path)
    assert code == 2 and err == f"bngraph: error: {path} lists the graph output 'y' twice: verify pairs outputs by " \
                                "name and cannot tell the two apart; list it once\n"


IDS_AND_FEATURES = '''
import torch
from torch import nn


class IdsX(nn.Module):
    example_input_shapes = [(2, 4), (2, 4)]
    example_input_dtypes = ["int64", "float32"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(50, 4), nn.Linear(4, 3)

    def forward(self, ids, x):
        return self.fc(self.emb(ids) + x.unsqueeze(-1))
'''


def test_inputs_of_other_dtypes_listed_in_another_order_get_their_own_dtypes(tmp_path):
    # The batches followed the model's order, their dtypes the ONNX file's: the ids got floats.
    (tmp_path / "ids.py").write_text(IDS_AND_FEATURES)
    spec = f"{tmp_path / 'ids.py'}:IdsX"
    assert run_cli("export", spec, "-o", tmp_path / "ids.onnx")[0] == 0
    model = onnx.load(str(tmp_path / "ids.onnx"))
    listed = list(model.graph.input)
    del model.graph.input[:]
    model.graph.input.extend(reversed(listed))  # x before ids, as another exporter may list them
    onnx.save(model, tmp_path / "x_ids.onnx")
    code, out, err = run_cli("verify", tmp_path / "x_ids.onnx", spec)
    assert code == 0, out + err


CAST_IDS = '''
import torch
import torch.nn.functional as F
from torch import nn


class CastFunctional(nn.Module):
    """int32 ids, cast before a functional lookup of a table the model holds as a parameter."""

    example_input_shape = (4, 7)
    example_input_dtypes = ["int32"]

    def __init__(self, rows_kept=100):
        super().__init__()
        torch.manual_seed(0)
        self.table, self.head = nn.Parameter(torch.randn(100, 8)), nn.Linear(8, 3)
        with torch.no_grad():
            self.table[rows_kept:] = 0

    def forward(self, ids):
        return self.head(F.embedding(ids.long(), self.table).mean(1))


class FirstRowsOnly(CastFunctional):
    def __init__(self):
        super().__init__(rows_kept=2)
'''


def test_token_ids_cast_before_a_functional_lookup_reach_the_whole_table(tmp_path):
    # Only an nn.Embedding called on the input itself was seen: these ids stayed 0 and 1.
    (tmp_path / "cast.py").write_text(CAST_IDS)
    cast = tmp_path / "cast.py"
    assert run_cli("verify", f"{cast}:CastFunctional", f"{cast}:FirstRowsOnly")[0] == 1
    assert run_cli("verify", f"{cast}:CastFunctional", f"{cast}:CastFunctional")[0] == 0


PIXELS_AND_BUCKETS = '''
import torch
from torch import nn


class Pixels(nn.Module):
    """Takes raw uint8 pixels (0..255), as deployed image models often do."""

    example_input_shape = (2, 3, 8, 8)
    example_input_dtypes = ["uint8"]

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x.float() / 255)


class WrappedPixels(Pixels):
    def forward(self, x):
        return self.conv(x.to(torch.int8).float() / 255)  # every pixel above 127 wraps negative


class Hashed(nn.Module):
    """A token embedding plus a hashed-bucket one (ids % 8), as fastText-style models do."""

    example_input_shape = (2, 5)
    example_input_dtypes = ["int64"]

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(100, 4)
        self.bucket = nn.Embedding(8, 4)

    def forward(self, ids):
        return self.tok(ids) + self.bucket(ids % 8)


class HashedBadRows(Hashed):
    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.tok.weight[8:] = torch.randn(92, 4) * 100  # a broken conversion past row 7
'''


def test_integer_inputs_reach_their_whole_range(tmp_path):
    # uint8 pixels were drawn as 0 and 1, so a wrap at 127 passed with error 0; and ids % 8 looked
    # up in an 8-row table bounded the ids at 8, leaving rows 8-99 of their own table uncompared.
    path = tmp_path / "ints.py"
    path.write_text(PIXELS_AND_BUCKETS)
    assert run_cli("verify", f"{path}:Pixels", f"{path}:WrappedPixels")[0] == 1
    assert run_cli("verify", f"{path}:Pixels", f"{path}:Pixels")[0] == 0
    assert run_cli("verify", f"{path}:Hashed", f"{path}:HashedBadRows")[0] == 1
    assert run_cli("verify", f"{path}:Hashed", f"{path}:Hashed")[0] == 0


MASKS = """
import torch
from torch import nn

T, D = 6, 8


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def attend(self, x, scores):
        return scores.softmax(-1) @ self.v(x)

    def scores(self, x):
        return self.q(x) @ self.k(x).transpose(1, 2) / D ** 0.5


class Masked(Attention):  # attention_mask (N, T) int64: 1 keep, 0 padding, as HuggingFace passes it
    def forward(self, x, mask):
        return self.attend(x, self.scores(x).masked_fill(mask[:, None, :] == 0, -1e9))


class IgnoresTheMask(Attention):
    def forward(self, x, mask):
        return self.attend(x, self.scores(x))


class Additive(Attention):  # HuggingFace's extended mask, (1 - mask) * -10000
    def forward(self, x, mask):
        return self.attend(x, self.scores(x) + (1.0 - mask[:, None, :].float()) * -10000.0)


class AdditiveOtherQuery(Additive):
    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.q.weight.mul_(-2.0)


class Lengths(Attention):  # key j is valid where j < length
    def forward(self, x, lengths):
        valid = torch.arange(T)[None, None, :] < lengths[:, None, None]
        return self.attend(x, self.scores(x).masked_fill(~valid, -1e9))


class LengthsOffByOne(Attention):
    def forward(self, x, lengths):
        valid = torch.arange(T)[None, None, :] <= lengths[:, None, None]
        return self.attend(x, self.scores(x).masked_fill(~valid, -1e9))
"""


@pytest.mark.parametrize(("a", "b", "second"), [("Masked", "IgnoresTheMask", "2,6"),
                                                ("Additive", "AdditiveOtherQuery", "2,6"),
                                                ("Lengths", "LengthsOffByOne", "2")])
def test_a_signed_integer_input_no_table_reads_keeps_its_meaning_at_0_and_1(tmp_path, a, b, second):
    # Drawn from -128..127, a mask almost never held 0, a mask of 127 saturated the softmax,
    # and lengths fell outside 0..T: each of these pairs passed.
    (tmp_path / "masks.py").write_text(MASKS)
    shapes = ["--input-shape", f"2,6,8;{second}", "--input-dtype", "float32;int64"]
    assert run_cli("verify", f"{tmp_path / 'masks.py'}:{a}", f"{tmp_path / 'masks.py'}:{b}", *shapes)[0] == 1
    assert run_cli("verify", f"{tmp_path / 'masks.py'}:{a}", f"{tmp_path / 'masks.py'}:{a}", *shapes)[0] == 0


class Scores(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y, "probs": y.softmax(-1)}


class ScoresOtherOrder(Scores):
    def forward(self, x):
        y = self.fc(x)
        return {"probs": y.softmax(-1), "logits": y}


def test_two_pytorch_models_pair_dict_outputs_by_key():
    # "output structures differ": a dict with its keys inserted in another order is the same dict.
    batches = random_batches([(2, 4)])
    assert verify(Scores(), ScoresOtherOrder(), batches)
    broken = ScoresOtherOrder()
    with torch.no_grad():
        broken.fc.bias.add_(0.1)
    assert not verify(Scores(), broken, batches)


class WeightedDifference(nn.Module):
    def forward(self, x, y):
        return x - 2 * y


class DifferenceNamedOtherwise(nn.Module):
    def forward(self, y, x):  # the same function of its first and second inputs as WeightedDifference
        return y - 2 * x


class DifferenceSwapped(nn.Module):
    def forward(self, y, x):  # the same by name as WeightedDifference, not as it is called
        return x - 2 * y


def test_two_pytorch_models_are_fed_their_inputs_by_position():
    # By parameter name, the first pair failed and the second passed.
    batches = random_batches([(2, 4), (2, 4)])
    assert verify(WeightedDifference(), DifferenceNamedOtherwise(), batches)
    assert not verify(WeightedDifference(), DifferenceSwapped(), batches)


class BFloat16Block(nn.Module):
    """A bfloat16 conv and BN inside a float32 model: its output is float32, its rounding bfloat16's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, dtype=torch.bfloat16)
        self.bn = nn.BatchNorm2d(4, dtype=torch.bfloat16)
        self.head = nn.Linear(144, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x.to(torch.bfloat16)))).float().flatten(1))


def test_a_bfloat16_layer_in_a_float32_model_is_held_to_bfloat16s_rounding():
    # Judged by its float32 output, the fold's bfloat16 rounding (0.003-0.007 of the RMS) was
    # refused; a fold 10% off is still far beyond 4 of bfloat16's epsilons.
    model = randomize_bn(BFloat16Block()).eval()
    folded, _ = fold(model, [torch.randn(2, 3, 8, 8)])
    batches = random_batches([(2, 3, 8, 8)])
    result = verify(model, folded, batches)
    assert result and result.diffs[0].atol == 4 * torch.finfo(torch.bfloat16).eps
    with torch.no_grad():
        folded.head.weight.mul_(1.1)
    assert not verify(model, folded, batches)


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(x)


class ProjectionWithLookupTable(Projection):
    """float32 throughout, 2% off, and holding a bfloat16 table its forward never reads."""

    def __init__(self):
        super().__init__()
        self.register_buffer("unused_table", torch.zeros(4, dtype=torch.bfloat16))

    def forward(self, x):
        return self.fc(x) * 1.02


class ProjectionPlusBFloat16Zero(ProjectionWithLookupTable):
    """Reads its bfloat16 zero into a float32 sum: exact, so still float32's rounding alone."""

    def forward(self, x):
        return self.fc(x) * 1.02 + self.unused_table[0].float()


class ProjectionPlusBFloat16Copy(ProjectionWithLookupTable):
    """Copies its bfloat16 zeros (advanced indexing, a clone) into a float32 sum: still exact."""

    def forward(self, x):
        return self.fc(x) * 1.02 + self.unused_table[torch.tensor([0])].float() + self.unused_table[:1].clone().float()


@pytest.mark.parametrize("candidate", [ProjectionWithLookupTable, ProjectionPlusBFloat16Zero, ProjectionPlusBFloat16Copy])
def test_a_bfloat16_tensor_the_forward_computes_nothing_in_leaves_a_float32_models_tolerance_alone(candidate):
    # Every tensor the two modules held set the precision: 0.031 instead of 1e-5, and 2% passed,
    # in verify and in the check every fold and export runs before writing.
    from bngraph.equivalence import check_same_function
    from bngraph.errors import CheckFailed

    reference, candidate = Projection().eval(), candidate().eval()
    result = verify(reference, candidate, random_batches([(2, 16)]))
    assert not result and result.diffs[0].atol == TORCH_TOLERANCE
    with pytest.raises(CheckFailed, match="differs from the model it was made from"):
        check_same_function(reference, candidate, [torch.randn(2, 16)], what="the candidate")


class ProjectionWithHalfCopy(Projection):
    """The float32 logits and, beside them, a float16 copy and a bfloat16-computed mask."""

    scale = 1.0

    def forward(self, x):
        logits = self.fc(x) * self.scale
        return logits, logits.half(), logits.bfloat16() > 0


class ProjectionWithHalfCopyOff(ProjectionWithHalfCopy):
    scale = 1.003


def test_each_output_is_judged_at_the_precision_it_was_computed_in():
    # One float16 side output set float16's tolerance for every output: float32 logits 0.3% off
    # passed.
    result = verify(ProjectionWithHalfCopy().eval(), ProjectionWithHalfCopyOff().eval(), random_batches([(2, 16)]))
    logits, half, _ = result.diffs
    assert not logits.passed and logits.atol == TORCH_TOLERANCE
    assert half.atol > TORCH_TOLERANCE  # float16's own rounding, where the float16 copy is judged


class RoutedInBFloat16(Projection):
    """A float32 model whose top-1 router compares in bfloat16: the choice rounds nothing."""

    scale = 1.0

    def forward(self, x):
        h = self.fc(x)
        pick = h.bfloat16()[:, :1] > 0
        return torch.where(pick, h * 2, h) * self.scale


class RoutedInBFloat16Off(RoutedInBFloat16):
    scale = 1.02


def test_a_choice_made_in_bfloat16_leaves_the_float32_values_it_picks_at_float32s_tolerance():
    # The router's mask carried bfloat16's epsilon into the experts' float32 outputs: 2% passed.
    result = verify(RoutedInBFloat16().eval(), RoutedInBFloat16Off().eval(), random_batches([(2, 16)]))
    assert not result and result.diffs[0].atol == TORCH_TOLERANCE


class Spectrum(nn.Module):
    """A spectral layer: the (complex) spectrum of a learned filter's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return torch.fft.rfft(self.bn(self.fc(x)))


class ConjugateSpectrum(Spectrum):
    def forward(self, x):
        return torch.fft.rfft(self.bn(self.fc(x))).conj()  # a lazy conjugate: the tensor's conj bit set


def test_complex_outputs_are_compared_in_real_and_imaginary_parts():
    # Cast to float64, the imaginary part was dropped: a conjugate spectrum passed with error 0.
    # And a tensor with its conj bit set crashed bngraph's own .numpy(), blamed on the model.
    batches = random_batches([(2, 16)])
    spectrum, conjugate = randomize_bn(Spectrum()), randomize_bn(ConjugateSpectrum())
    assert verify(spectrum, spectrum, batches)
    assert verify(conjugate, conjugate, batches)
    result = verify(spectrum, conjugate, batches)
    assert not result and result.diffs[0].max_abs > 0.1
    folded, _ = fold(conjugate, [torch.randn(2, 16)])
    assert verify(conjugate, folded, batches)


# ---- NaN on both sides -----------------------------------------------------------------------


def _log_front_end(weight: np.ndarray, negated: bool = False) -> onnx.ModelProto:
    """Log(x + 1e-6) @ W, averaged over time: NaN everywhere on N(0, 1) inputs (a Log of a
    negative), a front end that takes a magnitude; `negated`, Log(-|x| - 1): NaN on any input."""
    from onnx import TensorProto, helper

    from tests.onnx_models import onnx_file

    if negated:
        head = [helper.make_node("Abs", ["x"], ["ax"]), helper.make_node("Neg", ["ax"], ["nx"]),
                helper.make_node("Sub", ["nx", "one"], ["xe"])]
    else:
        head = [helper.make_node("Add", ["x", "eps"], ["xe"])]
    nodes = [*head, helper.make_node("Log", ["xe"], ["lx"]), helper.make_node("MatMul", ["lx", "W"], ["m"]),
             helper.make_node("ReduceMean", ["m"], ["y"], axes=[1], keepdims=0)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    constants = {"W": weight, "eps": np.float32(1e-6), "one": np.float32(1.0)}
    return onnx_file(nodes, inputs, outputs, constants, opset=13, ir_version=8)


def test_an_output_nan_everywhere_on_random_inputs_is_compared_on_their_absolute_values(tmp_path):
    # Two front ends with weights W and -3W: NaN == NaN everywhere passed, "output RMS 1.18e-38".
    # They take magnitudes: on the absolute values of the same draws they are compared, and said so.
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_log_front_end(weight), a)
    onnx.save(_log_front_end(-3 * weight), b)
    code, out, _ = run_cli("verify", a, b)
    assert code == 1 and out.strip().splitlines()[-1].startswith("FAILED")
    code, out, _ = run_cli("verify", a, a, "--json")
    assert code == 0 and json.loads(out)["inputs"].startswith("made non-negative (their absolute values)")
    code, out, err = run_cli("fold", a, "-o", tmp_path / "folded.onnx")  # fold's own check: the same rule
    assert code == 0, err
    assert "(inputs made non-negative" in out and (tmp_path / "folded.onnx").exists()


def test_an_output_nan_everywhere_on_absolute_values_too_is_refused_not_passed(tmp_path):
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_log_front_end(weight, negated=True), a)
    onnx.save(_log_front_end(-3 * weight, negated=True), b)
    code, _, err = run_cli("verify", a, b)
    assert code == 2 and "output 'y' is NaN or inf at every element" in err and "--data" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli("fold", a, "-o", tmp_path / "folded.onnx")
    assert code == 2 and "output 'y' is NaN or inf at every element" in err
    assert not (tmp_path / "folded.onnx").exists()


LOG_NET = """
import torch
from torch import nn


class LogNet(nn.Module):
    example_input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(torch.log(x))).mean((2, 3))  # every output NaN on N(0, 1) inputs


class NegativeLogNet(LogNet):
    def forward(self, x):
        return self.bn(self.conv(torch.log(-x.abs() - 1))).mean((2, 3))  # NaN on every input
"""


class LogAndLinearHeads(nn.Module):
    """A log-spectrum feature (its input a magnitude) and a linear head on the signed input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.v, self.w = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        return torch.log(x + 1e-6).mean(1, keepdim=True) * self.v(x.abs()), self.w(x)


class RectifiedLinearHead(LogAndLinearHeads):
    def forward(self, x):
        return torch.log(x + 1e-6).mean(1, keepdim=True) * self.v(x.abs()), self.w(x.relu())


def test_only_the_outputs_nan_everywhere_are_compared_on_absolute_values():
    # The whole comparison moved to |x|: a head that differs on negative inputs alone passed.
    batches = random_batches([(2, 16)])
    same = verify(LogAndLinearHeads(), LogAndLinearHeads(), batches)
    assert same and same.inputs.startswith("made non-negative (their absolute values) for ['output.0']")
    assert not verify(LogAndLinearHeads(), RectifiedLinearHead(), batches)


def test_the_pytorch_folds_check_compares_on_absolute_values_or_refuses_too(tmp_path):
    (tmp_path / "lognet.py").write_text(LOG_NET)
    code, _, err = run_cli("fold", f"{tmp_path / 'lognet.py'}:LogNet", "-o", tmp_path / "folded")
    assert code == 0, err
    code, out, err = run_cli("verify", f"{tmp_path / 'lognet.py'}:LogNet", tmp_path / "folded")
    assert code == 0 and "(inputs made non-negative" in out, err
    code, _, err = run_cli("fold", f"{tmp_path / 'lognet.py'}:NegativeLogNet", "-o", tmp_path / "never")
    assert code == 2 and err.startswith("bngraph: error: output 'output' is NaN or inf at every element")
    assert not (tmp_path / "never").exists()


def test_nan_on_both_sides_at_some_elements_passes_and_is_counted():
    reference = [np.array([[1.0, np.nan], [np.inf, 2.0]])]
    diff = compare("y", reference, [r.copy() for r in reference], ONNX_TOLERANCE, ONNX_TOLERANCE)
    assert diff.passed and diff.nonfinite_elements == 2 and "(2 NaN or inf on both sides)" in diff.line()


@pytest.mark.parametrize("path", [["Cast"], ["Identity", "Cast"], ["Unsqueeze", "Squeeze", "Cast"],
                                  ["Flatten", "Reshape", "Cast"]])
def test_ids_cast_or_reshaped_before_an_onnx_gather_reach_the_whole_table(tmp_path, path):
    # int32 ids cast to int64 before the Gather (int32-input exports, tf2onnx): the table size was
    # found only for a Gather reading the graph input itself, so two tables differing in rows
    # 2-49 passed on ids 0 and 1.
    from onnx import TensorProto, helper

    from tests.onnx_models import onnx_file

    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    other = table.copy()
    other[2:] *= -1
    nodes, ids = [], "ids"
    for k, op in enumerate(path):
        inputs, attributes = [ids], {}
        if op == "Cast":
            attributes["to"] = TensorProto.INT64
        elif op in ("Unsqueeze", "Squeeze"):
            inputs.append("axis")
        elif op == "Reshape":
            inputs.append("shape")
        nodes.append(helper.make_node(op, inputs, [f"ids{k}"], **attributes))
        ids = f"ids{k}"
    nodes.append(helper.make_node("Gather", ["table", ids], ["y"]))
    files = []
    for name, rows in (("a", table), ("b", other)):
        arrays = {"table": rows, "axis": np.array([2], np.int64), "shape": np.array([-1, 6], np.int64)}
        model = onnx_file(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])], arrays,
                          opset=13, ir_version=8)
        onnx.save(model, tmp_path / f"{name}.onnx")
        files.append(tmp_path / f"{name}.onnx")
    from bngraph.runners import onnx_inputs

    assert onnx_inputs(files[0]).index_bounds == [50]
    code, out, _ = run_cli("verify", *files)
    assert code == 1 and "FAILED" in out
    assert run_cli("verify", files[0], files[0])[0] == 0


# ---- an output whose dtype changed -----------------------------------------------------------


def _float16_outputs_file(float16: bool, gain: float = 1.0) -> onnx.ModelProto:
    """a = x @ W and b = relu(a), float32; with `float16`, a 0.3% gain error and both cast to float16."""
    from onnx import TensorProto, helper

    from tests.onnx_models import onnx_file

    dtype = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a0"]), helper.make_node("Mul", ["a0", "k"], ["a1"]),
             helper.make_node("Cast", ["a1"], ["a"], to=dtype), helper.make_node("Relu", ["a"], ["b"])]
    arrays = {"W": np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32), "k": np.float32(gain)}
    return onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                     [helper.make_tensor_value_info(n, dtype, ["N", 10]) for n in ("a", "b")], arrays,
                     opset=17, ir_version=8)


def test_a_float16_candidate_of_a_float32_model_is_said_in_the_report(tmp_path):
    # It passed at float16's tolerance (a 0.3% gain error at 0.6 of it) with nothing said.
    reference, candidate = tmp_path / "f32.onnx", tmp_path / "f16.onnx"
    onnx.save(_float16_outputs_file(False), reference)
    onnx.save(_float16_outputs_file(True, gain=1.003), candidate)
    code, out, _ = run_cli("verify", reference, candidate)
    assert code == 0 and "4 batches, 100 elements, float16 vs float32" in out
    assert "note: output 'a' is float16 in" in out  # the table wraps the rest
    code, out, _ = run_cli("verify", reference, candidate, "--json")
    report = json.loads(out)
    assert f"output 'b' is float16 in {candidate} but float32 in {reference}: compared at the less precise" in (
        report["notes"][1])
    assert {(r["candidate_dtype"], r["reference_dtype"]) for r in report["verification"]} == {("float16", "float32")}


def test_a_check_of_a_transformation_fails_where_an_outputs_dtype_changed():
    # A fold never changes an output's dtype: at float16's tolerance, its check would pass a wrong fold.
    from bngraph.equivalence import check_same_function
    from bngraph.errors import CheckFailed

    batches = random_batches([(1, 16)], (1, 7))
    result = verify(_float16_outputs_file(False), _float16_outputs_file(True), batches, dtypes_must_match=True)
    assert not result and result.worst.problem == "its dtype changed: float16 vs float32"
    layer = nn.Linear(16, 4)
    halved = nn.Sequential(layer, nn.Identity())
    halved.forward = lambda x: layer(x).half()
    with pytest.raises(CheckFailed, match="output 'output': its dtype changed: float16 vs float32"):
        check_same_function(layer, halved, [torch.randn(3, 16)], what="the folded model")


# ---- sequence and map outputs ----------------------------------------------------------------


def _sequence_file(scale: float = 1.0, items: int = 2) -> onnx.ModelProto:
    """Conv -> BN, its output also returned in a sequence (SequenceConstruct) with the conv's."""
    from onnx import TensorProto, helper

    from tests.onnx_models import onnx_file, random_bn_stats

    rng = np.random.default_rng(0)
    stats = dict(zip(("s", "b", "m", "v"), random_bn_stats(4, seed=1)))
    stats["s"] = stats["s"] * np.float32(scale)
    arrays = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), **stats}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
             helper.make_node("SequenceConstruct", ["y", "c", "y"][:items], ["seq"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6]),
               helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)]
    return onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], outputs, arrays,
                     opset=13, ir_version=8)


def _zipmap_file(labels=(0, 1, 2)) -> onnx.ModelProto:
    """sklearn-onnx's classifier outputs: the label, and the probabilities as seq(map(int64, float))."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_type_proto(TensorProto.FLOAT, [])
    probabilities = helper.make_value_info(
        "probabilities", helper.make_sequence_type_proto(helper.make_map_type_proto(TensorProto.INT64, value)))
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=1),
             helper.make_node("ArgMax", ["p"], ["label"], axis=1, keepdims=0),
             helper.make_node("ZipMap", ["p"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=list(labels))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]), probabilities])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_a_sequence_output_is_compared_tensor_by_tensor_and_folds(tmp_path):
    # A traceback: 'list' object has no attribute 'dtype'.
    batches = random_batches([(1, 3, 8, 8)], (1, 7))
    result = verify(_sequence_file(), _sequence_file(), batches)
    assert result and [d.output for d in result.diffs[:2]] == ["y", "seq"] and result.diffs[1].elements == 2 * 8 * 4 * 6 * 6
    wrong = verify(_sequence_file(), _sequence_file(scale=1.01), batches)
    assert not wrong and {d.output for d in wrong.diffs if not d.passed} == {"y", "seq"}
    longer = verify(_sequence_file(), _sequence_file(items=3), batches)
    assert not longer and "sequence or map outputs differ on batch 0: [float32[1, 4, 6, 6], float32[1, 4, 6, 6], " in (
        longer.worst.problem)
    onnx.save(_sequence_file(), tmp_path / "seq.onnx")
    code, out, _ = run_cli("fold", tmp_path / "seq.onnx", "-o", tmp_path / "folded.onnx")
    assert code == 0 and "PASSED | Output: 'seq'" in out


def test_zipmaps_probabilities_are_compared_by_key():
    batches = random_batches([(1, 3)], (1, 7))
    result = verify(_zipmap_file(), _zipmap_file(), batches)
    assert result and result.diffs[1].output == "probabilities" and result.diffs[1].elements == 3 * 8
    relabelled = verify(_zipmap_file(), _zipmap_file(labels=(0, 1, 5)), batches)
    assert not relabelled and relabelled.worst.problem == (
        "sequence or map outputs differ on batch 0: [{0: float64[], 1: float64[], 5: float64[]}] vs "
        "[{0: float64[], 1: float64[], 2: float64[]}]")


def test_folding_a_model_with_a_map_output_is_one_line(tmp_path):
    # onnx-ir, which the fold's passes run on, holds no map types: its error was a traceback.
    onnx.save(_zipmap_file(), tmp_path / "classifier.onnx")
    code, out, err = run_cli("fold", tmp_path / "classifier.onnx", "-o", tmp_path / "folded.onnx")
    assert (code, out) == (2, "") and len(err.strip().splitlines()) == 1
    assert err.startswith("bngraph: error: cannot fold this model: onnx-ir") and "Map types" in err
    assert not (tmp_path / "folded.onnx").exists()


@pytest.mark.parametrize("command", ["fold", "verify"])
def test_a_file_that_declares_no_outputs_is_one_line_naming_it(tmp_path, command):
    # onnxruntime's words for it ("OrtValue indexes should have been populated") named the
    # file the fold would have written.
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], [])
    path = tmp_path / "no-outputs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    argv = ["fold", path, "-o", tmp_path / "folded.onnx"] if command == "fold" else ["verify", path, path]
    code, out, err = run_cli(*argv)
    assert (code, out, err) == (2, "", f"bngraph: error: {path} declares no graph outputs: nothing it computes can be "
                                       "compared\n")


def test_an_op_the_reference_evaluator_lacks_is_one_line():
    with pytest.raises(UserError, match="onnx's ReferenceEvaluator cannot run the ONNX model: NotImplementedError: "
                                        "No registered implementation for operator 'ZipMap' and domain 'ai.onnx.ml' "
                                        r"\(compare in onnxruntime alone: drop --reference\)"):
        verify(_zipmap_file(), _zipmap_file(), random_batches([(1, 3)], (1,)), evaluator=True)


# ---- a file that runs at batch 1 only --------------------------------------------------------


def _batch_1_only_file(tmp_path):
    """Conv -> BN -> Reshape to [1, 144]: the batch is declared symbolic, the Reshape fixes it at 1."""
    from onnx import TensorProto, helper

    from tests.onnx_models import onnx_file, random_bn_stats

    arrays = {"W": np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32),
              **dict(zip(("s", "b", "m", "v"), random_bn_stats(4, seed=1))), "shape": np.array([1, 144], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Reshape", ["bn", "shape"], ["y"])]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 144])], arrays, opset=13, ir_version=8)
    onnx.save(model, tmp_path / "batch1.onnx")
    return tmp_path / "batch1.onnx"


@pytest.mark.parametrize("command", ["verify", "fold"])
def test_no_input_with_a_batch_axis_reports_the_batches_it_really_ran(tmp_path, command):
    # --static-input 0 on the one input: every batch was (1, 3, 8, 8), and the report said [1, 1, 1, 7].
    path = _batch_1_only_file(tmp_path)
    files = [path, path] if command == "verify" else [path]
    code, out, _ = run_cli(command, *files, "--static-input", "0", "--json")
    report = json.loads(out)
    assert code == 0 and report["batch_sizes"] == [1, 1, 1, 1]
    assert ("no input has a batch axis: every batch has the inputs' own shapes (batch 1), so other batch sizes "
            "were not tried") in report["notes"]


def test_a_file_that_fails_at_batch_7_says_which_batch_in_one_line_and_what_to_try(tmp_path):
    # onnxruntime's own coloured [E:onnxruntime:...] line came first, and ours said "a batch of [1, 1, 1, 7]".
    import subprocess
    import sys

    path = _batch_1_only_file(tmp_path)
    done = subprocess.run([sys.executable, "-m", "bngraph", "fold", str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"bngraph: error: ort-disable-all {path} failed on a batch of 7 (batch 3 of [1, 1, 1, 7]): ")
    assert done.stderr.strip().endswith(
        "(it runs at batch 1: if the model fixes its batch, keep the input's own shape with --static-input 0)")
    assert run_cli("fold", path, "--static-input", "0")[0] == 0


def test_a_file_declaring_other_sizes_is_named_with_the_axis_and_sizes_onnxruntime_gave(tmp_path):
    # onnxruntime lists the axes on the lines after its first: the one line named no axis, not
    # which file refused, and told the user to try --static-input 0 for a conflict on axis 2.
    from tests.onnx_models import conv_bn_file

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_bn_file(), a)
    proto = conv_bn_file()
    for axis in (2, 3):
        proto.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = 4
    onnx.save(proto, b)
    code, _, err = run_cli("verify", a, b)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"ort-disable-all {b} failed on a batch of 1" in err
    assert err.strip().endswith("for the following indices: index: 2 Got: 8 Expected: 4; index: 3 Got: 8 Expected: 4"), err


def test_an_empty_onnx_file_is_not_a_valid_model(tmp_path):
    # Protobuf reads 0 bytes as a model with no input: "different numbers of inputs [0, 1]".
    from tests.onnx_models import conv_bn_file

    onnx.save(conv_bn_file(), tmp_path / "model.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    for files in [("model.onnx", "empty.onnx"), ("empty.onnx", "model.onnx")]:
        code, _, err = run_cli("verify", *(tmp_path / f for f in files))
        assert code == 2 and err == f"bngraph: error: {tmp_path / 'empty.onnx'} is not a valid ONNX model: the file is empty\n"
    model = onnx.ModelProto()
    model.producer_name = "not a model"
    onnx.save(model, tmp_path / "no_graph.onnx")
    code, _, err = run_cli("verify", tmp_path / "model.onnx", tmp_path / "no_graph.onnx")
    assert code == 2 and err.endswith("is not a valid ONNX model: it sets no IR version or no graph\n")


COUNTS_ITS_CALLS = '''
import torch
from torch import nn

example_input_shape = (2, 4)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


class CountsItsCalls(Plain):
    """The same function on its first six calls, twice it from the seventh on."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * torch.where(self.calls > 6, 2.0, 1.0)


class CountsByReassigning(CountsItsCalls):
    def forward(self, x):
        self.calls = self.calls + 1  # a new tensor each call, not a write into the old one
        return self.fc(x) * torch.where(self.calls > 6, 2.0, 1.0)


class CountsInTwoSteps(CountsItsCalls):
    def forward(self, x):
        # Its second new tensor takes the first one's freed address: the buffer's id() is the
        # same after every call, and its version 0.
        self.calls = self.calls + 1
        self.calls = self.calls * 1
        return self.fc(x) * torch.where(self.calls > 6, 2.0, 1.0)
'''


@pytest.mark.parametrize("counter", ["CountsItsCalls", "CountsByReassigning", "CountsInTwoSteps"])
def test_a_model_that_writes_its_state_in_eval_mode_is_named_in_the_report(counter, tmp_path):
    # It passed on verify's few calls without a word; what it computes later no run can cover.
    (tmp_path / "m.py").write_text(COUNTS_ITS_CALLS)
    model = tmp_path / "m.py"
    code, out, _ = run_cli("verify", f"{model}:Plain", f"{model}:{counter}", "--json")
    notes = json.loads(out)["notes"]
    assert code == 0 and len(notes) == 1
    assert notes[0].startswith(f"{model}:{counter} writes ['calls'] in its forward, in eval mode")
    code, out, _ = run_cli("verify", f"{model}:Plain", f"{model}:Plain", "--json")
    assert code == 0 and json.loads(out)["notes"] == []


def test_a_buffer_reassigned_back_to_its_first_address_is_seen_written(tmp_path):
    # Two new tensors per call: the second takes the first one's freed address, with version 0,
    # on every call. Watched by id() and version, the write was missed (CI failed on it by chance).
    from bngraph.verify import _state_versions, _written_state

    (tmp_path / "m.py").write_text(COUNTS_ITS_CALLS)
    model = bngraph.load(f"{tmp_path / 'm.py'}:CountsInTwoSteps").eval()
    first = id(model.calls)
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert id(model.calls) == first and model.calls._version == 0  # all that id() and the version see
    before = _state_versions(model)
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert _written_state(model, before) == ["calls"]


RETURNS_NUMBERS_TOO = '''
import torch
from torch import nn

example_input_shape = (2, 4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), x.shape[0], 3
'''


def test_numbers_a_model_returns_beside_its_tensors_are_named_against_an_onnx_file(tmp_path):
    # The file holds the tensor only, and verify passed it against the model's three outputs
    # without a word.
    (tmp_path / "m.py").write_text(RETURNS_NUMBERS_TOO)
    model = f"{tmp_path / 'm.py'}:Net"
    assert run_cli("export", model, "-o", str(tmp_path / "m.onnx"))[0] == 0
    code, out, _ = run_cli("verify", model, str(tmp_path / "m.onnx"), "--json")
    assert code == 0
    assert json.loads(out)["notes"] == [f"{model} returns ['output.1', 'output.2'] beside its tensors, numbers or "
                                        "strings an ONNX file does not hold: only its tensors were compared"]


SPECTRA_PY = '''
import torch
from torch import nn


class Spectrum(nn.Module):
    example_input_shape = (2, 5, 8)

    def forward(self, x):
        return torch.fft.rfft(x * 3 + 1)


class SpectrumAsAnOnnxFileHoldsIt(Spectrum):  # ONNX has no complex type: real and imaginary parts
    def forward(self, x):
        return torch.view_as_real(super().forward(x))


class MoreOutputsAtLargerBatches(nn.Module):
    example_input_shape = (2, 4)

    def forward(self, x):
        return (x * 2,) if x.shape[0] == 1 else (x * 2, x + 1)
'''


def test_a_complex_output_is_compared_with_its_parts_as_an_onnx_file_holds_them(tmp_path, capsys):
    # Both sides were split into parts, the float one too: (1, 5, 5, 2, 2) against (1, 5, 5, 2), FAILED.
    (tmp_path / "spectra.py").write_text(SPECTRA_PY)
    spec = lambda name: f"{tmp_path / 'spectra.py'}:{name}"  # noqa: E731
    assert main(["verify", spec("Spectrum"), spec("SpectrumAsAnOnnxFileHoldsIt")]) == 0, capsys.readouterr().err


def test_outputs_that_change_in_number_with_the_batch_fail_in_one_line(tmp_path, capsys):
    # The outputs of the first batch were indexed in every batch: an IndexError traceback.
    (tmp_path / "spectra.py").write_text(SPECTRA_PY)
    spec = f"{tmp_path / 'spectra.py'}:MoreOutputsAtLargerBatches"
    assert main(["verify", spec, spec]) == 1
    assert "returns 1 output(s) on a batch of 1 and 2 on a batch of 7" in capsys.readouterr().out


BRANCHES_WITH_TORCH_COND_PY = '''
import torch
from torch import nn


class Branches(nn.Module):
    example_input_shape = (2, 4)

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):  # torch.cond: how torch.export takes a data-dependent branch
        return torch.cond(x.mean() > 0, lambda t: torch.relu(self.a(t)), lambda t: torch.tanh(self.b(t)), (x,))
'''


def test_a_model_written_with_torch_cond_verifies(tmp_path, capsys):
    # verify's precision bookkeeping read a tensor's storage inside the branches dynamo traces:
    # "the model raised ... UncapturedHigherOrderOpError", blamed on a model that runs.
    (tmp_path / "cond.py").write_text(BRANCHES_WITH_TORCH_COND_PY)
    spec = f"{tmp_path / 'cond.py'}:Branches"
    assert main(["verify", spec, spec]) == 0, capsys.readouterr().err


class KeysByBatch(nn.Module):
    """An auxiliary output only at batches above 1, as some heads add theirs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        out = {"main": self.fc(x)}
        if x.shape[0] > 1:
            out["aux"] = out["main"].mean(0)
        return out


def test_an_export_whose_outputs_change_with_the_batch_says_so(tmp_path):
    # The file holds both outputs (the example's batch of 2); its check said "2 outputs ['main',
    # 'aux'] vs 1 ['main', 'aux']": two names beside a count of one.
    with pytest.raises(bngraph.CheckFailed, match=r"returns 2 output\(s\) on a batch of 2 and 1 on a batch of 1"):
        export(KeysByBatch().eval(), [torch.randn(2, 4)], tmp_path / "keys.onnx")
    assert not (tmp_path / "keys.onnx").exists()


class KeysJoined(nn.Module):
    swapped = False

    def forward(self, x):
        h, k = torch.relu(x), torch.relu(x) * 5
        if self.swapped:
            h, k = k, h
        return {"a.b": h, "a": {"b": k}}


def test_outputs_whose_joined_names_collide_are_refused():
    # {"a.b": h, "a": {"b": 5h}} against the values swapped: both name their outputs a.b, a.b, and
    # paired by position they passed.
    swapped = KeysJoined()
    swapped.swapped = True
    with pytest.raises(UserError, match="name 'a.b' twice"):
        verify(KeysJoined(), swapped, random_batches([(2, 6)]))


class Buckets(nn.Module):  # a float computation cast to integers, as T5's relative-position buckets are
    def forward(self, x):
        return (x * 3).to(torch.long), x.float()


def test_a_cast_to_integers_is_followed_as_a_choice():
    # The precision lineage asked torch.finfo of the int64 a `.to(torch.long)` moved to: T5 and
    # ConvBERT failed in every check with "torch.finfo() requires a floating point input type".
    assert verify(Buckets(), Buckets(), random_batches([(2, 6)]))
