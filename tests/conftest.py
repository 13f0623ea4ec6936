import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS_PY = REPO / "tests" / "models.py"
REAL_MNIST = (REPO / ".." / "shared" / "data" / "mnist").resolve()


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two xdist workers on two cores: one thread each keeps them from fighting.
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
