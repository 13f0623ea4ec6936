"""The output rule of every `-o` (bngraph/atomic.py): nothing bngraph did not write is replaced.

For each command with -o: a user's file and a user's folder at the output path survive byte for
byte (exit 2, one line); `--force` replaces a bngraph output of the same kind and nothing else;
missing parents are created; `.`, `..` and paths in or around the input are refused; a full disk
and Ctrl-C leave no temporary file and the old output as it was.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
import torch

import bngraph
from bngraph import atomic
from bngraph.atomic import ARTIFACT, ONNX, ONNX_MARK, PICTURE, RUN, output_kind, write_atomically, write_dir_atomically
from bngraph.cli import main
from bngraph.errors import UserError
from tests.mnist_like import write_learnable
from tests.onnx_models import conv_bn_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What the commands read, in a folder of its own: an artifact with BNs, an ONNX file, data."""
    root = tmp_path_factory.mktemp("inputs")
    assert main(["insert", "zoo:mnist-mlp", "-o", str(root / "bn")]) == 0
    onnx.save(conv_bn_file(), root / "bn.onnx")
    write_learnable(root / "mnist", n_train=200, n_test=60)
    return root


# Each command with -o: its arguments before -o, and the name its output gets here.
COMMANDS = {
    "insert": (["insert", "zoo:mnist-mlp"], "out"),
    "fold": (["fold", "{in}/bn"], "out"),
    "fold-onnx": (["fold", "{in}/bn.onnx"], "out.onnx"),
    "export": (["export", "{in}/bn"], "out.onnx"),
    "recalibrate": (["recalibrate", "{in}/bn", "--data", "{in}/mnist", "--batches", "2", "--batch-size", "10"], "out"),
    "train": (["train", "zoo:mnist-mlp", "--data", "{in}/mnist", "--steps", "2", "--eval-every", "1", "--quiet"], "out"),
    "reproduce": (["reproduce", "mnist", "--data", "{in}/mnist", "--steps", "2", "--eval-every", "1",
                   "--batch-size", "10", "--workers", "1", "--quiet"], "out"),
    "graph": (["graph", "zoo:mnist-mlp"], "out.svg"),
}


def _argv(name: str, inputs: Path, out: Path, *extra: str) -> list[str]:
    before, _ = COMMANDS[name]
    return [a.replace("{in}", str(inputs)) for a in before] + ["-o", str(out), *extra]


def _run(capsys, argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bngraph: error: "), err
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder): what must not change."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _users_file(path: Path) -> None:
    path.write_bytes(b"the user's notes\n")


def _users_folder(path: Path) -> None:
    (path / "sub").mkdir(parents=True)
    (path / "thesis.tex").write_text("\\section{results}\n")
    (path / "sub" / "data.csv").write_text("1,2,3\n")
    (path / "bngraph.json").write_text('{"format": "something-else"}\n')  # not ours, though named so


@pytest.mark.parametrize("what", ["file", "folder"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_users_file_or_folder_at_the_output_survives(name, what, tmp_path, capsys, inputs):
    out = tmp_path / COMMANDS[name][1]
    (_users_file if what == "file" else _users_folder)(out)
    before = snapshot(tmp_path)
    for extra in ((), ("--force",)):
        code, _, err = _run(capsys, _argv(name, inputs, out, *extra))
        assert code == 2, err
        _one_error_line(err)
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["insert", "fold-onnx", "export", "recalibrate", "train", "reproduce", "graph"])
def test_force_replaces_a_bngraph_output_of_the_same_kind(name, tmp_path, capsys, inputs):
    out = tmp_path / COMMANDS[name][1]
    assert _run(capsys, _argv(name, inputs, out))[0] == 0
    kind = output_kind(out)
    assert kind is not None
    code, _, err = _run(capsys, _argv(name, inputs, out))
    assert code == 2 and "--force" in _one_error_line(err)
    code, _, err = _run(capsys, _argv(name, inputs, out, "--force"))
    assert code == 0, err
    assert output_kind(out) == kind
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary or old copy left


@pytest.mark.parametrize("name", ["insert", "fold-onnx", "export", "train"])
def test_force_keeps_the_permissions_of_what_it_replaces(name, tmp_path, capsys, inputs):
    # The user made the output private; --force brought it back at the umask's mode, world-readable.
    out = tmp_path / COMMANDS[name][1]
    assert _run(capsys, _argv(name, inputs, out))[0] == 0
    inside = sorted(p.name for p in out.iterdir() if p.is_file()) if out.is_dir() else []
    out.chmod(0o700 if out.is_dir() else 0o600)
    for file_name in inside:
        (out / file_name).chmod(0o600)
    assert _run(capsys, _argv(name, inputs, out, "--force"))[0] == 0
    assert out.stat().st_mode & 0o777 == (0o700 if out.is_dir() else 0o600)
    assert {n: (out / n).stat().st_mode & 0o777 for n in inside if (out / n).exists()} == \
        {n: 0o600 for n in inside if (out / n).exists()}


@pytest.mark.parametrize("name", ["insert", "export"])
def test_force_refuses_before_the_work_another_users_output_in_a_sticky_folder(name, tmp_path, capsys, inputs,
                                                                              monkeypatch):
    # In /tmp (sticky), the rename of another user's file failed after all the work: a PermissionError traceback.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    out = shared / COMMANDS[name][1]
    assert _run(capsys, _argv(name, inputs, out))[0] == 0
    before = snapshot(shared)
    monkeypatch.setattr(atomic.os, "geteuid", lambda: os.stat(out).st_uid + 4242)  # someone else now
    code, _, err = _run(capsys, _argv(name, inputs, out, "--force"))
    assert code == 2 and "belongs to another user" in _one_error_line(err)
    assert snapshot(shared) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may delete any file")
def test_force_refuses_a_folder_whose_files_it_cannot_delete(tmp_path, capsys, inputs):
    # The old copy could not be deleted and stayed as a hidden .NAME.PID.old without a word.
    out = tmp_path / "out"
    assert _run(capsys, _argv("insert", inputs, out))[0] == 0
    out.chmod(0o500)
    try:
        code, _, err = _run(capsys, _argv("insert", inputs, out, "--force"))
        assert code == 2 and "cannot be deleted" in _one_error_line(err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    finally:
        out.chmod(0o700)


@pytest.mark.parametrize("name", ["insert", "export", "train"])
def test_force_through_the_outputs_own_name_replaces_it(name, tmp_path, capsys, inputs):
    # `-o art/../art`: built beside by name, the new output was reached through `art` itself,
    # which the swap had moved away; the old output was left hidden and a traceback printed.
    out = tmp_path / COMMANDS[name][1]
    assert _run(capsys, _argv(name, inputs, out))[0] == 0
    through = out.name
    if out.suffix:  # a file has no inside: go through a folder beside it
        through = "sub"
        (tmp_path / through).mkdir()
    around = tmp_path / through / ".." / out.name
    code, _, err = _run(capsys, _argv(name, inputs, around, "--force"))
    assert code == 0, err
    assert output_kind(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name] + (["sub"] if out.suffix else []))


@pytest.mark.parametrize("name", ["fold-onnx", "export"])
def test_an_onnx_file_another_tool_wrote_is_never_replaced(name, tmp_path, capsys, inputs):
    out = tmp_path / COMMANDS[name][1]
    onnx.save(conv_bn_file(), out)  # a valid model, as torch.onnx.export or tf2onnx leave one
    before = snapshot(tmp_path)
    code, _, err = _run(capsys, _argv(name, inputs, out, "--force"))
    assert code == 2 and "is a file bngraph did not write" in _one_error_line(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("name", "inside"), [
    ("insert", "notes.txt"), ("train", "model/eval.csv"), ("reproduce", "paper.tex"),
    # Inside the folders an artifact keeps its carried modules and bytecode in:
    ("insert", "code/helpers.py"), ("insert", "__pycache__/NOTES.txt"), ("train", "model/code/data/table.csv"),
    # Under a name bngraph writes there, but did not write this time (a run without --track-inputs
    # draws no inputs.png, reproduce mnist no accuracy.png): the user's, which --force deleted.
    ("train", "inputs.png"), ("reproduce", "accuracy.png"),
])
def test_a_bngraph_folder_holding_the_users_files_is_not_replaced(name, inside, tmp_path, capsys, inputs):
    out = tmp_path / COMMANDS[name][1]
    assert _run(capsys, _argv(name, inputs, out))[0] == 0
    (out / inside).parent.mkdir(parents=True, exist_ok=True)
    (out / inside).write_text("the user's, put into bngraph's folder\n")
    before = snapshot(tmp_path)
    code, _, err = _run(capsys, _argv(name, inputs, out, "--force"))
    assert code == 2 and f"holds what bngraph did not write ({inside})" in _one_error_line(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("name", "edited"), [
    ("insert", "model.py"), ("train", "model/model.py"),
    # bngraph.json records the digest of its own text: a note the user added is theirs too.
    ("insert", "bngraph.json"), ("train", "bngraph.json"), ("train", "model/bngraph.json"), ("reproduce", "bngraph.json"),
    # What a run or reproduce folder holds is recorded as bngraph writes it: a note appended is the user's.
    ("train", "metrics.jsonl"), ("train", "checkpoint.pt"), ("reproduce", "table.md"),
])
def test_an_artifact_whose_files_the_user_edited_is_not_replaced(name, edited, tmp_path, capsys, inputs):
    # bngraph.json holds the SHA-256 of each file it wrote: an edit makes the file the user's.
    out = tmp_path / COMMANDS[name][1]
    assert _run(capsys, _argv(name, inputs, out))[0] == 0
    if edited.endswith(".json"):
        meta = json.loads((out / edited).read_text())
        (out / edited).write_text(json.dumps({**meta, "note": "the user's"}, indent=2) + "\n")
    else:
        with (out / edited).open("a") as f:
            f.write("# the user's note\n")
    before = snapshot(tmp_path)
    code, _, err = _run(capsys, _argv(name, inputs, out, "--force"))
    assert code == 2 and f"({edited} (changed since bngraph wrote it))" in _one_error_line(err)
    assert snapshot(tmp_path) == before


def test_a_folder_that_only_looks_like_a_run_is_not_replaced(tmp_path, capsys, inputs):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl", "paper_draft.tex"):  # names anyone's training script uses
        (out / name).write_text("the user's\n")
    before = snapshot(tmp_path)
    code, _, err = _run(capsys, _argv("train", inputs, out, "--force"))
    assert code == 2 and "a folder bngraph did not write" in _one_error_line(err)
    assert snapshot(tmp_path) == before


def test_force_does_not_cross_kinds(tmp_path, capsys, inputs):
    run = tmp_path / "run"
    assert _run(capsys, _argv("train", inputs, run))[0] == 0
    before = snapshot(tmp_path)
    code, _, err = _run(capsys, _argv("insert", inputs, run, "--force"))
    assert code == 2 and "a training run folder, not an artifact folder" in _one_error_line(err)
    assert snapshot(tmp_path) == before


def test_graph_replaces_only_a_picture_it_drew(tmp_path, capsys, inputs):
    drawn, foreign = tmp_path / "drawn.svg", tmp_path / "foreign.svg"
    assert _run(capsys, _argv("graph", inputs, drawn))[0] == 0
    assert output_kind(drawn) == PICTURE
    foreign.write_text('<svg xmlns="http://www.w3.org/2000/svg"/>\n')
    code, _, err = _run(capsys, _argv("graph", inputs, foreign, "--force"))
    assert code == 2 and "did not write" in _one_error_line(err)
    assert _run(capsys, _argv("graph", inputs, drawn, "--force"))[0] == 0


def _edit_onnx(path: Path) -> None:
    model = onnx.load(str(path))  # as a user's script does: load, change, save; the producer stays bngraph
    model.doc_string = "threshold tuned by hand"
    onnx.save(model, str(path))


def _edit_text(path: Path) -> None:
    path.write_text(path.read_text().replace("</svg>", "<!-- my annotation --></svg>"))


def _edit_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as picture:
        picture.load()
    picture.save(path)  # re-encoded by the user's viewer: bngraph's comment is gone, the picture is theirs


@pytest.mark.parametrize("name, out_name, edit, said", [
    ("export", "out.onnx", _edit_onnx, "changed since"),
    ("fold-onnx", "out.onnx", _edit_onnx, "changed since"),
    ("graph", "out.svg", _edit_text, "changed since"),
    ("graph", "out.png", _edit_png, "did not write"),
], ids=["export", "fold-onnx", "graph-svg", "graph-png"])
def test_force_keeps_a_file_bngraph_wrote_that_was_changed_since(name, out_name, edit, said, tmp_path, capsys, inputs):
    # A file carries bngraph's mark (the ONNX producer, the picture's comment) through an edit;
    # --force replaced an edited model with no word. Its seal, the digest of what bngraph wrote,
    # no longer holds, and the file is the user's.
    out = tmp_path / out_name
    assert _run(capsys, _argv(name, inputs, out))[0] == 0
    edit(out)
    before = snapshot(tmp_path)
    code, _, err = _run(capsys, _argv(name, inputs, out, "--force"))
    assert code == 2 and said in _one_error_line(err)
    assert snapshot(tmp_path) == before
    if out.suffix == ".onnx":  # what bngraph wrote is a valid model, with the seal among its metadata
        out.unlink()
        assert _run(capsys, _argv(name, inputs, out))[0] == 0
        model = onnx.load(str(out))
        onnx.checker.check_model(model, full_check=True)
        assert [entry.key for entry in model.metadata_props].count("bngraph_sha256") == 1


_MLP_FILE = """
import os
import torch
from torch import nn
{first_line}

class Net(nn.Module):
    example_input_shape = (2, 4)

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))
"""


def test_a_model_file_that_changes_the_working_folder_does_not_move_the_output(tmp_path, capsys, monkeypatch):
    # Research code's first line: the output went into the model's folder (the report said
    # `output: folded`, relative to where the user was), and a relative model path then failed
    # with a traceback (FileNotFoundError).
    (tmp_path / "models").mkdir()
    chdir = "os.chdir(os.path.dirname(os.path.abspath(__file__)))"
    (tmp_path / "models" / "net.py").write_text(_MLP_FILE.format(first_line=chdir))
    monkeypatch.chdir(tmp_path)
    assert _run(capsys, ["fold", "models/net.py:Net", "-o", "folded"])[0] == 0
    assert _run(capsys, ["export", "models/net.py:Net", "-o", "net.onnx"])[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded", "models", "net.onnx"]
    assert {p.name for p in (tmp_path / "models").iterdir()} - {"__pycache__"} == {"net.py"}


@pytest.mark.parametrize("name", ["fold", "export"])
def test_a_forward_that_changes_the_working_folder_is_told_to_take_an_absolute_output(name, tmp_path, capsys,
                                                                                     monkeypatch):
    # The checks run the forward, which moved the working folder: export wrote the relative -o
    # into the folder the forward chose, and fold failed with a traceback reading its model file.
    (tmp_path / "elsewhere").mkdir()
    moves = "HERE = os.path.dirname(os.path.abspath(__file__))\nMOVE = lambda: os.chdir(os.path.join(HERE, 'elsewhere'))"
    source = _MLP_FILE.format(first_line=moves).replace("        return self.b(", "        MOVE()\n        return self.b(")
    (tmp_path / "net.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    out = "out.onnx" if name == "export" else "out"
    code, _, err = _run(capsys, [name, "net.py:Net", "-o", out])
    assert code == 2 and "moved the working folder" in _one_error_line(err) and "give -o as an absolute path" in err
    assert sorted(p.name for p in tmp_path.rglob("*") if "__pycache__" not in p.parts) == ["elsewhere", "net.py"]
    assert _run(capsys, [name, str(tmp_path / "net.py") + ":Net", "-o", str(tmp_path / out)])[0] == 0
    assert (tmp_path / out).exists() and list((tmp_path / "elsewhere").iterdir()) == []


def _chdir_model(tmp_path, then: str = "") -> str:
    """A model file whose training-mode forward moves the working folder to elsewhere/ (and `then`)."""
    moves = "HERE = os.path.dirname(os.path.abspath(__file__))\nMOVE = lambda: os.chdir(os.path.join(HERE, 'elsewhere'))"
    source = _MLP_FILE.format(first_line=moves).replace(
        "        return self.b(", f"        if self.training:\n            MOVE(){then}\n        return self.b(")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "net.py").write_text(source)
    return f"{tmp_path / 'net.py'}:Net"


def test_a_run_whose_forward_changes_the_working_folder_writes_where_it_was_told(tmp_path, capsys, monkeypatch):
    # The whole run trained into runX, then writing runX/model was refused as "nothing was written".
    model = _chdir_model(tmp_path)
    (tmp_path / "data.py").write_text("import torch\nfrom torch.utils.data import TensorDataset\n"
                                      "def make():\n    x = torch.rand(24, 4)\n"
                                      "    return TensorDataset(x[:16], torch.arange(16) % 3), TensorDataset(x[16:], torch.arange(8) % 3)\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, ["train", model, "--data", "data.py:make", "--steps", "2", "--batch-size", "4", "-o",
                                 "runX", "--quiet"])
    assert code == 0, err
    assert (tmp_path / "runX" / "model" / "bngraph.json").is_file() and list((tmp_path / "elsewhere").iterdir()) == []


def test_an_api_run_stopped_in_a_moved_working_folder_cleans_up_its_own(tmp_path, monkeypatch):
    # bngraph.train kept out_dir relative: its clean-up deleted elsewhere/runX's metrics.jsonl and the folder,
    # and a run that went on wrote its checkpoint over elsewhere/runX/checkpoint.pt.
    import bngraph
    from bngraph.load import load_model
    from bngraph.training import TensorData, TrainConfig

    (tmp_path / "deep").mkdir()
    model = load_model(_chdir_model(tmp_path, then="; raise ValueError('bad batch')")).module
    (tmp_path / "elsewhere" / "runX").mkdir()
    user_files = {"metrics.jsonl": b"mine", "checkpoint.pt": b"mine too"}
    for name, data in user_files.items():
        (tmp_path / "elsewhere" / "runX" / name).write_bytes(data)
    data = TensorData(torch.rand(16, 4), torch.arange(16) % 3, torch.rand(8, 4), torch.arange(8) % 3)
    monkeypatch.chdir(tmp_path / "deep")
    with pytest.raises(bngraph.UserError, match="bad batch"):
        bngraph.train(model, data, TrainConfig(steps=2, batch_size=4), out_dir="new/runX", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "elsewhere" / "runX").iterdir()} == user_files
    assert list((tmp_path / "deep").iterdir()) == []  # the run folder, and the parent made for it, removed


def test_an_api_run_stopped_by_its_on_eval_callback_keeps_that_evaluations_checkpoint(tmp_path):
    # The callback ran before the checkpoint: stopped at the first evaluation, the run folder was removed.
    import bngraph
    from bngraph.training import TensorData, TrainConfig, read_metrics

    def stop(row):
        raise RuntimeError("enough")

    data = TensorData(torch.rand(16, 4), torch.arange(16) % 3, torch.rand(8, 4), torch.arange(8) % 3)
    with pytest.raises(RuntimeError, match="enough"):
        bngraph.train(torch.nn.Linear(4, 3), data, TrainConfig(steps=8, batch_size=4, eval_every=2),
                      out_dir=tmp_path / "run", on_eval=stop, progress=False)
    assert [row["step"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [2]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 2


def test_an_output_inside_a_folder_bngraph_wrote_is_refused(tmp_path, capsys):
    # export -o run/x.onnx was written; the run's --resume and --force then refused the run as holding
    # "what bngraph did not write (x.onnx)".
    assert _run(capsys, ["insert", "zoo:mnist-mlp", "-o", tmp_path / "art"])[0] == 0
    assert _run(capsys, ["export", "zoo:mnist-mlp", "-o", tmp_path / "m.onnx"])[0] == 0
    for argv in (["export", "zoo:mnist-mlp", "-o", tmp_path / "art" / "m.onnx"],
                 ["graph", "zoo:mnist-mlp", "-o", tmp_path / "art" / "g.svg"],
                 ["fold", tmp_path / "m.onnx", "-o", tmp_path / "art" / "sub" / "f.onnx"],
                 ["train", "zoo:mnist-mlp", "--data", tmp_path, "-o", tmp_path / "art" / "run"]):
        code, _, err = _run(capsys, argv)
        assert code == 2 and f"would sit inside {tmp_path / 'art'}, bngraph's artifact folder" in _one_error_line(err)
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["bngraph.json", "model.py", "weights.pt"]


@pytest.mark.timeout(120)
def test_a_pipe_named_like_bngraphs_marker_above_the_output_is_not_read(tmp_path, capsys):
    # Every folder above -o is asked whether bngraph wrote it: reading a FIFO bngraph.json blocked for ever.
    os.mkfifo(tmp_path / "bngraph.json")
    assert _run(capsys, ["export", "zoo:mnist-mlp", "-o", tmp_path / "sub" / "m.onnx"])[0] == 0


def test_an_api_run_folder_that_is_a_symbolic_link_is_refused_naming_it(tmp_path):
    # A dangling link raised FileExistsError; a link to a run sent the user from --resume to its absence and back.
    import bngraph
    from bngraph.training import TensorData, TrainConfig

    data = TensorData(torch.rand(16, 4), torch.arange(16) % 3, torch.rand(8, 4), torch.arange(8) % 3)
    (tmp_path / "run").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "to-run").symlink_to(tmp_path / "run")
    for link, resume in (("dangling", False), ("to-run", False), ("to-run", True)):
        with pytest.raises(bngraph.UserError, match=f"{tmp_path / link} is a symbolic link: give the run folder itself"):
            bngraph.train(torch.nn.Linear(4, 3), data, TrainConfig(steps=2, batch_size=4), out_dir=tmp_path / link,
                          resume=resume, progress=False)
    # An empty folder given as out_dir kept bngraph.json after a failed start: a run folder no run filled.
    (tmp_path / "empty").mkdir()
    with pytest.raises(bngraph.UserError):
        bngraph.train(torch.nn.Linear(4, 3), str(tmp_path / "none.npz"), TrainConfig(steps=2, batch_size=4),
                      out_dir=tmp_path / "empty", progress=False)
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "empty").rmdir()
    # newA/../newB/run: the newA that Path kept (absolute() does not fold ..) was left behind.
    with pytest.raises(bngraph.UserError):
        bngraph.train(torch.nn.Linear(4, 3), str(tmp_path / "none.npz"), TrainConfig(steps=2, batch_size=4),
                      out_dir=tmp_path / "newA" / ".." / "newB" / "run", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "run", "to-run"]


def test_bngraphs_folders_are_told_by_their_marker_whatever_its_size_and_wherever_planted(tmp_path, capsys):
    # 21,841 class names make a 1.7 MB bngraph.json: the 1 MiB cap took the artifact for a user's folder.
    model = torch.nn.Linear(4, 3)
    model.bngraph_classes = tuple(f"synset {i:05d} with a long name" for i in range(40_000))
    bngraph.save(model, tmp_path / "art", example_inputs=[torch.rand(2, 4)])
    assert (tmp_path / "art" / "bngraph.json").stat().st_size > 1 << 20 and output_kind(tmp_path / "art") == ARTIFACT
    # A marker in a folder anyone may write into (/tmp) refuses no -o below it.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "bngraph.json").write_text(json.dumps({"format": "bngraph-run"}))
    assert _run(capsys, ["export", "zoo:mnist-mlp", "-o", shared / "sub" / "m.onnx"])[0] == 0


def test_an_api_run_through_a_link_and_dotdot_goes_where_the_system_resolves_it(tmp_path, monkeypatch):
    # abspath folded link/../run as text: the resume continued ./run, not deep/run.
    from bngraph.training import TensorData, TrainConfig

    data = TensorData(torch.rand(16, 4), torch.arange(16) % 3, torch.rand(8, 4), torch.arange(8) % 3)
    (tmp_path / "deep" / "x").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "x")
    monkeypatch.chdir(tmp_path)
    bngraph.train(torch.nn.Linear(4, 3), data, TrainConfig(steps=2, batch_size=4), out_dir="link/../run", progress=False)
    assert (tmp_path / "deep" / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run").exists()


def test_a_folder_name_that_is_not_utf8_is_read_and_written(tmp_path, capsys, monkeypatch):
    # A folder unzipped from an old archive (Latin-1 0xE9): importing its model was a traceback
    # (UnicodeEncodeError), and onnxruntime could not open a file there ("incompatible
    # constructor arguments", blamed on onnxruntime).
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    folder.mkdir()
    (folder / "m.py").write_text(_MLP_FILE.format(first_line=""))
    monkeypatch.chdir(tmp_path)
    spec = f"{folder.name}/m.py:Net"
    assert _run(capsys, ["fold", spec, "-o", f"{folder.name}/folded"])[0] == 0
    code, _, err = _run(capsys, ["export", spec, "-o", f"{folder.name}/m.onnx"])
    assert code == 0, err
    assert (folder / "m.onnx").is_file() and (folder / "folded" / "bngraph.json").is_file()


def test_missing_parents_are_created_as_the_readme_writes_them(tmp_path, capsys, inputs, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder, relative paths
    assert _run(capsys, _argv("train", inputs, Path("runs/x5")))[0] == 0
    assert output_kind("runs/x5") == RUN and output_kind("runs/x5/model") == ARTIFACT
    assert _run(capsys, _argv("reproduce", inputs, Path("repro/mnist")))[0] == 0
    assert (tmp_path / "repro" / "mnist" / "fig1.png").is_file()
    assert _run(capsys, ["export", "runs/x5", "-o", "a/b/x5.onnx"])[0] == 0
    assert _run(capsys, ["fold", "runs/x5", "-o", "c/d/x5-folded"])[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c", "repro", "runs"]


def test_a_failed_command_leaves_no_parents_behind(tmp_path, capsys):
    code, _, err = _run(capsys, ["insert", "zoo:no-such-model", "-o", tmp_path / "x" / "y" / "out"])
    assert code == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", [".", ".."])
def test_the_current_folder_and_its_parent_are_refused(target, tmp_path, capsys, inputs, monkeypatch):
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    for name in ("insert", "train", "reproduce"):
        code, _, err = _run(capsys, _argv(name, inputs, Path(target), "--force"))
        assert code == 2 and "the folder you are in" in _one_error_line(err)
    assert list(tmp_path.rglob("*")) == [here]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_empty_output_path_is_called_empty_before_any_work(name, tmp_path, capsys, inputs, monkeypatch):
    # `-o "$OUT"` with OUT unset: called "-o . is the folder you are in", a PyTorch fold did the
    # whole fold first, an ONNX fold named "the output  of an ONNX fold".
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("bngraph.commands.args.load_from_args", lambda *a, **k: pytest.fail("loaded the model"))
    code, _, err = _run(capsys, _argv(name, inputs, ""))
    assert code == 2 and "the output path is empty" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_an_output_in_or_at_the_input_is_refused(tmp_path, capsys, inputs):
    artifact = tmp_path / "bn"
    assert _run(capsys, ["insert", "zoo:mnist-mlp", "-o", artifact])[0] == 0
    assert _run(capsys, ["export", artifact, "-o", tmp_path / "bn.onnx"])[0] == 0
    run = tmp_path / "run"
    assert _run(capsys, _argv("train", inputs, run))[0] == 0
    before = snapshot(tmp_path)
    for argv in (
        ["fold", artifact, "-o", artifact, "--force"],
        ["fold", artifact, "-o", artifact / "folded"],
        ["insert", artifact, "-o", artifact / "model.py"],
        ["recalibrate", artifact, "--data", inputs / "mnist", "-o", artifact, "--force"],
        ["fold", tmp_path / "bn.onnx", "-o", tmp_path / "bn.onnx", "--force"],
        # A run folder reads as its model/: -o beside that, inside the run, was let through.
        ["fold", run, "-o", run / "folded"], ["export", run, "-o", run / "x.onnx"], ["graph", run, "-o", run / "g.svg"],
    ):
        code, _, err = _run(capsys, argv)
        assert code == 2, argv
        _one_error_line(err)
    assert snapshot(tmp_path) == before


def test_an_output_inside_the_data_bngraph_data_names_is_refused(tmp_path, capsys, inputs, monkeypatch):
    # Without --data, $BNGRAPH_DATA is read, and -o inside it was let through.
    monkeypatch.setenv("BNGRAPH_DATA", str(inputs / "mnist"))
    before = snapshot(inputs)
    code, _, err = _run(capsys, ["train", "zoo:mnist-mlp", "--steps", 1, "-o", inputs / "mnist" / "run"])
    assert code == 2 and "inside" in _one_error_line(err)
    assert snapshot(inputs) == before


@pytest.mark.parametrize("argv", [["fold", "zoo:mnist-mlp"], ["insert", "zoo:mnist-mlp"], ["train", "zoo:mnist-mlp"]])
def test_a_folder_is_never_named_like_a_file(argv, tmp_path, capsys):
    code, _, err = _run(capsys, [*argv, "-o", tmp_path / "x.onnx"])
    assert code == 2 and "bngraph export" in _one_error_line(err)
    code, _, err = _run(capsys, ["insert", "zoo:mnist-mlp", "-o", tmp_path / "weights.pt"])
    assert code == 2 and "drop the .pt" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def _limited(max_file_bytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return limit


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A file-size limit makes writes fail as on a full disk (EFBIG, like ENOSPC): the model's
    code fits under 64 KiB, its 400 KB of weights do not."""
    done = subprocess.run([sys.executable, "-m", "bngraph", "insert", "zoo:mnist-mlp", "-o", "new/bn"],
                          capture_output=True, text=True, cwd=tmp_path, preexec_fn=_limited(64 * 1024),
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "File too large (nothing was written)" in _one_error_line(done.stderr)
    assert list(tmp_path.iterdir()) == []  # not even the parent folder made for it


def test_shared_memory_the_workers_cannot_get_is_one_line_and_leaves_no_file(tmp_path, inputs):
    """reproduce shares its data with its worker processes through /dev/shm (64 MB in a default
    container); one that does not fit (here: past a file-size limit) was a traceback, and torch's
    half-made file stayed in /dev/shm."""
    with subprocess.Popen([sys.executable, "-m", "bngraph", "reproduce", "mnist", "--data", str(inputs / "mnist"),
                           "--steps", "4", "--workers", "2", "--quiet", "-o", "rep"], stderr=subprocess.PIPE,
                          text=True, cwd=tmp_path, preexec_fn=_limited(64 * 1024)) as done:
        _, err = done.communicate(timeout=300)
    assert done.returncode == 2, err
    assert "cannot share a tensor with the worker processes through /dev/shm (File too large" in _one_error_line(err)
    assert not list(Path("/dev/shm").glob(f"torch_{done.pid}_*"))  # its name holds the process id
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_a_file_output_keeps_the_old_file(tmp_path):
    old = tmp_path / "model.onnx"
    old.write_bytes(b"\x08\x08" + ONNX_MARK + b" the old model")  # ir_version, then bngraph's producer_name
    atomic.seal(old, ONNX)
    before = snapshot(tmp_path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        with pytest.raises(UserError, match="File too large"):
            write_atomically(old, lambda tmp: tmp.write_bytes(bytes(200_000)), kind=ONNX, force=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert snapshot(tmp_path) == before


def test_a_full_disk_while_a_run_records_its_files_is_one_line(tmp_path):
    # A run rewrites bngraph.json after each checkpoint and evaluation (the files' digests):
    # on a full disk that write, unlike the files', ended in a traceback.
    atomic._write_marker(tmp_path, RUN)
    before = snapshot(tmp_path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, limits[1]))
    try:
        with pytest.raises(UserError, match="bngraph.json: File too large"):
            atomic._record_written(tmp_path, {"checkpoint.pt": "0" * 64})
        assert snapshot(tmp_path) == before  # the description as it was, no temporary beside it
        (tmp_path / "new").mkdir()
        with pytest.raises(UserError, match="bngraph.json: File too large"):
            atomic._write_marker(tmp_path / "new", RUN)  # a new run's first file (the folder's own cleanup removes it)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_while_force_replaces_a_run_keeps_the_old_run(signum, tmp_path, capsys, inputs):
    run = tmp_path / "run"
    assert _run(capsys, _argv("train", inputs, run))[0] == 0
    before = snapshot(tmp_path)
    argv = _argv("train", inputs, run, "--force")
    argv[argv.index("--steps") + 1] = "1000000"
    proc = subprocess.Popen([sys.executable, "-m", "bngraph", *argv], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any((p / "metrics.jsonl").exists() for p in tmp_path.glob(".run.*.partial")), proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum  # 143 for SIGTERM, as a scheduler reads it
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bngraph: interrupted") and str(run) in lines[0]
    assert "--resume" not in lines[0]  # the checkpoint the loop would name went with the new run
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_of_a_new_run_leaves_a_whole_resumable_run(signum, tmp_path, capsys, inputs):
    run = tmp_path / "runs" / "new"
    argv = _argv("train", inputs, run)
    argv[argv.index("--steps") + 1] = "1000000"
    proc = subprocess.Popen([sys.executable, "-m", "bngraph", *argv], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists(), proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "resume with --resume" in lines[0]
    assert output_kind(run) == RUN and (run / "checkpoint.pt").is_file()
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


@pytest.mark.parametrize("name", ["insert", "train"])
def test_ctrl_c_while_the_old_output_is_removed_ends_with_the_new_one_whole(name, tmp_path, capsys, inputs, monkeypatch):
    # The new output was in place, yet the half-deleted old one was left as .out.PID.old and a
    # run's message said "the new run was discarded; out is as it was".
    out = tmp_path / COMMANDS[name][1]
    assert _run(capsys, _argv(name, inputs, out))[0] == 0
    (out / "bngraph.json").touch()  # a mtime to tell the old output's description from the new one's
    old_time = (out / "bngraph.json").stat().st_mtime_ns
    rmtree = atomic.shutil.rmtree

    def ctrl_c_as_the_old_output_is_removed(path, *args, **kwargs):
        if str(path).endswith(".old"):
            os.kill(os.getpid(), signal.SIGINT)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", ctrl_c_as_the_old_output_is_removed)
    code, _, err = _run(capsys, _argv(name, inputs, out, "--force"))
    assert code == 130
    line = err.strip().splitlines()[-1]
    assert line.startswith("bngraph: interrupted") and "written whole" in line and "as it was" not in line
    assert output_kind(out) is not None and (out / "bngraph.json").stat().st_mtime_ns != old_time
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def _write_at_the_barrier(writer: str, out: Path, barrier, outcomes) -> None:
    """One of two processes writing `out` (a forked child): its output built, it waits for the
    other's, and then the two finish together."""
    def write(tmp: Path) -> None:
        if writer == "file":
            tmp.write_bytes(b"\x08\x08" + ONNX_MARK + str(os.getpid()).encode())
        else:
            tmp.joinpath("model.py").write_text(str(os.getpid()))
        barrier.wait()

    try:
        if writer == "file":
            write_atomically(out, write, kind=ONNX)
        else:
            write_dir_atomically(out, write, kind=ARTIFACT)
        outcomes.put("wrote")
    except UserError as err:
        outcomes.put("refused" if "choose another -o" in str(err) else str(err))
    except Exception as err:  # noqa: BLE001 (what this test looks for)
        outcomes.put(repr(err))


@pytest.mark.parametrize("writer", ["file", "folder"])
def test_two_writers_finishing_one_new_output_together_give_one_output_and_one_refusal(writer, tmp_path):
    # Both checked that the name was free, then renamed: the second replaced the first's file
    # without --force, or failed on the first's folder with OSError (a traceback). Two
    # processes finishing together at a barrier meet in that window often, not always.
    context = multiprocessing.get_context("fork")
    for round_ in range(12):
        out = tmp_path / (f"m{round_}.onnx" if writer == "file" else f"a{round_}")
        barrier, outcomes = context.Barrier(2), context.Queue()
        children = [context.Process(target=_write_at_the_barrier, args=(writer, out, barrier, outcomes)) for _ in range(2)]
        for child in children:
            child.start()
        found = sorted(outcomes.get(timeout=60) for _ in children)
        for child in children:
            child.join(timeout=60)
        assert found == ["refused", "wrote"], (round_, found)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("writer", ["file", "folder"])
def test_an_interrupted_write_leaves_the_old_output_and_no_temporary(writer, tmp_path):
    """Ctrl-C in the middle of writing (here: after the first file of the new output)."""
    out = tmp_path / ("model.onnx" if writer == "file" else "artifact")
    if writer == "file":
        out.write_bytes(b"\x08\x08" + ONNX_MARK + b" old onnx bytes")
        atomic.seal(out, ONNX)
    else:
        out.mkdir()
        (out / "bngraph.json").write_text(json.dumps({"format": "bngraph-artifact"}))
    before = snapshot(tmp_path)

    def write(tmp: Path) -> None:
        (tmp / "model.py" if tmp.is_dir() else tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        if writer == "file":
            write_atomically(out, write, kind=ONNX, force=True)
        else:
            write_dir_atomically(out, write, kind=ARTIFACT, force=True)
    assert snapshot(tmp_path) == before


def test_the_installed_entry_point_refuses_too(tmp_path):
    """The same contract through `python -m bngraph`, as a user runs it."""
    _users_folder(tmp_path / "important")
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "bngraph", "insert", "zoo:mnist-mlp", "-o", "important"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert "important is a folder bngraph did not write" in _one_error_line(done.stderr)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("report", [["--json"], []], ids=["json", "table"])
def test_a_reader_that_leaves_early_gets_no_traceback(report, tmp_path):
    # `bngraph ... --json | head -c 100`: the report's writes then fail with EPIPE, which was a
    # BrokenPipeError traceback on stderr. The artifact is written before the report. The table
    # (`| head -3`) is printed by rich, which exits itself there: "the model's code called
    # sys.exit(1) at rich/console.py".
    proc = subprocess.Popen([sys.executable, "-m", "bngraph", "insert", "zoo:mnist-mlp", "-o", "bn", *report],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.close()  # before anything is written: every write fails
    err = proc.stderr.read().decode()
    assert proc.wait() == 128 + signal.SIGPIPE, err
    assert err == ""
    assert bngraph.load(tmp_path / "bn") is not None


def test_json_stdout_holds_the_report_alone_below_python_too(tmp_path):
    # A model file that logs its git revision through a subprocess, and an extension's printf:
    # both wrote to file descriptor 1, before the JSON, and `| jq` failed.
    (tmp_path / "m.py").write_text(_MLP_FILE.format(first_line=textwrap.dedent("""
        import subprocess
        subprocess.run(["echo", "commit abc123"])
        os.write(1, b"[ext] kernels loaded\\n")
    """)))
    done = subprocess.run([sys.executable, "-m", "bngraph", "fold", "m.py:Net", "--json"], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["batchnorms_before"] == 1
    assert "commit abc123" in done.stderr and "[ext] kernels loaded" in done.stderr


def test_an_option_given_twice_is_refused(tmp_path, capsys):
    # `-o first -o second` wrote `second` and said nothing of `first`.
    with pytest.raises(SystemExit) as stop:
        main(["insert", "zoo:mnist-mlp", "-o", str(tmp_path / "first"), "--output", str(tmp_path / "second")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("--output is given twice: give it once")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, says", [
    # The top-level usage came, listing no option of fold's, for an option fold does not know.
    (["fold", "zoo:mnist-mlp", "--stirct"], "bngraph fold: error: unrecognized arguments: --stirct"),
    # A prefix was taken for the option it begins: --stri for --strict, until another option begins so.
    (["fold", "zoo:mnist-mlp", "--stri"], "bngraph fold: error: unrecognized arguments: --stri"),
])
def test_an_unknown_option_is_refused_with_its_commands_usage(capsys, argv, says):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage: bngraph fold ") and err.strip().endswith(says)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_a_killed_worker_ends_the_run_in_one_line_and_leaves_nothing(tmp_path):
    data = tmp_path / "mnist"
    write_learnable(data, n_train=600, n_test=100)
    argv = ["reproduce", "mnist", "--data", str(data), "--steps", "10000000", "--device", "cpu", "-o", "repro", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "bngraph", *argv], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        def worker() -> list[int]:
            return [pid for pid in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]

        _wait_for(lambda: worker(), proc)
        time.sleep(3.0)  # training
        os.kill(worker()[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # The machine's to fix (fewer processes), as a full disk is: one line, exit 2, no traceback.
    assert proc.returncode == 2, err
    assert err.strip().startswith("bngraph: error: a training process was killed by SIGKILL (out of memory?")
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "repro").exists() and not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_a_stop_signal_while_torch_loads_ends_the_command_cleanly(tmp_path):
    # The signal lands inside the initialisation of numpy's C extension, which torch's loads:
    # an import hook sends it as that imports numpy.exceptions. Raised there, its
    # KeyboardInterrupt left the extension half loaded, and the next import of it failed with a
    # traceback ("cannot load module more than once per process"); at other moments it has
    # aborted the process or been swallowed. Held until torch is loaded, it ends the command.
    script = textwrap.dedent("""
        import os, signal, sys

        class SignalWhileNumpyLoads:
            def find_spec(self, name, path=None, target=None):
                if name == "numpy.exceptions":
                    os.kill(os.getpid(), signal.SIGTERM)

        sys.meta_path.insert(0, SignalWhileNumpyLoads())
        from bngraph.cli import main
        sys.exit(main())
    """)
    done = subprocess.run([sys.executable, "-c", script, "insert", "zoo:mnist-mlp", "-o", "bn"], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stderr) == (128 + signal.SIGTERM, "bngraph: interrupted: terminated\n")
    assert not list(tmp_path.iterdir())


def test_a_stop_signal_while_onnxruntime_loads_ends_the_command_cleanly(tmp_path):
    # export imports onnxruntime late, to verify the file. A library asks first whether it is
    # installed (importlib.util.find_spec), which used up the hold on it, and a signal inside its
    # C initialisation (sent from outside, at random, this failed 6 times in 8) failed the import:
    # a traceback ending "ImportError: initialization failed". Here the signal is sent from the
    # import of its extension module, where a signal must find itself held.
    script = textwrap.dedent("""
        import os, signal, sys

        class SignalWhileOnnxruntimeLoads:
            def find_spec(self, name, path=None, target=None):
                if name == "onnxruntime.capi.onnxruntime_pybind11_state":
                    held = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
                    print("held" if held else "not held", file=open(os.environ["HELD_FILE"], "w"))
                    os.kill(os.getpid(), signal.SIGTERM)

        sys.meta_path.insert(0, SignalWhileOnnxruntimeLoads())
        from bngraph.cli import main
        sys.exit(main())
    """)
    work, held = tmp_path / "work", tmp_path / "held.txt"
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", script, "export", "zoo:mnist-mlp", "-o", "m.onnx"], capture_output=True,
                          text=True, cwd=work, env={**os.environ, "PYTHONPATH": str(REPO), "HELD_FILE": str(held)})
    assert held.read_text() == "held\n"
    assert (done.returncode, done.stderr) == (128 + signal.SIGTERM, "bngraph: interrupted: terminated\n")
    assert not list(work.iterdir())


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc: no psutil needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_worker_dying_while_it_fetches_the_shared_data_prints_no_traceback(tmp_path):
    # SIGTERM while a worker unpickles its job: the worker dies in the middle of fetching the
    # shared tensors' file descriptors, and multiprocessing's handle-sharing thread in the command
    # printed a BrokenPipeError traceback beside the one line. Here a socket that hangs up
    # plays the dying worker; an error of the command's own still shows.
    script = textwrap.dedent("""
        import os, socket, time
        import multiprocessing.reduction, multiprocessing.resource_sharer
        from bngraph.reproduce.workers import _quiet_handle_sharer
        _quiet_handle_sharer()
        multiprocessing.reduction.DupFd(os.pipe()[0])  # what sharing a tensor with a spawned worker does
        worker = socket.socket(socket.AF_UNIX)
        worker.connect(multiprocessing.resource_sharer._resource_sharer._address)
        worker.close()
        time.sleep(0.5)
        raise ValueError("the command's own error")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "Error" not in done.stderr.replace("ValueError: the command's own error", ""), done.stderr
    assert done.stderr.strip().endswith("ValueError: the command's own error")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.parametrize("after_s", [0.0, 3.0], ids=["while-starting", "while-training"])
def test_sigterm_ends_reproduce_and_its_workers_and_leaves_nothing(tmp_path, after_s):
    # The worker process starts first; at once, the signal lands while the command imports torch.
    out = tmp_path / "repro"
    data = tmp_path / "mnist"
    write_learnable(data, n_train=600, n_test=100)
    # --device cpu: CPU worker processes (on a GPU every net trains in the one process).
    argv = ["reproduce", "mnist", "--data", str(data), "--steps", "10000000", "--device", "cpu",
            "-o", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "bngraph", *argv], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(_children(proc.pid)) >= 2, proc)  # its worker (and multiprocessing's tracker) run
        workers = _children(proc.pid)
        time.sleep(after_s)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert len(err.strip().splitlines()) == 1 and err.startswith("bngraph: interrupted"), err
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived the command"
    assert not out.exists() and not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_a_run_folder_that_appears_after_the_check_is_left_to_whoever_made_it(tmp_path, monkeypatch):
    # Another process (or the user) makes -o between run_folder's check and its mkdir: the
    # cleanup after the failed mkdir deleted that folder with what was put in it.
    out = tmp_path / "runs" / "run"
    make_parents = atomic._make_parents

    def another_process_makes_it_meanwhile(path):
        made = make_parents(path)
        path.mkdir()
        (path / "theirs.txt").write_text("another process wrote this\n")
        return made

    monkeypatch.setattr(atomic, "_make_parents", another_process_makes_it_meanwhile)
    with pytest.raises(UserError, match="appeared while bngraph was starting the run"), atomic.run_folder(out):
        pass
    assert (out / "theirs.txt").read_text() == "another process wrote this\n"


def test_a_run_killed_while_it_rewrites_its_checkpoint_is_still_all_bngraphs(tmp_path, capsys, inputs, monkeypatch):
    # The checkpoint's new digest is recorded before the rename, beside the old one: killed in
    # between, the folder holds the old checkpoint, which must still count as bngraph's (else
    # --resume and --force would refuse a run that nobody touched).
    run = tmp_path / "run"
    assert _run(capsys, _argv("train", inputs, run))[0] == 0
    replace = os.replace

    def killed_before_the_rename(src, dst):
        if Path(dst).name == "checkpoint.pt":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomically(run / "checkpoint.pt", lambda tmp: tmp.write_bytes(b"a newer checkpoint"), replace_own=True)
    monkeypatch.setattr(atomic.os, "replace", replace)
    assert atomic.foreign_entries(run, RUN) == []
    atomic.write_atomically(run / "checkpoint.pt", lambda tmp: tmp.write_bytes(b"a newer checkpoint"), replace_own=True)
    assert atomic.foreign_entries(run, RUN) == []
    (run / "checkpoint.pt").write_bytes(b"the user's")
    assert atomic.foreign_entries(run, RUN) == ["checkpoint.pt (changed since bngraph wrote it)"]


def test_a_new_run_that_may_not_replace_the_old_one_once_trained_is_kept_beside_it(tmp_path, capsys, inputs,
                                                                                   monkeypatch):
    # A note put into the old run while the new one trained: the swap refused, rightly, and
    # deleted the finished new run with its temporaries, saying nothing of it.
    run = tmp_path / "run"
    assert _run(capsys, _argv("train", inputs, run))[0] == 0
    swap_in = atomic._swap_in

    def a_note_lands_in_the_old_run_meanwhile(built, path, kind, force):
        if kind == RUN:
            (path / "notes.txt").write_text("the user's\n")
        return swap_in(built, path, kind, force)

    monkeypatch.setattr(atomic, "_swap_in", a_note_lands_in_the_old_run_meanwhile)
    before = snapshot(run)
    code, _, err = _run(capsys, _argv("train", inputs, run, "--force"))
    kept = tmp_path / "run.new"
    assert code == 2 and f"the finished new run is kept in {kept}" in _one_error_line(err)
    assert snapshot(run) == {**before, "notes.txt": b"the user's\n"}
    assert output_kind(kept) == RUN and (kept / "checkpoint.pt").is_file() and atomic.foreign_entries(kept, RUN) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.new"]


def test_a_users_file_in_a_run_killed_before_its_first_checkpoint_is_kept(tmp_path, capsys, inputs):
    # Only bngraph.json is bngraph's there: a checkpoint.pt or metrics.jsonl the user put in is theirs.
    run = tmp_path / "run"
    run.mkdir()
    atomic._write_marker(run, RUN)
    (run / "metrics.jsonl").write_text('{"the user\'s": 1}\n')
    before = snapshot(tmp_path)
    code, _, err = _run(capsys, _argv("train", inputs, run, "--force"))
    assert code == 2 and "holds what bngraph did not write (metrics.jsonl)" in _one_error_line(err)
    assert snapshot(tmp_path) == before


def test_a_run_folder_without_a_checkpoint_is_not_offered_a_resume(tmp_path, capsys, inputs):
    # A run killed before its first checkpoint leaves its folder: "add --resume" led to
    # "nothing to resume".
    run = tmp_path / "run"
    run.mkdir()
    atomic._write_marker(run, RUN)
    code, _, err = _run(capsys, _argv("train", inputs, run))
    assert code == 2 and "--resume" not in _one_error_line(err) and "--force" in err
    # and --resume names --force, not "start without --resume", which is the refusal above
    code, _, err = _run(capsys, _argv("train", inputs, run, "--resume"))
    assert code == 2 and "start it again with --force" in _one_error_line(err)
    assert _run(capsys, _argv("train", inputs, run, "--force"))[0] == 0


def test_a_run_still_going_is_neither_replaced_nor_resumed_by_another_command(tmp_path, capsys, inputs):
    # B's --force swapped A's folder away while A trained on: A then wrote its checkpoints into
    # B's run, which B had reported written.
    run = tmp_path / "run"
    argv = _argv("train", inputs, run)
    argv[argv.index("--steps") + 1] = "1000000"
    proc = subprocess.Popen([sys.executable, "-m", "bngraph", *argv], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / "checkpoint.pt").exists(), proc)
        for extra in ("--force", "--resume"):
            code, _, err = _run(capsys, _argv("train", inputs, run, extra))
            assert code == 2 and "is the folder of a training run still going" in _one_error_line(err)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert proc.returncode == 130 and (run / "checkpoint.pt").exists()
    assert _run(capsys, _argv("train", inputs, run, "--force"))[0] == 0  # once it stopped, as before


def test_the_temporaries_a_killed_run_leaves_are_bngraphs_not_the_users(tmp_path, capsys, inputs):
    # kill -9 while a run rewrites its checkpoint or bngraph.json leaves the temporary beside it:
    # the next --resume took it for the user's file and refused (a flake of the SIGKILL test).
    run = tmp_path / "run"
    assert _run(capsys, _argv("train", inputs, run))[0] == 0
    for name in (".checkpoint.4242.partial.pt", ".bngraph.4242-1.partial.json"):
        (run / name).write_bytes(b"cut short by SIGKILL")
    assert atomic.foreign_entries(run, RUN) == []
    (run / ".notes.4242.partial.txt").write_text("not a name bngraph writes\n")
    assert atomic.foreign_entries(run, RUN) == [".notes.4242.partial.txt"]


def test_a_ctrl_c_while_the_commands_modules_import_is_one_line(monkeypatch, capsys):
    # Before the command's handler: building the parser imports every verb's module (seconds on
    # a cold disk), and a Ctrl-C there printed a traceback.
    import bngraph.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(bngraph.cli, "build_parser", interrupted)
    assert main(["insert", "zoo:mnist-mlp"]) == 130
    assert capsys.readouterr().err == "bngraph: interrupted\n"


def test_a_stop_says_so_where_rank_is_set_outside_torchrun(tmp_path, monkeypatch, capsys):
    # RANK alone (a cluster's shell, a job's worker pod): the stop was taken for a torchrun rank
    # other than 0, which leaves the words to rank 0, and nothing was said.
    monkeypatch.setenv("RANK", "1")
    (tmp_path / "stops.py").write_text("from torch import nn\n\n\nclass Net(nn.Linear):\n"
                                       "    example_input_shape = (2, 4)\n\n    def __init__(self):\n"
                                       "        super().__init__(4, 4)\n\n    def forward(self, x):\n"
                                       "        raise KeyboardInterrupt\n")
    assert main(["insert", f"{tmp_path / 'stops.py'}:Net", "-o", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "bngraph: interrupted\n"
