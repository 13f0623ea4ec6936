"""bngraph fold on an ONNX file from another exporter: folded, verified against the input, reported."""

from __future__ import annotations


import warnings

import onnx
import pytest
import torch

from bngraph.errors import UserError
from bngraph.onnx_fold import fold_onnx_verified
from tests.onnx_models import conv_bn_net
from tests.onnx_util import export_onnx, fold_file, ops


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """ConvBnNet through the TorchScript exporter with training=PRESERVE: all four BNs left."""
    folder = tmp_path_factory.mktemp("onnx_fold")
    eval_path, train_path = folder / "eval.onnx", folder / "train.onnx"
    onnx.save(export_onnx(conv_bn_net(), (2, 3, 12, 12), "preserve"), eval_path)
    onnx.save(export_onnx(conv_bn_net().train(), (2, 3, 12, 12), "preserve"), train_path)
    return eval_path, train_path


def fold(in_path, out_path, **flags) -> tuple[int, dict]:
    """`bngraph fold` with flags as keywords: strict=True -> --strict, atol=0.0 -> --atol 0.0."""
    argv = []
    for name, value in flags.items():
        option = "--" + name.replace("_", "-")
        argv += [option] if value is True else [] if value is False else [option, str(value)]
    return fold_file(in_path, out_path, *argv)


def test_writes_a_folded_file_that_matches_the_input(exported, tmp_path):
    eval_path, _ = exported
    code, report = fold(eval_path, tmp_path / "out.onnx")
    assert code == 0 and report["passed"] is True
    # The BN after the max pool has no exact fold: kept, the fastest exact form in onnxruntime.
    assert ops(onnx.load(str(tmp_path / "out.onnx"))).count("BatchNormalization") == 1
    assert report["batchnorms_before"] == 4 and report["batchnorms_after"] == 1 and report["remaining"] == []
    [kept] = report["kept"]
    assert "fastest exact form" in kept["reason"] and "MaxPool" in kept["note"]
    hows = sorted(row["how"] for row in report["folded"])
    assert hows == ["into the layer before it"] * 3
    assert {"output", "runtime", "passed", "max_abs", "min_atol"} <= set(report["verification"][0])


def test_a_runtime_without_batchnorm_gets_mul_add_and_strict_passes(exported, tmp_path):
    eval_path, _ = exported
    code, report = fold(eval_path, tmp_path / "out.onnx", standalone_bn="mul-add", strict=True)
    assert code == 0 and report["passed"] is True
    assert "BatchNormalization" not in ops(onnx.load(str(tmp_path / "out.onnx")))
    assert report["batchnorms_after"] == 0 and report["kept"] == [] and report["remaining"] == []
    hows = sorted(row["how"] for row in report["folded"])
    assert hows == ["into the layer before it"] * 3 + ["multiply-add"]
    ops_table = {row["op"]: (row["before"], row["after"]) for row in report["ops"]}
    assert ops_table["BatchNormalization"] == (4, 0) and ops_table["Mul"] == (0, 1)


def test_a_training_mode_bn_is_left_and_strict_exits_1(exported, tmp_path):
    _, train_path = exported
    code, report = fold(train_path, tmp_path / "out.onnx", strict=False)
    assert code == 0 and report["batchnorms_after"] == 4
    assert all("training mode" in row["reason"] for row in report["remaining"])
    code, _ = fold(train_path, tmp_path / "strict.onnx", strict=True)
    assert code == 1 and (tmp_path / "strict.onnx").exists()  # verified, so still written


def test_a_bn_exported_for_training_below_opset_14_is_left(tmp_path):
    # At opsets 7-13 the mode is in the outputs: TorchScript's export with training=TRAINING
    # declares five, uses one, and onnxruntime normalizes with each batch's statistics. It was
    # folded with the running ones; --atol could force out a file 16x the output's spread off.
    model = conv_bn_net().train()
    path = tmp_path / "train13.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 12, 12),), str(path), dynamo=False, opset_version=13,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    assert {len(n.output) for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"} == {5}
    code, report = fold(path, tmp_path / "out.onnx")
    assert code == 0 and report["batchnorms_after"] == report["batchnorms_before"] == 4
    assert all("training mode" in row["reason"] for row in report["remaining"]) and report["folded"] == []


def test_a_mismatch_writes_nothing(exported, tmp_path):
    eval_path, _ = exported
    code, report = fold(eval_path, tmp_path / "out.onnx", atol=0.0, rtol=0.0)
    assert code == 1 and report["passed"] is False
    assert list(tmp_path.iterdir()) == []


def test_without_output_it_verifies_and_writes_nothing(exported, tmp_path):
    eval_path, _ = exported
    code, report = fold(eval_path, None)
    assert code == 0 and report["passed"] is True and "output" not in report
    assert "no -o: folded and checked, nothing written" in report["notes"]


def test_a_file_that_is_not_onnx_is_a_user_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match="not a valid ONNX model"):
        fold_onnx_verified(path, tmp_path / "out.onnx")
