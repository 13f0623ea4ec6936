"""The public functions called from the user's own program (a notebook, a training script):
whatever autocast, random state or inference mode the caller is in, each runs the model as it
is, leaves the caller's state as it was, and says what went wrong as a UserError."""

import random

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bngraph
from bngraph.training import TensorData, TrainConfig


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4)).eval()


class DataDependent(nn.Module):  # an `if` on data: insert wraps its activation modules by running it
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU()

    def forward(self, x):
        if x.sum() > -1e9:
            x = x + 0
        return self.act(self.conv(x))


def test_the_callers_autocast_does_not_change_what_is_checked_or_written(tmp_path):
    # verify judged a float32 model run in bfloat16 at bfloat16's tolerance and passed a
    # candidate 0.6% off; export wrote a float16 file.
    model, x = _net(), torch.randn(2, 3, 8, 8)
    off = _net()
    with torch.no_grad():
        off[4].bias += 0.03
    batches = [[x.numpy()]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not bngraph.verify(model, off, batches)
        result = bngraph.export(model, [x], tmp_path / "m.onnx")
    assert result
    written = onnx.load(str(tmp_path / "m.onnx"))
    assert written.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not [n for n in written.graph.node if n.op_type == "Cast"]


def test_the_callers_random_state_is_left_as_it_was():
    # train seeded torch's generator and left it so: an ensemble built in a seeded loop got one
    # set of initial weights. insert drew from it; importing bngraph's report drew from Python's.
    data = TensorData(torch.rand(32, 3, 8, 8), torch.randint(0, 4, (32,)), torch.rand(8, 3, 8, 8),
                      torch.randint(0, 4, (8,)))
    model, other, x = _net(), DataDependent(), torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    random.seed(1)
    torch_state, python_state = torch.random.get_rng_state(), random.getstate()
    bngraph.train(model, data, TrainConfig(steps=2, batch_size=8, eval_every=2), progress=False)
    bngraph.insert(other, [x])
    assert torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == python_state


def test_the_users_sys_exit_is_a_user_error_not_the_end_of_the_callers_program(tmp_path):
    (tmp_path / "exits.py").write_text("import sys\nfrom torch import nn\nsys.exit(3)\n")

    class ExitsInForward(nn.Module):
        def forward(self, x):
            raise SystemExit(4)

    with pytest.raises(bngraph.UserError, match=r"sys.exit\(3\) at .*exits.py:3"):
        bngraph.load(tmp_path / "exits.py")
    with pytest.raises(bngraph.UserError, match=r"sys.exit\(4\)"):
        bngraph.insert(ExitsInForward(), [torch.randn(2, 3)])


def test_what_cannot_run_in_inference_mode_says_so(tmp_path):
    with torch.inference_mode():
        x = torch.randn(2, 3, 8, 8)
        with pytest.raises(bngraph.UserError, match="inside torch.inference_mode"):
            bngraph.insert(_net(), [x])
        with pytest.raises(bngraph.UserError, match="inside torch.inference_mode"):
            bngraph.save(_net(), tmp_path / "a", example_inputs=[x])
        assert bngraph.verify(_net(), _net(), [[x.numpy()]])  # what runs the model as it is works there
    assert not (tmp_path / "a").exists()


def test_what_fold_and_load_return_inside_inference_mode_can_be_trained_after():
    # fold made its merged weights inside the caller's block: inference tensors, and training
    # the folded model failed in torch's words.
    model = _net()
    with torch.inference_mode():
        folded, _ = bngraph.fold(model, [torch.randn(2, 3, 8, 8)])
        loaded = bngraph.load("zoo:mnist-mlp")
    for trained, example in ((folded, torch.randn(2, 3, 8, 8)), (loaded, torch.rand(2, 1, 28, 28))):
        assert not any(t.is_inference() for t in [*trained.parameters(), *trained.buffers()])
        trained.train()(example).sum().backward()


def test_a_model_built_inside_inference_mode_folds_and_is_refused_for_training():
    with torch.inference_mode():
        model, x = _net(), torch.randn(2, 3, 8, 8)
        model[1].running_mean.normal_()
        folded, _ = bngraph.fold(model, [x])  # this failed reading its buffers' version counters
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    data = TensorData(torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,)), torch.rand(8, 3, 8, 8),
                      torch.randint(0, 4, (8,)))
    with pytest.raises(bngraph.UserError, match="made inside torch.inference_mode"):
        bngraph.train(model, data, TrainConfig(steps=2, batch_size=8, eval_every=2), progress=False)


def test_a_candidate_that_is_no_onnx_model_is_a_user_error(tmp_path):
    (tmp_path / "garbage.onnx").write_text("not onnx")
    batches = [[np.zeros((2, 3, 8, 8), np.float32)]]
    for candidate, message in ((tmp_path / "missing.onnx", "no such ONNX file"),
                               (tmp_path / "garbage.onnx", "is not a valid ONNX model"), (42, "cannot run a int")):
        with pytest.raises(bngraph.UserError, match=message):
            bngraph.verify(_net(), candidate, batches)


def test_a_model_with_nothing_to_train_is_refused_before_the_first_step():
    model = _net().requires_grad_(False)
    data = TensorData(torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,)), torch.rand(8, 3, 8, 8),
                      torch.randint(0, 4, (8,)))
    with pytest.raises(bngraph.UserError, match="no parameter to train"):
        bngraph.train(model, data, TrainConfig(steps=2, batch_size=8, eval_every=2), progress=False)


def test_train_inside_the_callers_no_grad_trains():
    data = TensorData(torch.rand(32, 3, 8, 8), torch.randint(0, 4, (32,)), torch.rand(8, 3, 8, 8),
                      torch.randint(0, 4, (8,)))
    model = _net()
    before = model[4].weight.clone()
    with torch.no_grad():
        bngraph.train(model, data, TrainConfig(steps=2, batch_size=8, eval_every=2), progress=False)
    assert not torch.equal(model[4].weight, before)


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, mask=None):
        y = torch.relu(self.conv(x))
        return y if mask is None else y * mask


def test_torchscript_and_unmaterialized_models_and_non_tensor_inputs_are_refused_in_one_line():
    # A scripted model went through the module-level fallback, which found no nn.BatchNorm in it:
    # fold said "the model has no BatchNorm", insert "nothing changed", both returning it as it was.
    model, x = _net(), torch.randn(2, 3, 8, 8)
    scripted = torch.jit.script(model)
    with torch.device("meta"):
        on_meta = _net()
    for call in (bngraph.fold, bngraph.insert):
        with pytest.raises(bngraph.UserError, match="not a TorchScript module"):
            call(scripted, [x])
        with pytest.raises(bngraph.UserError, match="0.weight is on the meta device"):
            call(on_meta, [x])
        with pytest.raises(bngraph.UserError, match="example input 0 is a dict"):
            call(model, [{"x": x}])
        with pytest.raises(bngraph.UserError, match="example input 0 is on the meta device"):
            call(model, [x.to("meta")])
        with pytest.raises(bngraph.UserError, match="example input 0 is bfloat16"):  # was numpy's TypeError
            call(model.to(torch.bfloat16), [x.to(torch.bfloat16)])
        model.float()
    masked = OptionalMask()
    with pytest.raises(bngraph.UserError, match="example input 1 is None: fold runs the model on tensors"):
        bngraph.fold(masked, [x, None])
    with pytest.raises(bngraph.UserError, match="example input 1 is 2.0: insert runs the model on tensors"):
        bngraph.insert(masked, [x, 2.0])
    bngraph.insert(masked, [x, None])  # an optional argument left at None: insert takes it, as it always did
    with pytest.raises(bngraph.UserError, match="x_train is on the meta device"):
        TensorData(torch.rand(4, 3, 8, 8, device="meta"), torch.zeros(4, dtype=torch.long), torch.rand(4, 3, 8, 8),
                   torch.zeros(4, dtype=torch.long))


def test_the_callers_default_device_is_not_where_bngraph_makes_its_tensors(tmp_path):
    # After torch.set_default_device (a notebook's "cuda"; "meta" here, where a tensor has no
    # values), every call failed in bngraph's own helpers, which made their tensors there.
    model, x = _net(), torch.randn(2, 3, 8, 8)
    torch.set_default_device("meta")
    try:
        folded, _ = bngraph.fold(model, [x])
        inserted, _ = bngraph.insert(model, [x])
        assert bngraph.export(model, [x], tmp_path / "m.onnx")
    finally:
        torch.set_default_device(None)
    assert torch.allclose(folded(x), model(x), atol=1e-5) and inserted(x).shape == (2, 4)


def test_calls_from_threads_each_get_their_own_answer():
    # torch.fx's tracer patches nn.Module.__call__ for the whole process while it traces: folds
    # from four threads failed as "the model failed on its example input".
    import concurrent.futures

    models = [_net() for _ in range(4)]
    for model in models:
        model[1].running_mean.normal_()
    x = torch.randn(2, 3, 8, 8)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        folded = list(pool.map(lambda m: bngraph.fold(m, [x])[0], models * 2))
    for model, result in zip(models * 2, folded):
        assert torch.allclose(result(x), model(x), atol=1e-5)


class _CountsItsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


def test_export_leaves_a_buffer_the_forward_writes_as_it_was(tmp_path):
    # export's own runs of the model (trace, checks) moved the user's counter to 5, to 6 with class names.
    model = _CountsItsCalls()
    model.bngraph_classes = ("a", "b", "c")
    assert bngraph.export(model, [torch.rand(2, 4)], tmp_path / "m.onnx") is not None
    assert int(model.calls) == 0
