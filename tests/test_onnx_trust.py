"""ONNX files as other and older exporters write them fold without a crash, and compute what they did.

Each file is built with onnx.helper the way that exporter writes it (tests/onnx_models.py), with
random BN statistics, folded, and compared with the original in onnxruntime at both levels, by
the largest error relative to the output's magnitude. onnxruntime runs every opset from 7.
"""

from __future__ import annotations


import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from onnx import TensorProto, helper, numpy_helper

from bngraph.errors import UserError
from bngraph.onnx_fold import fold_onnx, fold_onnx_verified
from tests.onnx_models import BN_STATS, conv_bn_file, gemm_bn_file, onnx_file, random_bn_stats
from tests.onnx_util import export_onnx, fold_and_check, fold_file, ops, relative_error, run_in_ort
from tests.util import randomize_bn

# float32 folds reorder a few roundings: ~1e-7 of the output's size; a wrong fold is off by ~1.
FLOAT32_REL = 1e-5
# float16 rounds to 2**-11 of a value; the folded conv rounds once less, the BN once less.
FLOAT16_REL = 5e-3


def feeds(batch: int = 3, dtype=np.float32, scalar: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {"x": rng.standard_normal((batch, 3, 8, 8)).astype(dtype)}
    if scalar:
        out["gain"] = np.asarray(rng.standard_normal(), dtype=dtype)
    return out


def initializer(model, name: str):
    return next(v for v in model.graph.initializers.values() if v.name == name)


# ---- IR version 3: every initializer is also a graph input -----------------------------------


def test_ir3_initializers_listed_as_inputs_are_read_as_constants_and_fold():
    original = conv_bn_file(opset=7, ir_version=3, spatial=1, initializers_as_inputs=True)
    folded, report = fold_onnx(original)
    assert ops(folded) == ["Conv"] and report.sections["remaining"] == []
    assert [v.name for v in folded.graph.inputs] == ["x"] and folded.ir_version == 4
    assert any("6 initializers listed as graph inputs" in note for note in report.notes)
    assert relative_error(original, folded, feeds()) < FLOAT32_REL


def test_the_folded_file_keeps_its_exporters_name_in_its_metadata(tmp_path):
    # bngraph's producer_name marks the files it wrote; the exporter's (tf2onnx 1.16.1) was lost.
    original = conv_bn_file(opset=13, ir_version=7)
    original.producer_version = "1.16.1"
    original.metadata_props.add(key="author", value="someone")
    onnx.save(original, tmp_path / "in.onnx")
    assert fold_file(tmp_path / "in.onnx", tmp_path / "out.onnx")[0] == 0
    folded = onnx.load(str(tmp_path / "out.onnx"))
    meta = {p.key: p.value for p in folded.metadata_props}
    assert folded.producer_name == "bngraph" and meta["bngraph_exported_by"] == "tests 1.16.1" and meta["author"] == "someone"


def test_keep_initializer_inputs_leaves_the_bn_overridable_with_the_reason():
    original = conv_bn_file(opset=7, ir_version=3, spatial=1, initializers_as_inputs=True)
    folded, report = fold_onnx(original, keep_initializer_inputs=True)
    assert ops(folded) == ["Conv", "BatchNormalization"] and len(folded.graph.inputs) == 7
    [row] = report.sections["remaining"]
    assert "is a graph input" in row["reason"] and report.sections["kept"] == []
    assert relative_error(original, folded, feeds()) < FLOAT32_REL


def test_an_ir3_file_folds_and_verifies_through_the_command(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(conv_bn_file(opset=7, ir_version=3, spatial=1, initializers_as_inputs=True), path)
    code, report = fold_file(path, tmp_path / "new.onnx", "--strict")
    assert code == 0 and report["passed"] is True and report["batchnorms_after"] == 0
    assert ops(onnx.load(str(tmp_path / "new.onnx"))) == ["Conv"]


# ---- opsets 7 and 8: spatial=0 keeps statistics per channel and position ---------------------


@pytest.mark.parametrize("opset", [7, 8])
def test_spatial_0_after_a_conv_is_kept_or_becomes_a_per_position_mul_add(opset):
    original = conv_bn_file(opset=opset, ir_version=3, spatial=0, initializers_as_inputs=True)
    folded, report = fold_onnx(original)
    assert ops(folded) == ["Conv", "BatchNormalization"] and report.sections["remaining"] == []
    [kept] = report.sections["kept"]
    assert "per channel and position (4, 6, 6)" in kept["note"]
    assert relative_error(original, folded, feeds()) < FLOAT32_REL
    folded, report = fold_onnx(original, standalone_bn="mul-add")
    assert ops(folded) == ["Conv", "Mul", "Add"]
    mul = next(n for n in folded.graph if n.op_type == "Mul")
    assert mul.inputs[1].const_value.shape == (4, 6, 6)  # one scale per channel and position
    assert relative_error(original, folded, feeds()) < FLOAT32_REL


def test_spatial_0_on_features_is_per_feature_and_folds_into_the_gemm():
    original = gemm_bn_file(opset=8, ir_version=3, spatial=0)
    folded, report = fold_onnx(original)
    assert ops(folded) == ["Gemm"] and report.sections["folded"][0]["how"] == "into the layer before it"
    x = {"x": np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)}
    assert relative_error(original, folded, x) < FLOAT32_REL



@pytest.mark.parametrize("standalone_bn", ["batchnorm", "mul-add"])
def test_spatial_0_statistics_flattened_for_an_image_are_not_read_as_per_channel(standalone_bn):
    # (C*H*W,) statistics: onnx.checker takes the file, onnxruntime does not run it; the fold
    # read them as per channel and crashed in onnxscript's broadcast (a traceback, exit 1); the
    # CLI now gives onnxruntime's refusal of the input in one line. As Mul + Add, they made a
    # Mul the checker failed (a traceback).
    model = conv_bn_file(opset=7, ir_version=4, spatial=0)
    for stat in model.graph.initializer:
        if stat.name in BN_STATS:
            stat.dims[:] = [int(np.prod(stat.dims))]
    folded, report = fold_onnx(model, standalone_bn=standalone_bn)
    assert ops(folded) == ["Conv", "BatchNormalization"]  # as it was, which onnxruntime refuses in one line
    if standalone_bn == "mul-add":
        [left] = report.sections["remaining"]
        assert left["reason"] == ("its statistics are shaped [144], which fits neither its channel axis nor its "
                                  "input's [4, 6, 6] per example")
    else:
        [kept] = report.sections["kept"]
        assert "spatial=0 on a rank-4 input: its 144 statistics are per position" in kept["note"]


def test_a_bn_naming_its_absent_outputs_by_empty_names_folds_and_verifies(tmp_path):
    # The ONNX spec lets a node list optional outputs it does not produce as "": onnxruntime 1.32
    # crashed the whole process on such a BN at ORT_DISABLE_ALL, so fold and verify died with
    # SIGSEGV and no word. Run in subprocesses, so that a crash fails this test, not the suite.
    reference = conv_bn_file(opset=12, ir_version=7)
    model = onnx.ModelProto.FromString(reference.SerializeToString())
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    bn.output.extend(["", "", "", ""])
    onnx.checker.check_model(model, full_check=True)
    original, folded = tmp_path / "m.onnx", tmp_path / "folded.onnx"
    onnx.save(model, str(original))
    for argv in (["fold", str(original), "-o", str(folded)], ["verify", str(original), str(original)]):
        done = subprocess.run([sys.executable, "-m", "bngraph", *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (argv[0], done.returncode, done.stderr[-500:])
    assert ops(ir.load(folded)) == ["Conv"]
    assert relative_error(reference, ir.load(folded), feeds()) < FLOAT32_REL

# ---- opset 15: a float16 layer with float32 BN statistics --------------------------------------


def test_float16_conv_with_float32_statistics_folds_in_float16():
    original = conv_bn_file(opset=15, ir_version=8, dtype=np.float16, stats_dtype=np.float32)
    folded, report = fold_onnx(original)
    assert ops(folded) == ["Conv"] and report.sections["remaining"] == []
    conv = next(iter(folded.graph))
    assert {v.dtype.name for v in conv.inputs} == {"FLOAT16"}  # weights and bias stay float16
    assert relative_error(original, folded, feeds(dtype=np.float16)) < FLOAT16_REL


def test_float16_bn_after_a_pool_becomes_a_float16_mul_add():
    original = conv_bn_file(opset=15, ir_version=8, dtype=np.float16, stats_dtype=np.float32, pool=True)
    folded, _ = fold_onnx(original, standalone_bn="mul-add")
    assert ops(folded) == ["Conv", "MaxPool", "Mul", "Add"]
    assert all(v.dtype.name == "FLOAT16" for n in folded.graph for v in n.inputs)
    assert relative_error(original, folded, feeds(dtype=np.float16)) < FLOAT16_REL



@pytest.mark.parametrize("standalone_bn", ["batchnorm", "mul-add"])
def test_float32_conv_with_float16_statistics_stays_float32_accurate(standalone_bn):
    # The other way round: the BN's scale and shift were rounded to its float16 statistics before
    # they met the float32 weights; 0.0019 of the RMS off, and fold refused its own result.
    original = conv_bn_file(opset=15, ir_version=8, dtype=np.float32, stats_dtype=np.float16)
    folded, report = fold_onnx(original, standalone_bn=standalone_bn)
    [row] = report.sections["kept" if standalone_bn == "batchnorm" else "folded"]
    assert "its statistics are float16 and the Conv's weight float32" in row["note"]
    assert ops(folded) == (["Conv", "BatchNormalization"] if standalone_bn == "batchnorm" else ["Conv", "Mul", "Add"])
    assert relative_error(original, folded, feeds()) < FLOAT32_REL


def test_a_bn_whose_layers_output_is_a_graph_output_says_so():
    original = conv_bn_file()
    conv_out = next(n for n in original.graph.node if n.op_type == "Conv").output[0]
    original.graph.output.append(helper.make_tensor_value_info(conv_out, TensorProto.FLOAT, None))
    folded, report = fold_onnx(original)
    [row] = report.sections["kept"]
    assert f"is also the graph output {conv_out!r}, which must keep its value" in row["note"]
    assert ops(folded) == ["Conv", "BatchNormalization"]

# ---- a batch dimension written as -1, a scalar input -------------------------------------------


@pytest.mark.parametrize("form", ["batchnorm", "mul-add"])
def test_batch_written_as_minus_1_and_a_scalar_input(form):
    original = conv_bn_file(batch_dim=-1, scalar_input=True, pool=True)
    folded, report = fold_onnx(original, standalone_bn=form)
    assert report.sections["remaining"] == [] and report.facts["batchnorms_kept"] == (form == "batchnorm")
    assert [v.name for v in folded.graph.inputs] == ["x", "gain"]
    for batch in (1, 5):
        assert relative_error(original, folded, feeds(batch, scalar=True)) < FLOAT32_REL


def test_batch_written_as_minus_1_folds_into_the_conv():
    original = conv_bn_file(batch_dim=-1)
    folded, _ = fold_onnx(original)
    assert ops(folded) == ["Conv"]
    assert relative_error(original, folded, feeds(4)) < FLOAT32_REL


def test_an_unknown_standalone_form_is_a_user_error():
    from bngraph.errors import UserError

    with pytest.raises(UserError, match="mul-add"):
        fold_onnx(conv_bn_file(), standalone_bn="mul_add")


def test_the_command_folds_and_verifies_a_minus_1_batch_and_a_scalar_input(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(conv_bn_file(batch_dim=-1, scalar_input=True), path)
    code, report = fold_file(path, tmp_path / "out.onnx", "--strict")
    assert code == 0 and report["passed"] is True and report["batchnorms_after"] == 0
    assert ops(onnx.load(str(tmp_path / "out.onnx"))) == ["Mul", "Conv"]


@pytest.mark.parametrize("mode", ["dynamo", "torchscript"])  # Reshape(-1, K), and the older Flatten
@pytest.mark.parametrize("flatten", ["module", "method", "view"])
def test_a_bn_before_flatten_and_gemm_folds_into_the_gemm(mode, flatten):
    from tests.test_fold import FlattenHead

    original = export_onnx(randomize_bn(FlattenHead(flatten)).eval(), (5, 3, 8, 8), mode)
    assert "BatchNormalization" in ops(original)
    folded, report, verification = fold_and_check(original)
    assert verification, verification.lines()
    assert "BatchNormalization" not in ops(folded)
    assert [row["into"].split()[0] for row in report.sections["folded"]] == ["Gemm"]


def test_a_reshape_that_is_not_a_flatten_per_example_keeps_the_bn():
    # (N, 4, 2, 2) -> (N * 2, 8): rows of two examples' halves; no Gemm column is one channel's.
    scale, bias, mean, var = random_bn_stats((4,), 3)
    arrays = {"s": scale, "b": bias, "m": mean, "v": var, "shape": np.array([-1, 8], dtype=np.int64),
              "w": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"]),
             helper.make_node("Reshape", ["y", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w"], ["out"], transB=1)]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 2, 2])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 3])], arrays, opset=17, ir_version=8)
    folded, report, verification = fold_and_check(model)
    assert verification, verification.lines()
    assert ops(folded).count("BatchNormalization") + ops(folded).count("Mul") >= 1  # kept, in some exact form
    assert not [row for row in report.sections["folded"] if row["into"].startswith("Gemm")]


@pytest.mark.parametrize("mode", ["dynamo", "torchscript"])
def test_a_bn_before_a_bias_less_linear_folds_into_its_matmul(mode):
    # TorchScript writes Linear(bias=False) as MatMul by the transposed weight, no Gemm: the BN
    # before it stayed, the one BN of the file no rule took.
    model = randomize_bn(torch.nn.Sequential(torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 5, bias=False)), seed=3).eval()
    original = export_onnx(model, (7, 6), mode)
    assert "BatchNormalization" in ops(original)
    folded, report, verification = fold_and_check(original)
    assert verification, verification.lines()
    assert "BatchNormalization" not in ops(folded) and report.sections["kept"] == []
    x = np.random.default_rng(2).standard_normal((7, 6)).astype(np.float32) * 10 + 3  # TorchScript's batch is fixed
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_in_ort(folded, {folded.graph.inputs[0].name: x})[0], want, rtol=1e-4, atol=1e-3)


def test_a_bn_on_n_c_l_before_a_matmul_over_l_keeps_the_bn():
    # (N, C, L) @ (L, out): the BN scales axis 1, the MatMul sums axis 2. With C == L the shapes
    # fit a fold over the wrong axis, which would compute something else.
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((4, 3)).astype(np.float32)}
    arrays.update(zip(("s", "b", "m", "v"), random_bn_stats((4,), 2)))
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("MatMul", ["bn", "W"], ["y"], name="mm")]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3])], arrays, opset=15, ir_version=8)
    folded, report, verification = fold_and_check(model)
    assert verification, verification.lines()
    assert report.sections["kept"][0]["node"] == "bn"
    assert "rank-3 input, which MatMul 'mm' does not sum over" in report.sections["kept"][0]["note"]


# ---- Biases that look per feature and are not ------------------------------------------------


def test_a_gemm_bias_per_row_keeps_the_bn_before_it():
    # BN -> Gemm with C of shape (M, 1): one bias per row, broadcast over the columns. With the
    # batch fixed at M == out_features it has as many values as one per feature would; folded as
    # one, every column but the largest was wrong, by less than the RMS of an output that one
    # loud column dominates.
    rng = np.random.default_rng(0)
    rows, features = 7, 4
    weight = rng.standard_normal((features, rows)).astype(np.float32)
    weight[:, 0] *= 1e5
    scale, bias, mean, var = random_bn_stats((features,), 1)
    arrays = {"s": scale, "b": bias, "m": mean, "v": var, "W": weight,
              "C": rng.standard_normal((rows, 1)).astype(np.float32)}
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Gemm", ["bn", "W", "C"], ["y"], name="gemm")]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, features])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, rows])], arrays, opset=15, ir_version=8)
    folded, report = fold_onnx(model, standalone_bn="mul-add")
    assert report.sections["folded"][0]["how"] == "multiply-add"
    assert "(7, 1): it differs per row" in report.sections["folded"][0]["note"]
    x = np.random.default_rng(1).standard_normal((rows, features)).astype(np.float32)
    want, got = run_in_ort(model, {"x": x})[0], run_in_ort(folded, {"x": x})[0]
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-4, atol=1e-4)  # the quiet columns too


def test_a_bias_that_raises_the_matmuls_rank_keeps_the_bn_after_it():
    # (7, 4) @ (4, 7) + (1, 1, 7) is (1, 7, 7): the BN's axis 1 holds the MatMul's rows, not its
    # features. Folded as features, the graph no longer type-checked.
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((4, 7)).astype(np.float32), "c": rng.standard_normal((1, 1, 7)).astype(np.float32)}
    arrays.update(zip(("s", "b", "m", "v"), random_bn_stats((7,), 2)))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]), helper.make_node("Add", ["mm", "c"], ["a"]),
             helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["y"], name="bn")]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, 7])], arrays, opset=15, ir_version=8)
    folded, report, verification = fold_and_check(model)
    assert verification, verification.lines()
    assert report.sections["kept"][0]["node"] == "bn"
    assert "raises its rank" in report.sections["kept"][0]["note"]


# ---- Subgraphs -----------------------------------------------------------------------------------


def _if_model() -> onnx.ModelProto:
    """y = If(max(x) > 5, Conv -> BN, Conv): the random inputs of a check never take the branch."""
    rng = np.random.default_rng(0)
    elem = TensorProto.FLOAT
    stats = [numpy_helper.from_array(a, n) for a, n in zip(random_bn_stats((4,), 5), ("s", "b", "m", "v"))]
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "W")
    then = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["t"], name="bn")],
        "then", [], [helper.make_tensor_value_info("t", elem, ["N", 4, 4, 4])], [*stats])
    other = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["e"])], "else", [], [helper.make_tensor_value_info("e", elem, ["N", 4, 4, 4])])
    nodes = [helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0), helper.make_node("Greater", ["top", "five"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", elem, ["N", 4, 4, 4])],
                              [weight, numpy_helper.from_array(np.array(5.0, np.float32), "five")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_bn_inside_an_if_branch_is_left_as_it_is_and_listed(tmp_path):
    model = _if_model()
    onnx.save(model, tmp_path / "in.onnx")
    code, report = fold_file(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert code == 0
    assert (report["batchnorms_before"], report["batchnorms_after"]) == (1, 1)
    assert report["folded"] == [] and [r["node"] for r in report["remaining"]] == ["bn"]
    assert "inside a subgraph" in report["remaining"][0]["reason"]
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    x[0, 0, 0, 0] = 6.0  # takes the branch with the BN
    want = run_in_ort(model, {"x": x})[0]
    np.testing.assert_array_equal(run_in_ort(onnx.load(tmp_path / "out.onnx"), {"x": x})[0], want)
    code, _ = fold_file(tmp_path / "in.onnx", None, "--strict")
    assert code == 1  # a BN left is what --strict fails on


def test_a_float16_fold_that_would_overflow_keeps_the_bn_with_the_reason():
    # A float16 Conv of large weights before a BN that scales by 100: the fold's weights would be
    # 1e5, beyond float16's 65504 (inf), while the model itself, fed inputs scaled down first,
    # stays finite. Folded, every output was inf and the check refused the whole file.
    half = np.float16
    arrays = {"gain": np.array(0.01, half), "W": np.full((4, 3, 1, 1), 1000.0, half),
              "s": np.full(4, 100.0 * np.sqrt(1.0 + 1e-5), half), "b": np.zeros(4, half),
              "m": np.zeros(4, half), "v": np.ones(4, half)}
    nodes = [helper.make_node("Mul", ["x", "gain"], ["small"]), helper.make_node("Conv", ["small", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4, 4, 4])], arrays, opset=15, ir_version=8)
    folded, report, verification = fold_and_check(model)
    assert verification, verification.lines()
    (kept,) = report.sections["kept"]
    assert kept["node"] == "bn" and "beyond float16's largest 6.55e+04" in kept["note"]


# ---- weights past protobuf's 2 GiB limit go to <out>.data ------------------------------------


@pytest.fixture
def external_weights(monkeypatch):
    """Every model takes the path of one over 2 GiB: its weights in `<out>.onnx.data`."""
    import bngraph.onnx_io

    monkeypatch.setattr(bngraph.onnx_io, "SINGLE_FILE_LIMIT_BYTES", 0)


def test_weights_written_beside_the_model_never_replace_a_users_file(tmp_path, external_weights):
    from bngraph.errors import UserError
    from bngraph.onnx_fold import fold_onnx_verified

    source = tmp_path / "in.onnx"
    onnx.save(conv_bn_file(), source)
    users = tmp_path / "out.onnx.data"
    users.write_text("the user's own file")
    with pytest.raises(UserError, match="out.onnx.data exists"):
        fold_onnx_verified(source, tmp_path / "out.onnx")
    assert users.read_text() == "the user's own file" and sorted(p.name for p in tmp_path.iterdir()) == [
        "in.onnx", "out.onnx.data"]
    users.unlink()
    # Written: the pair, and they compute what the input did.
    result, _ = fold_onnx_verified(source, tmp_path / "out.onnx")
    assert result and sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "out.onnx.data"]
    assert relative_error(onnx.load(str(source)), onnx.load(str(tmp_path / "out.onnx")), feeds()) < FLOAT32_REL
    # Replaced with --force, as bngraph's own pair; and a failed check leaves no weights behind.
    result, _ = fold_onnx_verified(source, tmp_path / "out.onnx", force=True)
    assert result
    result, _ = fold_onnx_verified(source, tmp_path / "again.onnx", atol=0.0, rtol=0.0)
    assert not result and sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "out.onnx.data"]


def test_a_model_with_weights_beside_it_edited_during_force_keeps_its_weights(tmp_path, external_weights, monkeypatch):
    # The user re-saved out.onnx while --force rewrote it: the last check refused it, as edited,
    # but the new weights had already replaced out.onnx.data and were then deleted, leaving the
    # user's model without weights. Then: a small model replacing the pair leaves no stale .data.
    import bngraph.onnx_io
    from bngraph.errors import UserError
    from bngraph.onnx_fold import fold_onnx_verified

    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn_file(), source)
    assert fold_onnx_verified(source, out)[0]
    weights_before = (tmp_path / "out.onnx.data").read_bytes()
    verify = bngraph.onnx_io.verify

    def verify_while_the_user_edits(*args, **kwargs):
        result = verify(*args, **kwargs)
        edited = onnx.load(str(out), load_external_data=False)
        edited.doc_string = "my notes"
        onnx.save(edited, str(out))
        return result

    monkeypatch.setattr(bngraph.onnx_io, "verify", verify_while_the_user_edits)
    with pytest.raises(UserError, match="changed since"):
        fold_onnx_verified(source, out, force=True)
    assert (tmp_path / "out.onnx.data").read_bytes() == weights_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "out.onnx.data"]
    assert relative_error(onnx.load(str(source)), onnx.load(str(out)), feeds()) < FLOAT32_REL
    monkeypatch.setattr(bngraph.onnx_io, "verify", verify)
    for name in ("out.onnx", "out.onnx.data"):  # the user's now: moved away by hand
        (tmp_path / name).unlink()
    assert fold_onnx_verified(source, out)[0]  # bngraph's pair again
    monkeypatch.setattr(bngraph.onnx_io, "SINGLE_FILE_LIMIT_BYTES", 2**31)  # a model for one file
    assert fold_onnx_verified(source, out, force=True)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]  # the old pair's .data gone


def test_weights_beside_a_model_edited_since_are_the_users(tmp_path, external_weights, monkeypatch):
    # The seal covered the .onnx only: weights edited (or swapped in) beside a model bngraph wrote
    # were overwritten by --force, and deleted when a small model replaced the pair.
    import bngraph.onnx_io
    from bngraph.errors import UserError
    from bngraph.onnx_fold import fold_onnx_verified

    source, out, data = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "out.onnx.data"
    onnx.save(conv_bn_file(), source)
    assert fold_onnx_verified(source, out)[0]
    edited = bytearray(data.read_bytes())
    edited[0] ^= 0xFF  # the user's fine-tuned weights, say
    data.write_bytes(bytes(edited))
    with pytest.raises(UserError, match="out.onnx.data exists.*changed since"):
        fold_onnx_verified(source, out, force=True)
    monkeypatch.setattr(bngraph.onnx_io, "SINGLE_FILE_LIMIT_BYTES", 2**31)  # a model for one file
    assert fold_onnx_verified(source, out, force=True)[0]
    assert data.read_bytes() == bytes(edited)  # kept: not the old model's weights as bngraph wrote them


@pytest.mark.parametrize("exposed", ["W", "B"])
def test_a_layer_whose_weight_is_also_a_graph_output_keeps_its_bn(tmp_path, exposed):
    # Valid ONNX that some exporters write: a parameter exposed as an output. The fold renamed
    # the folded weight onto it, and the final check raised a traceback.
    rng = np.random.default_rng(0)
    weights = {"W": rng.standard_normal((4, 3, 3, 3)), "B": rng.standard_normal(4)}
    stats = dict(zip(["scale", "shift", "mean", "var"], random_bn_stats(4, seed=1)))
    initializers = [numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in {**weights, **stats}.items()]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"]),
         helper.make_node("BatchNormalization", ["c", *stats], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6]),
         helper.make_tensor_value_info(exposed, TensorProto.FLOAT, weights[exposed].shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "in.onnx")
    code, report = fold_file(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert code == 0 and report["batchnorms_after"] == 1
    [kept] = report["kept"]
    assert f"its {exposed!r} is also a graph output" in kept["note"]
    original, written = run_in_ort(model, feeds()), run_in_ort(onnx.load(str(tmp_path / "out.onnx")), feeds())
    assert all(np.array_equal(a, b) for a, b in zip(original, written))


def test_statistics_written_as_constant_of_shape_fold_and_random_ops_stay_random(tmp_path):
    # onnx's own "light" models (and exporters' zero and one tensors) write a constant as
    # ConstantOfShape, which onnxscript's folder keeps: light_resnet50's 53 BNs were all left.
    # Bernoulli, which that folder does not know for random, was folded into one frozen sample.
    rng = np.random.default_rng(0)
    scale, shift, _, var = random_bn_stats(4, seed=2)
    arrays = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "shape": np.array([4], np.int64),
              "scale": scale, "shift": shift, "var": var, "p": np.full((1, 4, 1, 1), 0.5, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("ConstantOfShape", ["shape"], ["mean"], value=numpy_helper.from_array(np.array([0.7], np.float32))),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"]),
             helper.make_node("Bernoulli", ["p"], ["keep"]),
             helper.make_node("Mul", ["bn", "keep"], ["y"])]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], arrays, opset=17, ir_version=8)
    folded, report = fold_onnx(model)
    assert report.facts["batchnorms_after"] == 0 and [n.op_type for n in folded.graph].count("Bernoulli") == 1


def test_a_transpose_pair_between_a_conv_and_its_bn_is_cancelled_before_the_fold():
    # tf2onnx's NHWC graphs before its own optimizer: Conv -> to NHWC -> back to NCHW -> BN. The
    # pair was cancelled after the folds had run, leaving Conv -> BN unfolded in the file.
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              **dict(zip(["scale", "shift", "mean", "var"], random_bn_stats(4, seed=3)))}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("Transpose", ["c"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["nhwc"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("BatchNormalization", ["nchw", "scale", "shift", "mean", "var"], ["y"])]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], arrays, opset=17, ir_version=8)
    folded, report = fold_onnx(model)
    assert report.facts["batchnorms_after"] == 0 and [n.op_type for n in folded.graph] == ["Conv"]
    assert relative_error(model, folded, feeds()) < FLOAT32_REL


@pytest.mark.parametrize("standalone_bn", ["fold", "mul-add"])
def test_a_float64_models_fold_is_float64_accurate(standalone_bn):
    # The BN's scale and shift were computed in float32 and stored as float64: 1.3e-4 of the
    # output off on inputs near the running mean (where data lies), 1e-7 on N(0, 1).
    rng = np.random.default_rng(3)
    channels, offset = 4, 1e4
    stats = [numpy_helper.from_array(a, n) for n, a in (
        ("s", rng.normal(size=channels)), ("b", rng.normal(size=channels)),
        ("m", rng.normal(size=channels) + offset), ("v", rng.uniform(0.5, 2, size=channels)))]
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h" if standalone_bn == "fold" else "y"])]
    weights = []
    if standalone_bn == "fold":
        nodes.append(helper.make_node("Gemm", ["h", "w"], ["y"]))
        weights = [numpy_helper.from_array(rng.normal(size=(channels, channels)), "w")]
    value = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, ["N", channels]) for n in ("x", "y")]
    original = helper.make_model(helper.make_graph(nodes, "g", value[:1], value[1:], stats + weights),
                                 opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folded, _ = fold_onnx(original, standalone_bn="mul-add")
    assert "BatchNormalization" not in ops(folded)
    near_the_mean = {"x": rng.normal(size=(7, channels)) + offset}
    assert relative_error(original, folded, near_the_mean) < 1e-11


def test_an_output_declared_at_the_examples_batch_does_not_fix_the_folds_batch():
    # Exporters write the example's batch into an output whose input takes any; onnxruntime
    # runs it at any batch. The Flatten-to-Reshape rule trusted the declared [2, 32]: the folded
    # file failed at batch 1, and fold refused a valid file, naming a node only it had made.
    scale, bias, mean, var = random_bn_stats((2,), 5)
    arrays = {"s": scale, "b": bias, "m": mean, "v": var,
              "w": np.random.default_rng(0).standard_normal((2, 3, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["h"]),
             helper.make_node("Flatten", ["h"], ["y"])]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], arrays, opset=17, ir_version=8)
    folded, _, verification = fold_and_check(model)
    assert verification, verification.lines()
    assert "BatchNormalization" not in ops(folded)
    assert [getattr(d, "value", d) for d in folded.graph.outputs[0].shape] == ["N", 32]


def test_a_pad_of_opset_9_before_a_conv_folds():
    # tf2onnx below opset 11 writes a Pad's pads as an attribute: onnxscript's Pad+Conv rule read
    # them as an input, an IndexError traceback.
    scale, bias, mean, var = random_bn_stats((4,), 6)
    arrays = {"s": scale, "b": bias, "m": mean, "v": var,
              "w": np.random.default_rng(0).standard_normal((5, 4, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"]),
             helper.make_node("Pad", ["h"], ["p"], mode="constant", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.0),
             helper.make_node("Conv", ["p", "w"], ["y"])]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6, 6])], arrays, opset=9, ir_version=8)
    folded, _, verification = fold_and_check(model)
    assert verification, verification.lines()


@pytest.mark.parametrize("opset", [13, 14])
def test_a_shape_declared_at_the_examples_size_does_not_fix_a_reshape_of_any_size(opset):
    # An input of any H, W, and value_info giving a Reshape's output at the example's [N, 4, 64]:
    # the Reshape's target became the constant [-1, 4, 64] (at opset 13 with allowzero, which
    # the opset lacks: a traceback), and the file computed something else at 16 x 12.
    scale, bias, mean, var = random_bn_stats((4,), 7)
    arrays = {"s": scale, "b": bias, "m": mean, "v": var, "i0": np.array([0], np.int64),
              "tail": np.array([4, -1], np.int64),
              "w": np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["h"]),
             helper.make_node("Shape", ["h"], ["shape"]), helper.make_node("Gather", ["shape", "i0"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "tail"], ["target"], axis=0), helper.make_node("Reshape", ["h", "target"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["y"], axes=[2], keepdims=0)]
    model = onnx_file(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], arrays, opset=opset, ir_version=8)
    model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4, 64]))
    folded, _ = fold_onnx(model)
    assert "BatchNormalization" not in ops(folded)
    for shape in ((2, 3, 16, 12), (1, 3, 5, 7)):
        x = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
        assert relative_error(model, folded, x) < 1e-5


# ---- tidy rules: exact, and never where verification cannot look -------------------------------


def _uint8_pad_conv_integer(pad_in_a_branch: bool) -> onnx.ModelProto:
    """uint8 Pad(x, 0) -> ConvInteger(x_zero_point=128) -> Cast -> Conv -> BN, as a quantizer writes
    it; with `pad_in_a_branch`, that Pad and ConvInteger run only for a batch above 8 (an If)."""
    rng = np.random.default_rng(0)
    pad = [helper.make_node("Pad", ["x", "pads", "pad_value"], ["xp"]), helper.make_node("ConvInteger", ["xp", "w", "xz"], ["q"])]
    if pad_in_a_branch:
        small = helper.make_node("ConvInteger", ["x", "w", "xz"], ["q_small"], pads=[1, 1, 1, 1])
        then_graph = helper.make_graph(pad, "large_batch", [], [helper.make_tensor_value_info("q", TensorProto.INT32, None)])
        else_graph = helper.make_graph([small], "small_batch", [],
                                       [helper.make_tensor_value_info("q_small", TensorProto.INT32, None)])
        pad = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
               helper.make_node("Greater", ["n", "eight"], ["large"]),
               helper.make_node("If", ["large"], ["q"], then_branch=then_graph, else_branch=else_graph)]
    nodes = [*pad, helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT), helper.make_node("Conv", ["qf", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"])]
    arrays = {"w": rng.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8), "xz": np.uint8(128),
              "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pad_value": np.uint8(0),
              "zero": np.array(0, np.int64), "eight": np.array(8, np.int64),
              "W": rng.normal(size=(4, 4, 1, 1)).astype(np.float32),
              **dict(zip(("scale", "bias", "mean", "var"), random_bn_stats(4, seed=1)))}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pad_in_a_branch", [False, True], ids=["in-the-graph", "in-an-if-branch"])
def test_a_pad_before_a_conv_integer_stays_a_pad_and_the_bn_folds(pad_in_a_branch):
    # onnxscript's Pad fusion into ConvInteger pads with the zero point where the Pad wrote 0: in
    # the graph the fold's check failed on it (nothing written); in a branch that only a batch
    # above 8 takes, verification's batches never ran it and the file was off by 2.5x its RMS.
    original = _uint8_pad_conv_integer(pad_in_a_branch)
    folded, report = fold_onnx(original)
    assert "BatchNormalization" not in ops(folded) and len(report.sections["folded"]) == 1
    for batch in (1, 9):
        x = {"x": np.random.default_rng(batch).integers(0, 256, (batch, 3, 6, 6)).astype(np.uint8)}
        assert relative_error(original, folded, x) < FLOAT32_REL
    tidy_note = [note for note in report.notes if note.startswith("rewrite rules not applied: the file has 1 If")]
    assert bool(tidy_note) == pad_in_a_branch


def test_a_max_and_min_whose_bound_raises_the_rank_stay_as_they_are(tmp_path):
    # Clip(x, lb, ub) keeps x's rank, where Max(x, lb) with lb of shape (1, 1, 1) raises it: the
    # fusion's file failed the checker, in a traceback.
    graph = helper.make_graph(
        [helper.make_node("Max", ["x", "lb"], ["a"]), helper.make_node("Min", ["a", "ub"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "N", 4])],
        [numpy_helper.from_array(np.full((1, 1, 1), -0.5, np.float32), "lb"), numpy_helper.from_array(np.float32(0.5), "ub")])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, _ = fold_onnx(original)
    assert ops(folded) == ["Max", "Min"]
    x = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    assert run_in_ort(folded, x)[0].shape == (1, 3, 4)



# ---- files from onnx's own test corpus: ops the fold must leave exact, or refuse in one line ----


def _one_graph(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_a_cast_like_without_saturation_stays_unsaturated():
    # onnxscript's folder made it a Cast without `saturate=0`: 1e6 became float8's 448, not NaN.
    like = helper.make_tensor("like", TensorProto.FLOAT8E4M3FN, [0], [])
    original = _one_graph([helper.make_node("CastLike", ["x", "like"], ["y"], saturate=0)],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, ["N", 4])], [like], opset=19)
    folded, _ = fold_onnx(original)
    x = {"x": np.array([[1.0, 1e6, np.inf, -1e6]], np.float32)}
    np.testing.assert_array_equal(run_in_ort(folded, x)[0].view(np.uint8), run_in_ort(original, x)[0].view(np.uint8))


@pytest.mark.parametrize("fill, to", [(300.0, TensorProto.UINT8), (5.0, TensorProto.INT64)])
def test_a_filled_constant_cast_to_integers_keeps_its_value(fill, to):
    # onnxscript's rules for ConstantOfShape -> Cast: one raised OverflowError casting 300.0 to
    # uint8 (a traceback), the other, for a fill without a value, took this one and filled with 0.
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["filled"],
                              value=numpy_helper.from_array(np.array([fill], np.float32))),
             helper.make_node("Cast", ["filled"], ["cast"], to=to),
             helper.make_node("Cast", ["cast"], ["back"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "back"], ["y"])]
    original = _one_graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], opset=18)
    folded, _ = fold_onnx(original)
    x = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run_in_ort(folded, x)[0], run_in_ort(original, x)[0])


def _gemm_with_a_zero_bias_at_opset_9():
    arrays = [numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "W"),
              numpy_helper.from_array(np.zeros(4, np.float32), "C")]
    return _one_graph([helper.make_node("Gemm", ["x", "W", "C"], ["y"], beta=0.0)],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], arrays, opset=9)


def _concat_from_sequence_at_opset_12():
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["s"]),
             helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=-1, new_axis=1)]
    return _one_graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 2])], opset=12)


def _split_to_sequence_at_opset_12():
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["s"], axis=1), helper.make_node("SequenceAt", ["s", "i"], ["y"])]
    arrays = [numpy_helper.from_array(np.array([1, 2], np.int64), "split"), numpy_helper.from_array(np.array(1, np.int64), "i")]
    return _one_graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], arrays, opset=12)


@pytest.mark.parametrize("build", [_gemm_with_a_zero_bias_at_opset_9, _concat_from_sequence_at_opset_12,
                                   _split_to_sequence_at_opset_12], ids=["gemm-9", "concat-from-sequence-12",
                                                                         "split-to-sequence-12"])
def test_rewrites_write_only_ops_the_files_opset_has(build, tmp_path):
    # A Gemm without its C (optional from opset 11), an Unsqueeze and a Split of opset 13: the
    # written file failed the checker, in a traceback.
    onnx.save(build(), tmp_path / "in.onnx")
    code, _ = fold_file(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert code == 0
    x = {"x": np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)}
    np.testing.assert_array_equal(run_in_ort(onnx.load(tmp_path / "out.onnx"), x)[0], run_in_ort(build(), x)[0])


def test_optional_and_string_outputs_are_compared_exactly_and_sequence_inputs_refused(tmp_path, capsys):
    # None (an empty optional) and onnxruntime's string objects crashed verify's comparison; a
    # sequence input crashed reading its element type.
    prefix = numpy_helper.from_array(np.array(["id-"], dtype=object), "prefix")
    strings = _one_graph([helper.make_node("Cast", ["x"], ["s"], to=TensorProto.STRING),
                          helper.make_node("StringConcat", ["prefix", "s"], ["y"])],
                         [helper.make_tensor_value_info("x", TensorProto.INT64, ["N"])],
                         [helper.make_tensor_value_info("y", TensorProto.STRING, ["N"])], [prefix], opset=20)
    onnx.save(strings, tmp_path / "strings.onnx")
    assert fold_file(tmp_path / "strings.onnx", tmp_path / "strings_out.onnx")[0] == 0
    sequence = _one_graph([helper.make_node("SequenceLength", ["s"], ["n"])],
                          [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("n", TensorProto.INT64, [])])
    onnx.save(sequence, tmp_path / "sequence.onnx")
    from bngraph.cli import main

    capsys.readouterr()
    assert main(["fold", str(tmp_path / "sequence.onnx"), "-o", str(tmp_path / "sequence_out.onnx")]) == 2
    assert "input 's' of" in capsys.readouterr().err and not (tmp_path / "sequence_out.onnx").exists()


def test_a_model_that_computes_its_own_gradient_is_refused_in_one_line():
    # onnx's simple/test_gradient_of_add: the passes lost its outputs' types, and the check raised.
    nodes = [helper.make_node("Add", ["a", "b"], ["c"]),
             helper.make_node("Gradient", ["a", "b"], ["da", "db"], domain="ai.onnx.preview.training", xs=["a", "b"],
                              y="c")]
    scalar = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [scalar("a"), scalar("b")], [scalar("c"), scalar("da"), scalar("db")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12),
                                                    helper.make_opsetid("ai.onnx.preview.training", 1)])
    with pytest.raises(UserError, match=r"computes its own training \(Gradient of ai.onnx.preview.training\)"):
        fold_onnx(model)


# ---- declared shapes: other exporters leave an output's out ------------------------------------


def test_an_output_declared_without_a_shape_gets_the_inferred_one_and_folds(tmp_path):
    # onnxruntime runs such a file and verify passed it, but fold refused it in onnx.checker's
    # words ("Field 'shape' of 'type' is required but missing"), naming no value.
    reference = conv_bn_file(opset=17, ir_version=8)
    model = onnx.ModelProto.FromString(reference.SerializeToString())
    model.graph.output[0].type.tensor_type.ClearField("shape")
    original, folded = tmp_path / "m.onnx", tmp_path / "folded.onnx"
    onnx.save(model, str(original))
    code, report = fold_file(original, folded)
    assert code == 0, report
    assert ops(ir.load(folded)) == ["Conv"]
    assert relative_error(reference, ir.load(folded), feeds()) < FLOAT32_REL
    model.graph.input[0].type.tensor_type.ClearField("shape")  # nothing can say an input's rank
    onnx.save(model, str(original))
    with pytest.raises(UserError, match="graph input 'x' declares no shape"):
        fold_onnx_verified(original, tmp_path / "again.onnx")
