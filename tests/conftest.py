import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property tests on a fixed set of examples (Hypothesis' derandomize), so that a run is
# judged on the change and not on the random examples it drew; elsewhere every run draws new ones,
# and a failing example is replayed from .hypothesis/ until it passes.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
MODELS_PY = REPO / "tests" / "models.py"
REAL_MNIST = (REPO / ".." / "shared" / "data" / "mnist").resolve()


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two xdist workers on two cores: one thread each keeps them from fighting.
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture(autouse=True, scope="session")
def _temp_files_in_pytests_folder(tmp_path_factory):
    # A failed export keeps its log in the temp folder for the user to read, and the suite fails
    # exports on purpose: their logs go to pytest's own folder, which it prunes, not to /tmp.
    folder = str(tmp_path_factory.mktemp("tempfile"))
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = folder, folder
    yield
    tempfile.tempdir = saved_dir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env
