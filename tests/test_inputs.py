"""Example inputs: a shape, a dtype and a batch axis (or none) per input, from the command line, a
model's declaration, an artifact or an ONNX graph; the checks vary the batch only where there is one."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
import torch

import bngraph
from bngraph.insert import calibration_batches
from bngraph.cli import main
from bngraph.load import load_model
from bngraph.runners import ExampleInputs, onnx_inputs, random_batches

TOKEN_MIXER_PY = '''
import torch
from torch import nn


class TokenMixer(nn.Module):
    """Token ids (N, T) int64, and a (T, T) attention mask without a batch axis."""

    example_input_shapes = [(2, 6), (6, 6)]
    example_input_dtypes = ["int64", "float32"]
    example_input_batch_axes = [0, None]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # both sides of `verify` build the same weights
        self.embed, self.bn, self.fc = nn.Embedding(50, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()
        self.eval()

    def forward(self, ids, mask):
        h = self.embed(ids)
        scores = h @ h.transpose(1, 2) / 8**0.5 + mask  # an additive (T, T) attention mask
        mixed = scores.softmax(-1) @ h
        return self.fc(self.bn(mixed.mean(1)).relu())


class Undeclared(TokenMixer):
    example_input_shapes = example_input_dtypes = example_input_batch_axes = None
'''
FLAGS = ["--input-shape", "2,6;6,6", "--input-dtype", "int64;float32", "--static-input", "1"]


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mixer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "mixer.py").write_text(TOKEN_MIXER_PY)
    return folder, f"{folder / 'mixer.py'}:TokenMixer", f"{folder / 'mixer.py'}:Undeclared"


# ---- the command line ---------------------------------------------------------------------------


def test_flags_describe_each_input(mixer):
    _, _, undeclared = mixer
    loaded = load_model(undeclared, input_shape="2,6;6,6", input_dtype="int64;float32", static_inputs=[1])
    x = loaded.example_inputs()
    assert [t.dtype for t in x] == [torch.int64, torch.float32] and x.batch_axes == [0, None]
    assert set(x[0].unique().tolist()) <= {0, 1}  # valid ids for any vocabulary


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--input-shape", "2,6;6,6", "--input-dtype", "long;float32"], "bad --input-dtype 'long'"),
        (["--input-shape", "2,6;6,6", "--input-dtype", "int64"], "--input-dtype gives 1 dtypes for 2 inputs"),
        (["--input-shape", "2,6;6,6", "--static-input", "2"], "--static-input 2: the model has inputs 0 to 1"),
        (["--input-shape", "2,6;6,6", "--input-dtype", "int64;bfloat16"], "numpy inputs, which have no bfloat16"),
    ],
    ids=["unknown-dtype", "dtype-count", "static-index", "bfloat16"],
)
def test_bad_input_flags_exit_2_with_one_line(mixer, flags, message):
    _, _, undeclared = mixer
    code, out, err = run_cli("verify", undeclared, undeclared, *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def test_a_model_with_a_static_int_input_verifies_against_itself(mixer):
    _, declared, undeclared = mixer
    code, out, err = run_cli("verify", declared, declared, "--json")  # the class declares its inputs
    assert code == 0 and json.loads(out)["batch_sizes"] == [1, 1, 1, 7], err
    assert run_cli("verify", undeclared, undeclared, *FLAGS)[0] == 0
    # Without --static-input the mask is given a batch too: one line that names the flag.
    code, _, err = run_cli("verify", undeclared, undeclared, *FLAGS[:4])
    assert code == 2 and "--static-input" in err and err.count("\n") == 1


def test_export_keeps_the_static_input_static_and_the_ids_int64(mixer):
    folder, declared, undeclared = mixer
    path = folder / "mixer.onnx"
    code, _, err = run_cli("export", undeclared, "-o", path, *FLAGS)
    assert code == 0, err
    ids, mask = onnx.load(str(path)).graph.input
    assert ids.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert ids.type.tensor_type.shape.dim[0].dim_param  # the batch is dynamic
    assert [d.dim_value for d in mask.type.tensor_type.shape.dim] == [6, 6]
    spec = onnx_inputs(path)
    assert spec.batch_axes == [0, None] and spec.fixed_batch is None
    assert run_cli("verify", path, path)[0] == 0  # the file alone says which input has a batch
    code, out, err = run_cli("verify", declared, path)
    assert code == 0, out + err


def test_artifacts_store_dtypes_and_batch_axes(mixer):
    folder, declared, undeclared = mixer
    artifact = folder / "folded"
    code, _, err = run_cli("fold", undeclared, "-o", artifact, *FLAGS)
    assert code == 0, err
    meta = json.loads((artifact / "bngraph.json").read_text())
    assert meta["input_dtypes"] == ["int64", "float32"] and meta["input_batch_axes"] == [0, None]
    x = load_model(str(artifact)).example_inputs()
    assert [t.dtype for t in x] == [torch.int64, torch.float32]
    assert x.batch_axes == [0, None]
    assert run_cli("verify", declared, artifact)[0] == 0
    # An artifact written before dtypes and batch axes were stored: float32, all batched.
    del meta["input_dtypes"], meta["input_batch_axes"]
    (artifact / "bngraph.json").write_text(json.dumps(meta))
    old = load_model(str(artifact))
    assert old.input_dtypes == ["float32", "float32"] and old.batch_axes == [0, 0]


def test_calibration_batches_draw_ids_and_keep_static_shapes():
    example = ExampleInputs([torch.zeros(2, 6, dtype=torch.int64), torch.ones(6, 6)], [0, None])
    for ids, mask in calibration_batches(example, count=2, batch=16):
        assert ids.shape == (16, 6) and ids.dtype == torch.int64 and set(ids.unique().tolist()) <= {0, 1}
        assert mask.shape == (6, 6) and mask.dtype == torch.float32


def test_random_batches_vary_only_batched_inputs():
    batches = random_batches([(2, 6), (6, 6), ()], (1, 7), ["int64", "float32", "float32"], batch_axes=[0, None, None])
    assert [[x.shape for x in b] for b in batches] == [[(1, 6), (6, 6), ()], [(7, 6), (6, 6), ()]]
    assert batches[0][0].dtype == np.int64 and batches[0][2].ndim == 0


# ---- ONNX files from other exporters -------------------------------------------------------------


def old_style_onnx() -> onnx.ModelProto:
    """y = (x @ W) * s as older exporters write it: IR 3 (W also listed as a graph input), the
    batch dimension as dim_value -1, and a scalar input s of shape []."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "W")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["t"]), onnx.helper.make_node("Mul", ["t", "s"], ["y"])],
        "old",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3]),
            onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [3, 4]),
            onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, []),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1, 4])],
        [w],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 9)])
    model.ir_version = 3
    return model


def test_onnx_inputs_of_an_old_style_file():
    data = old_style_onnx().SerializeToString()
    spec = onnx_inputs(data)
    assert spec.shapes == [(1, 3), ()] and spec.batch_axes == [0, None] and spec.fixed_batch is None
    given = onnx_inputs(data, [(5, 3), ()])
    assert given.shapes == [(5, 3), ()] and given.batch_axes == [0, None]


def test_an_old_style_file_verifies_and_folds(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(old_style_onnx(), str(path))
    code, out, err = run_cli("verify", path, path, "--reference", "--json")  # ORT and the evaluator agree on feeds
    assert code == 0 and json.loads(out)["batch_sizes"] == [1, 1, 1, 7], err
    code, out, err = run_cli("verify", path, path, "--input-shape", "2,3;", "--json")  # '': the 0-d input
    assert code == 0 and json.loads(out)["batch_sizes"] == [1, 1, 1, 7], err
    code, out, err = run_cli("verify", path, path, "--input-shape", "2,3;1")
    assert code == 2 and "rank 1" in err and err.count("\n") == 1
    code, out, err = run_cli("verify", path, path, "--input-dtype", "int64;float32")
    assert code == 2 and "declares float32;float32" in err and err.count("\n") == 1
    code, _, err = run_cli("fold", path, "-o", tmp_path / "folded.onnx")
    assert code == 0, err


def test_a_batch_axis_other_than_0_is_refused_not_taken_for_0(tmp_path):
    # batch_axes=[1] was exported with axis 0 dynamic, as if 0 had been given.
    with pytest.raises(bngraph.UserError, match="batch axis 1: an input's batch axis is 0, or None"):
        bngraph.export(torch.nn.Linear(4, 4).eval(), [torch.randn(2, 4)], tmp_path / "m.onnx", batch_axes=[1])
    assert not (tmp_path / "m.onnx").exists()


def test_tensor_data_of_more_images_than_labels_is_refused():
    from bngraph.training import TensorData

    x, y = torch.rand(30, 1, 4, 4), torch.randint(0, 3, (30,))
    with pytest.raises(bngraph.UserError, match="x_train holds 30 examples but y_train 10 labels"):
        TensorData(x, y[:10], x[:5], y[:5])



@pytest.mark.parametrize(("labels", "message"), [
    (lambda y: torch.nn.functional.one_hot(y, 3).float(), r"y_train has shape \(30, 3\); .* \(one-hot labels: y.argmax\(1\)\)"),
    (lambda y: y[:, None], r"y_train has shape \(30, 1\); expected one class index per example, shape \(30,\)"),
    (lambda y: y.float(), "y_train holds float32 labels; expected integer class indices"),
    (lambda y: y - 1, "y_train has label -1; labels are class indices from 0"),
])
def test_tensor_data_labels_that_are_not_class_indices_are_refused(labels, message):
    # One-hot labels trained as probabilities, and the accuracy compared (N,) with (N, 3) by
    # broadcasting: a reported 0.4 for a model right one time in ten. The rest: a torch traceback.
    from bngraph.training import TensorData

    x, y = torch.rand(30, 1, 4, 4), torch.randint(0, 3, (30,))
    with pytest.raises(bngraph.UserError, match=message):
        TensorData(x, labels(y), x[:5], y[:5])
    assert TensorData(x, y.int(), x[:5], y[:5]).y_train.dtype == torch.int64  # int32 labels are class indices
    with pytest.raises(bngraph.UserError, match="x_test is empty"):  # a reshape error inside the checks
        TensorData(x, y, x[:0], y[:0])
    # Every step ran, then the first evaluation raised: mat1 and mat2 shapes cannot be multiplied.
    with pytest.raises(bngraph.UserError, match=r"x_train's examples have shape \(1, 4, 4\) but x_test's \(1, 5, 5\)"):
        TensorData(x, y, torch.rand(5, 1, 5, 5), y[:5])


def test_a_model_of_two_inputs_is_not_trained_on_one(mixer, tmp_path):
    # Trained on its ids alone, its artifact was traced with the mask fixed: called as the
    # model is, (ids, mask), it raised.
    folder, declared, _ = mixer
    (tmp_path / "data.py").write_text(
        "import torch\n"
        "def make():\n"
        "    ids = [(torch.randint(0, 50, (6,)), i % 5) for i in range(20)]\n"
        "    return ids[:15], ids[15:]\n")
    code, out, err = run_cli("train", declared, "--data", f"{tmp_path / 'data.py'}:make", "--steps", 2, "-o",
                             tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "run").exists()
    assert "TokenMixer declares 2 inputs (example_input_shapes); training feeds a model one" in err

def test_the_api_names_a_tensor_given_where_a_list_of_inputs_belongs():
    # torch's "Boolean value of Tensor with more than one value is ambiguous"; verify(m, m, [x])
    # took each row for a batch, and blamed an input without a batch axis.
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval(), torch.randn(3, 4)
    for verb in ("insert", "fold"):
        with pytest.raises(bngraph.UserError, match=f"{verb}'s example inputs are one tensor: give a list"):
            getattr(bngraph, verb)(model, x)
    for batches in (x, [x]):
        with pytest.raises(bngraph.UserError, match=r"verify's inputs are a list of batches, .*: \[\[x\]\]"):
            bngraph.verify(model, model, batches)
    assert bngraph.verify(model, model, [[x]])
    assert bngraph.verify(model, model, ([x] for _ in range(2)))  # a generator of batches: an IndexError


def test_the_api_names_other_wrong_containers_and_paths_in_one_line(tmp_path):
    # numpy's "truth value of an array is ambiguous", a TypeError deep inside for None, pathlib's
    # TypeError for a module given as the output, AttributeErrors for a dict config, numpy
    # TensorData and a state dict saved row by row from a single tensor.
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval(), torch.randn(3, 4)
    for wrong, said in ((x.numpy(), "a ndarray"), (None, "None"), ({"x": x}, "a dict"), (iter([x]), "a list_iterator")):
        for verb, call in (("insert", lambda: bngraph.insert(model, wrong)), ("fold", lambda: bngraph.fold(model, wrong)),
                           ("export", lambda: bngraph.export(model, wrong, tmp_path / "m.onnx")),
                           ("save", lambda: bngraph.save(model, tmp_path / "art", example_inputs=wrong))):
            if verb == "save" and wrong is None:
                continue  # save without example inputs is fine
            with pytest.raises(bngraph.UserError, match=rf"^{verb}'s example inputs are {said}: give a list"):
                call()
    with pytest.raises(bngraph.UserError, match=r"^save's example inputs are one tensor"):
        bngraph.save(model, tmp_path / "art", example_inputs=x)
    with pytest.raises(bngraph.UserError, match=r"^verify's inputs are None"):
        bngraph.verify(model, model, None)
    for tolerance in ("atol", "rtol"):  # inf passed a candidate off by 1.0 on 3 of 4 rows
        with pytest.raises(bngraph.UserError, match=rf"^--{tolerance} must be a finite number >= 0, not inf"):
            bngraph.verify(model, model, [[x]], **{tolerance: float("inf")})
    with pytest.raises(bngraph.UserError, match=r"^batch_sizes labels 0 batches; the inputs hold 1"):
        bngraph.verify(model, model, [[x]], batch_sizes=[])
    for output, said in ((model, "a Sequential"), (None, "None")):
        with pytest.raises(bngraph.UserError, match=rf"^the output path is {said}: name a file or folder"):
            bngraph.export(model, [x], output)
    with pytest.raises(bngraph.UserError, match=r"^the output path is a Sequential"):
        bngraph.save(model, model)
    assert not any(tmp_path.iterdir())


def test_load_takes_a_state_dict_for_its_weights_and_names_a_model_given_instead(tmp_path):
    # Both raised pathlib's TypeError.
    (tmp_path / "net.py").write_text("from torch import nn\n"
                                     "class Net(nn.Module):\n"
                                     "    def __init__(self):\n"
                                     "        super().__init__()\n"
                                     "        self.l = nn.Linear(4, 4)\n"
                                     "    def forward(self, x):\n"
                                     "        return self.l(x).relu()\n")
    spec = f"{tmp_path / 'net.py'}:Net"
    trained = bngraph.load(spec)
    with torch.no_grad():
        trained.l.weight.mul_(3)
    loaded = bngraph.load(spec, weights=trained.state_dict())
    assert torch.equal(loaded.l.weight, trained.l.weight) and loaded.l.weight is not trained.l.weight
    with pytest.raises(bngraph.UserError, match=r"^weights are a Net: give a state dict \(model.state_dict\(\)\)"):
        bngraph.load(spec, weights=trained)
    with pytest.raises(bngraph.UserError, match=r"^weights given are for another model: missing 1 key"):
        bngraph.load(spec, weights={"l.weight": trained.l.weight})


def test_insert_names_calibration_data_in_another_form_in_one_line():
    # A DataLoader's (x, y) pairs reached the forward as two inputs (torch's TypeError), one
    # tensor raised "Boolean value of Tensor", numpy batches a conv2d signature dump, and []
    # calibrated on random batches without a word.
    from torch.utils.data import DataLoader, TensorDataset

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(16, 3, 8, 8)
    cases = [
        (DataLoader(TensorDataset(x, torch.zeros(16)), batch_size=8), r"calibration batch 0 holds 2 tensors; the "
         r"forward takes 1 \(a DataLoader's \(x, y\) pairs: give \[x\] batches, \[\[x\] for x, _ in loader\]\)"),
        (x, r"^calibration_data is one tensor: give a list of batches"),
        ([x[:8], x[8:]], r"calibration batch 0 is a Tensor: give each batch as a list"),
        ([[x[:8].numpy()]], r"calibration batch 0 holds a ndarray"),
        ([], r"calibration_data holds no batch"),
    ]
    for calibration, said in cases:
        with pytest.raises(bngraph.UserError, match=said):
            bngraph.insert(model, [x[:2]], preserve=True, calibration_data=calibration)
    loader = DataLoader(TensorDataset(x), batch_size=8)  # batches of [x]: taken as they are
    calibrated, _ = bngraph.insert(model, [x[:2]], preserve=True, calibration_data=loader)
    with torch.no_grad():
        torch.testing.assert_close(calibrated(x), model(x), rtol=1e-4, atol=1e-4)


class _ScalesItsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.register_forward_pre_hook(lambda module, args: (args[0].float() / 255,))

    def forward(self, x):
        return torch.relu(self.bn(self.c(x)))


def test_saving_a_fold_of_a_model_with_a_hook_says_what_works_from_python(tmp_path):
    # The refusal sent the user to "run bngraph insert (or fold)", which had made the object.
    folded, _ = bngraph.fold(_ScalesItsInput().eval(), [torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)])
    with pytest.raises(bngraph.UserError, match=r"a forward pre-hook, which a traced graph cannot keep\. Keep its "
                                                r"state_dict with torch\.save, or run the command on the model's file"):
        bngraph.save(folded, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_train_names_a_wrong_config_data_or_run_folder_in_one_line(tmp_path):
    from bngraph.training import TensorData, TrainConfig

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    with pytest.raises(bngraph.UserError, match=r"^config is a dict; give a TrainConfig"):
        bngraph.train(model, TensorData(x, y, x, y), {"steps": 2}, progress=False)
    with pytest.raises(bngraph.UserError, match=r"^TensorData's x_train is a ndarray, not a tensor"):
        TensorData(x.numpy(), y.numpy(), x.numpy(), y.numpy())
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(bngraph.UserError, match=r"notes.txt is a file, not a folder"):
        bngraph.train(model, TensorData(x, y, x, y), TrainConfig(steps=2, batch_size=4), out_dir=tmp_path / "notes.txt",
                      progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_the_api_refuses_what_is_not_a_model_or_a_form_in_one_line():
    # An AttributeError from deep inside, and a ValueError for export's name of a form.
    with pytest.raises(bngraph.UserError, match="insert takes an nn.Module, not function"):
        bngraph.insert(lambda x: x, [torch.randn(2, 4)])
    with pytest.raises(bngraph.UserError, match="export's 'mul-add' and 'batchnorm' name the ONNX forms"):
        bngraph.fold(torch.nn.Linear(4, 4).eval(), [torch.randn(2, 4)], standalone_bn="mul-add")


def test_a_torch_compiled_module_is_refused_in_one_line_naming_it(tmp_path):
    # Traced or run by bngraph, dynamo's compiled frame raised "'Inner' object has no attribute
    # 'fc'": a traceback in insert, and an error blamed on the model in fold and export.
    inner = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.SiLU())
    model = torch.nn.Sequential(torch.compile(inner, backend="eager"), torch.nn.Linear(6, 2))
    x = [torch.randn(3, 6)]
    for verb, call in (("insert", lambda: bngraph.insert(model, x)), ("fold", lambda: bngraph.fold(model, x)),
                       ("export", lambda: bngraph.export(model, x, tmp_path / "m.onnx"))):
        with pytest.raises(bngraph.UserError, match=r"^0 is a torch.compile'd module: give bngraph the module before "
                                                    r"torch.compile \(0._orig_mod\)"):
            call()
    (tmp_path / "net.py").write_text("import torch\nexample_input_shape = (3, 6)\n"
                                     "def make() -> torch.nn.Module:\n"
                                     "    return torch.compile(torch.nn.Linear(6, 2), backend='eager')\n")
    code, _, err = run_cli("insert", f"{tmp_path / 'net.py'}:make", "-o", tmp_path / "o")
    assert code == 2 and "the model is a torch.compile'd module" in err and err.count("\n") == 1
