"""`bngraph fold` end to end: artifacts, the JSON report, --strict, and the error contract."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import bngraph
from bngraph.cli import main
from bngraph.load import load_model
from tests.conftest import REPO

MODEL_PY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        example_input_shape = (2, 3, 8, 8)

        def __init__(self, batch_stats=False, broken=False):
            super().__init__()
            torch.manual_seed(0)  # the same weights each time the file is loaded
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.pool, self.bn_pool = nn.MaxPool2d(2), nn.BatchNorm2d(4, track_running_stats=not batch_stats)
            self.fc, self.bn_fc = nn.Linear(4, 5), nn.BatchNorm1d(5)
            gen = torch.Generator().manual_seed(0)  # trained-looking statistics, not a fresh BN's
            with torch.no_grad():
                for bn in (self.bn, self.bn_pool, self.bn_fc):
                    if bn.running_mean is not None:
                        bn.running_mean.normal_(generator=gen)
                        bn.running_var.uniform_(0.5, 2.0, generator=gen)
                    bn.weight.normal_(generator=gen)
                    bn.bias.normal_(generator=gen)
                if broken:
                    self.bn.running_var[1] = float("nan")

        def forward(self, x):
            y = self.bn_pool(self.pool(torch.relu(self.bn(self.conv(x)))))
            return self.bn_fc(self.fc(y.mean((2, 3))))


    def batch_stats():
        return Net(batch_stats=True)


    def broken():
        return Net(broken=True)
    """
)


@pytest.fixture
def model_py(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL_PY)
    return path


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_folds_a_py_model_into_a_loadable_artifact(tmp_path, model_py, capsys):
    code, out, _ = _cli(capsys, "fold", f"{model_py}:Net", "-o", tmp_path / "folded")
    assert code == 0 and "folded (3)" in out
    folded = bngraph.load(tmp_path / "folded").eval()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    original = load_model(f"{model_py}:Net").module.eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), rtol=1e-5, atol=1e-5)
    history = json.loads((tmp_path / "folded" / "bngraph.json").read_text())["history"]
    assert history[-1]["command"] == "fold"
    assert history[-1]["passes"]["fold_bn_into_preceding_layer"]["changed"] == ["bn", "bn_fc"]


SAMPLER_PY = """
import torch
from torch import nn

example_input_shape = (2, 16)


class Sampler(nn.Module):
    \"\"\"Draws noise in eval mode too, as a VAE's sampler does.\"\"\"

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(16, 10), nn.BatchNorm1d(10)

    def forward(self, x):
        h = self.bn(self.fc(x))
        return h + 0.1 * torch.randn_like(h)
"""


def test_a_model_that_draws_in_eval_mode_folds(tmp_path, capsys):
    # The artifact's own round-trip check ran the two models from different random states: a
    # bngraph-bug traceback, exit 1, after an exact fold.
    (tmp_path / "sampler.py").write_text(SAMPLER_PY)
    code, out, err = _cli(capsys, "fold", f"{tmp_path / 'sampler.py'}:Sampler", "-o", tmp_path / "folded")
    assert code == 0 and "folded (1)" in out, err
    folded = bngraph.load(tmp_path / "folded").eval()
    original = load_model(f"{tmp_path / 'sampler.py'}:Sampler").module.eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        outputs = []
        for model in (original, folded):
            torch.manual_seed(1)
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_json_report_keys(model_py, capsys):
    code, out, _ = _cli(capsys, "fold", f"{model_py}:batch_stats", "--json")
    report = json.loads(out)
    assert code == 0
    assert {"folded", "remaining", "nodes_before", "nodes_after"} <= set(report)
    assert report["remaining"] == [{"node": "bn_pool", "reason": report["remaining"][0]["reason"]}]
    assert "track_running_stats=False" in report["remaining"][0]["reason"]
    assert {row["node"] for row in report["folded"]} == {"bn", "bn_fc"}
    assert report["nodes_before"] == 8 and report["nodes_after"] == 6
    assert "no -o: folded and checked, nothing written" in report["notes"]  # it said nothing of it


def test_strict_exits_1_when_a_batchnorm_is_left_and_still_writes(tmp_path, model_py, capsys):
    code, _, err = _cli(capsys, "fold", f"{model_py}:batch_stats", "--strict", "-o", tmp_path / "a", "--json")
    assert code == 1 and (tmp_path / "a" / "bngraph.json").is_file()
    # It exited 1 without a word on stderr, as ONNX's --strict gives one.
    assert err.endswith("\nbngraph: --strict: 1 BatchNorm left, not folded (see 'remaining')\n")
    assert _cli(capsys, "fold", f"{model_py}:Net", "--strict")[0] == 0


def test_folding_an_artifact_appends_to_its_history(tmp_path, capsys):
    assert _cli(capsys, "insert", "zoo:mnist-mlp", "-o", tmp_path / "bn")[0] == 0
    assert _cli(capsys, "fold", tmp_path / "bn", "-o", tmp_path / "folded")[0] == 0
    history = json.loads((tmp_path / "folded" / "bngraph.json").read_text())["history"]
    assert [h["command"] for h in history] == ["insert", "fold"]
    assert history[-1]["report"]["batchnorms_after"] == 0


def test_broken_statistics_exit_2_with_one_line(tmp_path, model_py, capsys):
    code, out, err = _cli(capsys, "fold", f"{model_py}:broken", "-o", tmp_path / "x")
    assert code == 2 and out == "" and not (tmp_path / "x").exists()
    assert err.count("\n") == 1 and err.startswith("bngraph: error: ")
    assert "BatchNorm 'bn' has NaN in its running_var" in err


def test_missing_model_exits_2(capsys):
    code, _, err = _cli(capsys, "fold", "no_such_model.py")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


def test_an_onnx_model_is_folded_in_onnx(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from tests.onnx_models import conv_bn_net
    from tests.onnx_util import export_onnx

    onnx.save(export_onnx(conv_bn_net(), (2, 3, 12, 12), "preserve"), tmp_path / "m.onnx")
    code, out, err = _cli(capsys, "fold", tmp_path / "m.onnx", "-o", tmp_path / "folded.onnx", "--json", "--strict")
    # The BN after the max pool has no exact fold: kept (the fastest form in onnxruntime), not unfolded.
    report = json.loads(out)
    # --strict: a BatchNormalization is still in the file (it said exit 0 where its help says "any BatchNorm")
    assert code == 1 and report["batchnorms_after"] == report["batchnorms_kept"] == 1 and report["remaining"] == []
    assert (tmp_path / "folded.onnx").is_file()
    assert "1 kept as the exact form" in err and "--standalone-bn mul-add writes them as Mul and Add" in err
    args = ("--json", "--strict", "--standalone-bn", "mul-add")  # for a runtime with no BN kernel
    code, out, _ = _cli(capsys, "fold", tmp_path / "m.onnx", "-o", tmp_path / "mul-add.onnx", *args)
    assert code == 0 and json.loads(out)["batchnorms_after"] == 0


@pytest.mark.parametrize("flags, says", [
    (["--weights", "/no/such/file.pt"], "--weights loads a PyTorch state dict; "),
    (["--input-dtype", "int64"], "--input-dtype gives int64; "),
])
def test_an_onnx_fold_refuses_options_that_do_not_apply_to_it(flags, says, tmp_path, capsys):
    # Both were silently ignored: the file folded with its own weights and dtypes.
    onnx = pytest.importorskip("onnx")
    from tests.onnx_models import conv_bn_net
    from tests.onnx_util import export_onnx

    onnx.save(export_onnx(conv_bn_net(), (2, 3, 12, 12), "preserve"), tmp_path / "m.onnx")
    code, _, err = _cli(capsys, "fold", tmp_path / "m.onnx", "-o", tmp_path / "folded.onnx", *flags)
    assert code == 2 and err.startswith(f"bngraph: error: {says}") and err.count("\n") == 1
    assert not (tmp_path / "folded.onnx").exists()


@pytest.mark.parametrize("flags", [["--atol", "0.1"], ["--standalone-bn", "mul-add"], ["--keep-initializer-inputs"]])
def test_a_pytorch_fold_refuses_the_onnx_only_options(flags, tmp_path, model_py, capsys):
    code, _, err = _cli(capsys, "fold", f"{model_py}:Net", "-o", tmp_path / "f", *flags)
    assert code == 2 and f"{flags[0]} applies to an ONNX input only" in err and err.count("\n") == 1
    assert not (tmp_path / "f").exists()


def test_runs_as_a_program(tmp_path, model_py):
    done = subprocess.run(
        [sys.executable, "-m", "bngraph", "fold", f"{model_py}:Net", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["batchnorms_after"] == 0
