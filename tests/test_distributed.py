"""bngraph under torchrun: two CPU processes with gloo on loopback, launched the way users do.

Each launch is a real `torchrun` (or `bngraph train --nproc 2`, which execs it) in a subprocess
with a timeout, so a hang fails its test instead of stalling the suite. Runs that several tests
read are module fixtures; five launches in all.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bngraph
from bngraph.cli import main
from bngraph.data import resolve_dataset
from bngraph.training.distributed import PROCESS_GROUP_TIMEOUT_S, without_option
from bngraph.load import load_model
from bngraph.training import EpochSampler, TensorData, read_metrics
from tests.conftest import REPO
from tests.mnist_like import write_learnable

MODELS = REPO / "tests" / "ranked_models.py"
BATCH = 8  # per process
# Well below the process group's timeout: a failed job that ends within it was ended by
# torchrun and gloo noticing the dead peer, not by a collective timing out.
LAUNCH_TIMEOUT_S = 120
assert LAUNCH_TIMEOUT_S < PROCESS_GROUP_TIMEOUT_S
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_args(data, out, *extra, model="SmallConvNet", batch=BATCH) -> list[str]:
    # --device cpu: the CPU processes with gloo that this file is about; on a host with a GPU, auto
    # would pick CUDA, and --nproc 2 needs two GPUs there.
    return ["train", f"{MODELS}:{model}", "--data", str(data), "--batch-size", str(batch), "--lr", "0.1",
            "--decay-every", "4", "--eval-every", "1", "--device", "cpu", "--quiet",
            "-o", str(out), *extra]


def bngraph_cli(*args) -> list[str]:
    return [sys.executable, "-m", "bngraph", *args]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def launch(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run the commands side by side (the hosts of one job); all are killed at the timeout."""
    procs = [subprocess.Popen(c, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in commands]
    try:
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()  # no-op for those that ended; torchrun's workers die with their agent's pipe
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def succeeded(*commands: list[str]) -> None:
    for done in launch(*commands):
        assert done.returncode == 0, done.stderr[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_learnable(tmp_path_factory.mktemp("mnist"), n_train=64, n_test=32)


@pytest.fixture(scope="module")
def one_step(data, tmp_path_factory):
    """One step of two processes, with --sync-bn (through --nproc) and without (plain torchrun)."""
    root = tmp_path_factory.mktemp("one-step")
    succeeded(bngraph_cli(*train_args(data, root / "sync", "--steps", "1", "--sync-bn", "--nproc", "2")))
    plain = train_args(data, root / "local", "--steps", "1")
    succeeded(torchrun("--standalone", "--nproc-per-node=2", "-m", "bngraph", *plain))
    return root


def checkpoint(run) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def bn_statistics(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def one_process_statistics(data_dir, rows: slice) -> dict:
    """BN running statistics after one training forward of one process on `rows` of step 0's
    global batch (the batch of 2 x BATCH that the two ranks split)."""
    tensors = TensorData.from_dataset(resolve_dataset(str(data_dir)))
    batch = EpochSampler(len(tensors.x_train), 2 * BATCH, seed=0)(0)[rows]
    torch.manual_seed(0)  # as `bngraph train --seed 0` does before building the model
    model = load_model(f"{MODELS}:SmallConvNet").module.train()
    with torch.no_grad():
        model(tensors.x_train[batch])
    return bn_statistics(model.state_dict())


def test_sync_bn_statistics_are_the_global_batchs_and_plain_bn_the_ranks_own(one_step, data):
    synced = bn_statistics(checkpoint(one_step / "sync")["model"])
    local = bn_statistics(checkpoint(one_step / "local")["model"])
    global_batch = one_process_statistics(data, slice(None))
    rank0_batch = one_process_statistics(data, slice(0, BATCH))
    assert synced.keys() == local.keys() == global_batch.keys() and len(global_batch) == 4
    fp32_rounding = dict(rtol=1e-5, atol=1e-6)
    for key in global_batch:
        torch.testing.assert_close(synced[key], global_batch[key], **fp32_rounding)
        # Without --sync-bn, each rank's statistics are its own batch's; rank 0's are saved.
        torch.testing.assert_close(local[key], rank0_batch[key], **fp32_rounding)
        assert not torch.allclose(local[key], global_batch[key], **fp32_rounding), key


def test_sync_bn_under_bf16_autocast_gathers_float32_statistics(data, tmp_path):
    # The CPU SyncBatchNorm took bf16 activations under autocast and crashed both ranks in
    # running_mean.lerp_ (140 lines of tracebacks); its sums were bf16 too.
    succeeded(bngraph_cli(*train_args(data, tmp_path / "bf16", "--steps", "1", "--sync-bn", "--nproc", "2",
                                      "--precision", "bf16")))
    synced = bn_statistics(checkpoint(tmp_path / "bf16")["model"])
    global_batch = one_process_statistics(data, slice(None))
    for key in global_batch:
        assert synced[key].dtype == torch.float32
        torch.testing.assert_close(synced[key], global_batch[key], rtol=3e-2, atol=3e-2)  # bf16 activations


def test_a_two_process_run_folds_exports_and_verifies_like_any_other(one_step, tmp_path):
    run = one_step / "sync"
    state = checkpoint(run)
    assert state["world_size"] == 2 and state["sync_bn"] is True
    assert not any(key.startswith("module.") for key in state["model"])
    model = bngraph.load(str(run / "model"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BatchNorm1d", "BatchNorm2d"} <= kinds and not any("Sync" in kind for kind in kinds)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    assert main(["fold", str(run / "model"), "-o", str(tmp_path / "folded"), "--strict"]) == 0
    assert main(["export", str(run / "model"), "-o", str(tmp_path / "model.onnx")]) == 0
    assert main(["verify", str(run / "model"), str(tmp_path / "model.onnx")]) == 0


def test_nproc_does_not_import_the_users_scripts_from_the_working_folder(data, tmp_path):
    # The user's own profile.py beside them: `bngraph train` never imports it, but --nproc ran
    # `python -m torch.distributed.run ... -m bngraph`, whose working folder comes first on
    # sys.path, and torch's import of the standard library's profile ran the user's script in
    # torchrun and in both ranks, which died with a traceback.
    command = Path(sys.executable).with_name("bngraph")  # the installed command, as a user types it
    if not command.is_file():
        pytest.skip("bngraph is not installed as a command in this environment")
    (tmp_path / "profile.py").write_text("open('PROFILE_RAN', 'a').write('ran')\n")
    done = subprocess.run([str(command), *train_args(data, tmp_path / "run", "--steps", "1", "--nproc", "2")],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "PROFILE_RAN").exists()


def test_nproc_json_is_the_report_alone_on_stdout(data, tmp_path):
    # fd 1 pointed at stderr when --nproc exec'd torchrun: the JSON came on stderr, stdout was empty.
    (done,) = launch(bngraph_cli(*train_args(data, tmp_path / "run", "--steps", "1", "--nproc", "2", "--json")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["processes"] == 2


def test_one_rank_raising_ends_the_job_with_its_error(data, tmp_path):
    args = train_args(data, tmp_path / "run", "--steps", "30", "--nproc", "2", model="FailsOnRank1")
    (done,) = launch(bngraph_cli(*args))  # within LAUNCH_TIMEOUT_S, or the test fails
    # Rank 1's one line and its exit code; rank 0, whose all-reduce broke with it, says only that
    # (it printed gloo's traceback, and torchrun logged the failure again).
    assert done.returncode == 2, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("bngraph:")]
    assert "rank 1 fails in its third step" in said[0] and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert said[1:] in ([], ["bngraph: error: rank 0 stopped: another process of the job failed"])
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_job_says_where_it_resumes_in_one_line_and_leaves_no_torchrun_logs(signum, data, tmp_path):
    # torchrun answered the stop with its Python traceback (exit 1), each rank with its own line,
    # and left a torchelastic_* folder of logs in $TMPDIR.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    run = tmp_path / "run"
    job = subprocess.Popen(bngraph_cli(*train_args(data, run, "--steps", "100000", "--nproc", "2")), cwd=REPO,
                           env={**ENV, "TMPDIR": str(temporary)}, text=True, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:  # rank 0 wrote a checkpoint
            time.sleep(0.2)
        job.send_signal(signum)
        _, err = job.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        job.kill()
    assert job.returncode == 128 + signum, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("bngraph:")]
    assert len(said) == 1 and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(rf"bngraph: interrupted: .*resume with --resume from the checkpoint of step \d+ in {re.escape(str(run))}",
                        said[0]), said
    left = [p.name for p in temporary.iterdir() if not p.name.startswith("torchinductor_")]  # torch's own cache
    assert left == []
    succeeded(bngraph_cli(*train_args(data, run, "--steps", str(checkpoint(run)["step"] + 1), "--resume", "--nproc", "2")))


@pytest.mark.parametrize("model", ["EvalOnlyHead", "FirstStepDiffersOnRank1", "HalvesNormalizedApart"])
def test_a_model_with_parameters_unused_in_training_trains_in_two_processes(model, data, tmp_path):
    # EvalOnlyHead: DDP waited for their gradients, and both ranks failed their second step with
    # its traceback. The probe that finds them: the ranks disagreed and the job hung; a model that
    # cannot run on the probe's batch of two failed with a traceback.
    succeeded(bngraph_cli(*train_args(data, tmp_path / "run", "--steps", "3", "--nproc", "2", model=model)))
    assert checkpoint(tmp_path / "run")["step"] == 3


def test_two_torchrun_launches_form_one_job_and_a_resumed_run_matches_it(one_step, data, tmp_path):
    port = free_port()
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]  # two -o folders, as on two machines
    succeeded(*[
        torchrun("--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                 "--rdzv-id=bngraph-test", "--local-addr=127.0.0.1", "-m", "bngraph",
                 *train_args(data, host, "--steps", "4", "--sync-bn"))
        for host in hosts
    ])
    (whole,) = [host for host in hosts if host.exists()]  # rank 0 alone wrote, on its host
    assert checkpoint(whole)["world_size"] == 2

    resumed = tmp_path / "resumed"
    shutil.copytree(one_step / "sync", resumed)  # stopped after step 1 of 4
    succeeded(bngraph_cli(*train_args(data, resumed, "--steps", "4", "--sync-bn", "--resume", "--nproc", "2")))
    a, b = checkpoint(whole), checkpoint(resumed)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    untimed = lambda run: [{k: v for k, v in row.items() if k not in ("steps_per_s", "elapsed_s")}  # noqa: E731
                           for row in read_metrics(run / "metrics.jsonl")]
    assert untimed(resumed) == untimed(whole)


def test_resume_needs_as_many_processes_as_the_run_had(one_step, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(one_step / "sync", run)
    assert main(train_args(data, run, "--steps", "2", "--sync-bn", "--resume")) == 2
    assert "ran as 2 process(es), not 1" in capsys.readouterr().err


def test_a_resume_of_other_settings_under_torchrun_is_one_line(one_step, data, tmp_path):
    # Each rank checks the checkpoint rank 0 sent against the same arguments: both printed it.
    run = tmp_path / "run"
    shutil.copytree(one_step / "sync", run)
    (done,) = launch(bngraph_cli(*train_args(data, run, "--steps", "2", "--resume", "--nproc", "2")))
    assert done.returncode == 2
    assert done.stderr == f"bngraph: error: the run in {run} was trained with --sync-bn; resume it the same way\n"


def test_ranks_take_disjoint_slices_of_the_one_process_batch():
    one = EpochSampler(50, 6, seed=3)
    ranks = [EpochSampler(50, 3, seed=3, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == one.steps_per_epoch == 8
    for step in range(3 * 8):  # three epochs, each reshuffled
        assert torch.equal(torch.cat([rank(step) for rank in ranks]), one(step))
    epoch = [i for rank in ranks for step in range(8) for i in rank(step).tolist()]
    assert len(epoch) == len(set(epoch)) == 48  # once each; the last 2 of 50 make no whole batch


@pytest.mark.parametrize("given", [["--nproc", "2"], ["--nproc=2"], ["--npr", "2"]], ids=" ".join)
def test_nproc_is_left_out_of_what_torchrun_runs(given):
    argv = ["train", "zoo:mnist-mlp", *given, "-o", "run"]
    assert without_option(argv, "--nproc") == ["train", "zoo:mnist-mlp", "-o", "run"]


def test_nproc_under_torchrun_is_refused(monkeypatch, tmp_path, capsys):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "zoo:mnist-mlp", "--nproc", "2", "-o", str(tmp_path / "run")]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


@pytest.mark.parametrize("wrong", ["data", "output", "batch", "resumed-processes", "resumed-nothing"])
def test_what_every_process_would_refuse_is_refused_before_torchrun_in_one_line(wrong, data, tmp_path, one_step):
    # Under torchrun, each rank's one line comes inside torchrun's report of the failed processes
    # (46 lines, a traceback in them, for a global batch larger than the data or a resume with
    # another number of processes).
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    shutil.copytree(one_step / "sync", tmp_path / "ran-as-2")
    given, extra = {"data": ((tmp_path / "missing", tmp_path / "run"), ()),
                    "output": ((data, tmp_path / "mine"), ()),
                    "batch": ((data, tmp_path / "run"), ()),
                    "resumed-processes": ((data, tmp_path / "ran-as-2"), ("--resume", "--sync-bn")),
                    # It said "ran as 1 process(es), not 2" of a folder that does not exist.
                    "resumed-nothing": ((data, tmp_path / "typo"), ("--resume",))}[wrong]
    nproc = "3" if wrong == "resumed-processes" else "2"
    batch = 1000 if wrong == "batch" else BATCH
    (done,) = launch(bngraph_cli(*train_args(*given, "--steps", "1", "--nproc", nproc, *extra, batch=batch)))
    assert done.returncode == 2
    assert done.stderr.startswith("bngraph: error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's" and not (tmp_path / "run").exists()
    if wrong == "resumed-nothing":
        assert "nothing to resume" in done.stderr
