"""The whole life of a BN model on both zoo models, through the command line:
insert, a few training steps, fold, export, verify, with the errors printed."""

import json

import pytest
import torch

import bngraph
from bngraph.cli import main
from tests.mnist_like import write_learnable


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_learnable(tmp_path_factory.mktemp("mnist"), n_train=120, n_test=40)


def _json(capsys, *argv) -> dict:
    code = main([str(a) for a in argv] + ["--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


@pytest.mark.parametrize("name", ["mnist-mlp", "inception-small"])
def test_insert_train_fold_export_verify(name, data, tmp_path, capsys):
    inserted = _json(capsys, "insert", f"zoo:{name}", "-o", tmp_path / "bn")
    assert inserted["inserted"]
    _json(capsys, "train", tmp_path / "bn", "--data", data, "--steps", 4, "--batch-size", 16,
          "--lr", 0.1, "--eval-every", 2, "--quiet", "-o", tmp_path / "run")
    trained = bngraph.load(tmp_path / "run")
    assert any(not torch.equal(trained.state_dict()[k], bngraph.load(tmp_path / "bn").state_dict()[k])
               for k in trained.state_dict() if "running_mean" in k)

    folded = _json(capsys, "fold", tmp_path / "run", "-o", tmp_path / "folded", "--strict")
    assert folded["batchnorms_before"] == len(inserted["inserted"]) and folded["batchnorms_after"] == 0
    exported = _json(capsys, "export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert exported["passed"] is True
    for candidate in (tmp_path / "folded", tmp_path / "m.onnx"):
        verified = _json(capsys, "verify", tmp_path / "run", candidate, "--data", data)
        assert verified["passed"] is True
        errors = {o["runtime"]: o["max_abs"] for o in verified["outputs"]}
        with capsys.disabled():  # the errors, for whoever runs this with -s
            print(f"\n{name}: {candidate.name} vs the trained BN model, max abs error {errors}")
        assert max(errors.values()) < 1e-4
