"""bngraph verify: the tolerance rule on hand-made tensors, then whole models through the CLI."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
import torch

import bngraph
from bngraph.cli import main
from bngraph.export import export
from bngraph.compare import ONNX_TOLERANCE, TORCH_TOLERANCE, compare
from bngraph.verify import verify_models
from tests.onnx_models import conv_bn_net, conv_bn_net_perturbed, mlp_bn_net
from tests.test_data import make_arrays, write_set
from tests.test_data_formats import write_image_folder, write_npz

MODEL = "tests/onnx_models.py:conv_bn_net"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# ---- the rule, on hand-made tensors --------------------------------------------------------


def test_an_element_fails_only_beyond_both_atol_and_rtol():
    reference = np.array([0.0, 100.0, 1.0])
    candidate = np.array([0.05, 100.5, 1.25])
    # 0.05 off a 0: atol covers it. 0.5 off 100: rtol covers it. 0.25 off 1: neither does.
    # scale=1: atol in absolute units (numpy.allclose's rule; by default atol is x the output's RMS).
    diff = compare("y", [reference], [candidate], atol=0.1, rtol=0.01, scale=1.0)
    assert not diff.passed and diff.failed_elements == 1 and diff.worst_index == (2,)
    assert diff.worst_reference == 1.0 and diff.worst_candidate == 1.25
    assert compare("y", [reference], [candidate], atol=0.1, rtol=0.0, scale=1.0).failed_elements == 2  # atol alone
    assert compare("y", [reference], [candidate], atol=0.0, rtol=0.01, scale=1.0).failed_elements == 2  # rtol alone


def test_reports_the_smallest_tolerances_that_pass():
    reference, candidate = np.array([0.0, 100.0, 1.0]), np.array([0.05, 100.5, 1.25])
    diff = compare("y", [reference], [candidate], atol=0.1, rtol=0.01, scale=1.0)
    assert diff.min_atol == pytest.approx(0.24) and diff.min_rtol == pytest.approx(0.15)
    assert compare("y", [reference], [candidate], atol=diff.min_atol * 1.000001, rtol=0.01, scale=1.0).passed
    assert compare("y", [reference], [candidate], atol=0.1, rtol=diff.min_rtol * 1.000001, scale=1.0).passed


def test_statistics_and_relative_error_guarded_near_zero():
    reference, candidate = np.zeros(100), np.full(100, 1e-6)
    candidate[7] = 3e-6
    # An all-zero reference has no scale of its own: here atol in absolute units (scale=1).
    diff = compare("y", [reference], [candidate], atol=1e-4, rtol=1e-4, scale=1.0)
    assert diff.passed and diff.max_abs == pytest.approx(3e-6) and diff.worst_index == (7,)
    assert diff.max_rel == pytest.approx(3e-6)  # against the scale, not against 0
    assert diff.mean_abs == pytest.approx(1.02e-6) and diff.p99_abs == pytest.approx(1.02e-6, rel=0.05)


def test_stats_pool_batches_and_name_the_worst_batch():
    reference = [np.zeros((1, 3)), np.zeros((2, 3))]
    candidate = [np.zeros((1, 3)), np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0]])]
    diff = compare("y", reference, candidate, atol=1e-4, rtol=1e-4)
    assert (diff.worst_batch, diff.worst_index, diff.elements) == (1, (1, 1), 9)


def test_nan_on_one_side_fails_and_on_both_passes():
    assert not compare("y", [np.array([1.0, np.nan])], [np.array([1.0, 2.0])], 1e-4, 1e-4).passed
    assert compare("y", [np.array([1.0, np.nan])], [np.array([1.0, np.nan])], 1e-4, 1e-4).passed


def test_top1_agreement_for_classifiers():
    reference = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    candidate = np.array([[0.2, 0.8], [0.3, 0.7], [0.3, 0.7], [0.6, 0.4]])
    assert compare("logits", [reference], [candidate], 1e-4, 1e-4).top1_agreement == 0.75
    assert compare("y", [np.zeros((2, 3, 4))], [np.zeros((2, 3, 4))], 1e-4, 1e-4).top1_agreement is None


def test_different_shapes_fail_with_the_shapes():
    diff = compare("y", [np.zeros((2, 3))], [np.zeros((2, 4))], 1e-4, 1e-4)
    assert not diff.passed and "(2, 4) vs (2, 3)" in diff.line()


# ---- whole models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """ConvBnNet exported once, and a copy with one bias of the last layer moved by 0.5."""
    folder = tmp_path_factory.mktemp("verify")
    exported = folder / "model.onnx"
    assert export(conv_bn_net(), [torch.randn(2, 3, 12, 12)], exported)
    model = onnx.load(str(exported))
    last_gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    bias = next(t for t in model.graph.initializer if t.name == last_gemm.input[2])
    values = onnx.numpy_helper.to_array(bias).copy()
    values[3] += 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    perturbed = folder / "perturbed.onnx"
    onnx.save(model, perturbed)
    return exported, perturbed, last_gemm.output[0]


def test_a_model_and_its_export_pass(onnx_files):
    exported, _, _ = onnx_files
    code, out, _ = run_cli("verify", MODEL, exported)
    lines = [line for line in out.splitlines() if line.startswith(("PASSED", "FAILED"))]
    assert code == 0 and len(lines) == 3 and all(line.startswith("PASSED") for line in lines)
    assert f"|c - r| <= {ONNX_TOLERANCE:g} x " in lines[0] and f"+ {ONNX_TOLERANCE:g} x |r| everywhere" in lines[0]


def test_two_equal_onnx_files_pass_at_each_level(onnx_files):
    exported, _, _ = onnx_files
    code, out, _ = run_cli("verify", exported, exported, "--json")
    report = json.loads(out)
    assert code == 0 and report["batch_sizes"] == [1, 1, 1, 7]  # the graph's symbolic batch
    runtimes = [r["runtime"] for r in report["verification"]]
    assert runtimes == ["ort-disable-all vs ort-disable-all", "ort-enable-all vs ort-enable-all"]


def test_a_perturbed_model_fails_with_exit_1_and_names_the_worst_output(onnx_files):
    exported, perturbed, output = onnx_files
    code, out, _ = run_cli("verify", exported, perturbed)
    assert code == 1
    summary, verdict = out.strip().splitlines()[-2:]
    assert summary.startswith(f"FAILED | worst output '{output}'")
    assert "index [" in summary and "it would pass with --atol " in summary
    assert verdict.endswith("far beyond what onnxruntime's own optimizations change, so the candidate computes something else")


def test_two_onnx_files_that_take_an_input_in_different_dtypes_are_refused_in_one_line(onnx_files, tmp_path):
    # The same model taking float64 (as a float64 export writes it): not the same inputs.
    exported, _, _ = onnx_files
    model = onnx.load(str(exported))
    name = model.graph.input[0].name
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    model.graph.node.insert(0, onnx.helper.make_node("Cast", [name], [name + "_f32"], to=onnx.TensorProto.FLOAT))
    for node in model.graph.node[1:]:
        node.input[:] = [name + "_f32" if x == name else x for x in node.input]
    wide = tmp_path / "wide.onnx"
    onnx.save(model, wide)
    code, out, err = run_cli("verify", exported, wide)
    assert (code, out) == (2, "")
    assert err == (f"bngraph: error: {exported} takes input '{name}' as float32, {wide} as float64: "
                   "verify compares two models on the same inputs\n")


def test_two_pytorch_models_compare_at_the_tighter_tolerance():
    code, out, _ = run_cli("verify", MODEL, "tests/onnx_models.py:conv_bn_net_perturbed", "--json")
    report = json.loads(out)
    assert code == 1 and report["atol"] == [TORCH_TOLERANCE] and report["rtol"] == [TORCH_TOLERANCE]
    assert report["verification"][0]["runtime"] == "torch vs torch"


def test_json_report_keys(onnx_files):
    exported, _, _ = onnx_files
    code, out, err = run_cli("verify", MODEL, exported, "--json", "--atol", "1e-3", "--rtol", "1e-3")
    report = json.loads(out)
    assert code == 0 and "PASSED |" in err  # the lines go beside the JSON, not into it
    assert {"reference", "candidate", "passed", "atol", "rtol", "batch_sizes", "inputs", "worst_output", "worst_runtime",
            "verification", "notes"} == set(report)
    assert report["atol"] == [1e-3]
    assert {"output", "runtime", "passed", "problem", "elements", "failed_elements", "nonfinite_elements", "scale", "max_abs", "max_rel",
            "excess", "mean_abs", "p99_abs", "worst_batch", "worst_index", "min_atol", "min_rtol",
            "top1"} == set(report["verification"][0])
    assert report["verification"][0]["top1"] == 1.0


def test_the_reference_evaluator_is_a_third_opinion(onnx_files):
    exported, _, _ = onnx_files
    code, out, _ = run_cli("verify", MODEL, exported, "--reference", "--json")
    report = json.loads(out)
    assert code == 0
    assert [r["runtime"] for r in report["verification"]][-1] == "onnx-reference vs torch"


@pytest.mark.parametrize("opset", [9, 13])
def test_the_reference_evaluator_runs_an_old_opsets_batchnorm_on_its_running_statistics(opset, tmp_path):
    # torch.onnx writes a momentum attribute on opsets 9 to 14; onnx's own BatchNormalization then
    # used batch statistics, and a correct file FAILED against its model.
    for name, model in (("model", conv_bn_net()), ("perturbed", conv_bn_net_perturbed())):
        torch.onnx.export(model.eval(), (torch.randn(2, 3, 12, 12),), str(tmp_path / f"{name}.onnx"), dynamo=False,
                          opset_version=opset, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    code, out, err = run_cli("verify", MODEL, tmp_path / "model.onnx", "--reference", "--json")
    assert code == 0, err
    assert "onnx-reference vs torch" in [r["runtime"] for r in json.loads(out)["verification"]]
    code, out, _ = run_cli("verify", MODEL, tmp_path / "perturbed.onnx", "--reference", "--json")
    assert code == 1 and not any(r["passed"] for r in json.loads(out)["verification"])


def test_an_onnx_file_with_named_sizes_beyond_the_batch_is_refused_naming_them(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "K"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "K"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "named.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    code, _, err = run_cli("verify", path, path)
    assert code == 2 and err == (f"bngraph: error: input 'x' of {path} has symbolic dimensions ([N, 4, K]) beyond "
                                 "the batch: give them with --input-shape\n")
    assert run_cli("verify", path, path, "--input-shape", "2,4,3")[0] == 0


def test_real_data_is_one_more_batch(tmp_path):
    data = write_set(tmp_path / "mnist", make_arrays(n_test=5))
    exported = tmp_path / "mlp.onnx"
    assert export(mlp_bn_net(), [torch.randn(2, 1, 28, 28)], exported)
    code, out, _ = run_cli("verify", "tests/onnx_models.py:mlp_bn_net", exported, "--data", data, "--json")
    assert code == 0 and json.loads(out)["batch_sizes"] == [1, 1, 1, 7, 5]


def test_real_data_in_any_format_train_reads(tmp_path):
    # An .npz as it is, and an image folder decoded to the model's 1x28x28 (RGB 10x12 files).
    exported = tmp_path / "mlp.onnx"
    assert export(mlp_bn_net(), [torch.randn(2, 1, 28, 28)], exported)
    npz = write_npz(tmp_path / "d.npz", n_test=12)
    pets = write_image_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=3, sizes=((10, 12),))
    for data, n in ((npz, 12), (pets, 6)):
        code, out, err = run_cli("verify", "tests/onnx_models.py:mlp_bn_net", exported, "--data", data, "--json")
        assert code == 0 and json.loads(out)["batch_sizes"] == [1, 1, 1, 7, n], err


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "missing.onnx", MODEL],
        ["verify", "missing\nfile.onnx", MODEL],  # a newline in a name no longer splits the line
        ["verify", MODEL, MODEL, "--atol", "-1"],
        ["verify", MODEL, MODEL, "--data", "nowhere"],
        # onnx's ReferenceEvaluator runs ONNX files only: two PyTorch models passed without it or a word.
        ["verify", MODEL, MODEL, "--reference"],
    ],
    ids=["missing-file", "newline-in-name", "negative-tolerance", "missing-data", "reference-evaluator-without-onnx"],
)
def test_bad_input_exits_2_with_one_line(argv):
    code, out, err = run_cli(*argv)
    assert code == 2 and out == "" and err.startswith("bngraph: error: ") and err.count("\n") == 1


UNSEEDED_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    """Initialized from torch's generator, as user models are, with no seed of its own."""

    example_input_shape = (4, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))
'''


def test_a_file_model_names_the_same_weights_on_every_load(tmp_path):
    # fold it, then verify the fold against it: two loads, one model (a file model used to be
    # built with new random weights each time, and this verify failed on a correct fold).
    from bngraph.load import load_model

    path = tmp_path / "net.py"
    path.write_text(UNSEEDED_PY)
    state = torch.random.get_rng_state()
    first, second = (load_model(f"{path}:Net").module.state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left as it was
    other = load_model(f"{path}:Net", seed=1).module.state_dict()  # train --seed picks another
    assert not torch.equal(other["conv.weight"], first["conv.weight"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["fold", f"{path}:Net", "-o", str(tmp_path / "folded")]) == 0
        assert main(["verify", f"{path}:Net", str(tmp_path / "folded")]) == 0


DYNAMIC_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    example_input_shape = (2, 3, 16, 16)

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))
'''


def test_an_onnx_file_with_symbolic_sizes_takes_the_pytorch_sides_declared_shape(tmp_path):
    # [N, 3, H, W]: verify asked for --input-shape though the model beside it declares (2, 3, 16, 16).
    (tmp_path / "net.py").write_text(DYNAMIC_PY)
    model = bngraph.load(f"{tmp_path / 'net.py'}:Net").eval()
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(tmp_path / "net.onnx"), input_names=["x"],
                      dynamo=False, dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    code, out, err = run_cli("verify", f"{tmp_path / 'net.py'}:Net", tmp_path / "net.onnx")
    assert code == 0 and out.strip().splitlines()[-1].startswith("PASSED"), err
    code, _, err = run_cli("verify", tmp_path / "net.onnx", tmp_path / "net.onnx")  # nothing says the sizes
    assert code == 2 and "give them with --input-shape" in err


GATED = """
import torch
from torch import nn


class Gated(nn.Module):
    example_input_shape = (2, 16)
    k = 1.0

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.gate = nn.Linear(16, 8), nn.Linear(16, 4)
        with torch.no_grad():
            self.gate.bias.fill_(-6.0)  # shut on N(0, 1) inputs, open on larger ones

    def forward(self, x):
        y = self.fc(x)
        return y, torch.relu(self.gate(x) * self.k), y[y > 5 * self.k]  # a gate, and detections above a threshold


class Tripled(Gated):
    k = 3.0
"""


def test_an_output_the_random_batches_never_open_is_named_in_a_note(tmp_path):
    # Both passed without a word: the gate was 0, the detections empty, on every drawn batch.
    (tmp_path / "gated.py").write_text(GATED)
    result, report = verify_models(f"{tmp_path / 'gated.py'}:Gated", f"{tmp_path / 'gated.py'}:Tripled")
    assert result
    assert "output 'output.1' was 0 at every element of every batch: if it can be other than 0, the inputs" in \
        " ".join(report.notes)
    assert "output 'output.2' was empty in every batch: nothing of it was compared" in " ".join(report.notes)
    gate = next(d for d in result.diffs if d.output == "output.1")
    assert "(the output is all 0: no RMS)" in gate.line()  # it showed float32's smallest normal as the RMS


CLAMPED_IDS = """
import torch
from torch import nn


class Clamped(nn.Module):
    example_input_shape = (2, 5)
    example_input_dtypes = (torch.int64,)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(50, 4)

    def forward(self, ids):
        return self.table(ids.clamp(0, 49))
"""


def test_integer_inputs_drawn_at_0_and_1_only_say_so(tmp_path):
    # The clamp hid the table from the probe: ids were drawn at 0 and 1, and a candidate with
    # rows 2-49 changed passed without a word.
    (tmp_path / "ids.py").write_text(CLAMPED_IDS)
    spec = f"{tmp_path / 'ids.py'}:Clamped"
    _, report = verify_models(spec, spec)
    assert "input 'ids' holds integers, drawn at 0 and 1 only" in " ".join(report.notes)
    (tmp_path / "masked.py").write_text(CLAMPED_IDS.replace("def forward(self, ids):", "def forward(self, attention_mask):")
                                        .replace("ids.clamp", "attention_mask.clamp"))
    spec = f"{tmp_path / 'masked.py'}:Clamped"
    assert not verify_models(spec, spec)[1].notes  # a mask is 0 or 1: nothing left out
