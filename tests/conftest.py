import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
# tiny networks: one intra-op thread is fastest and avoids oversubscription when tests run
# subprocesses (measured: 2 threads on a loaded 2-core machine are up to 10x slower)
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
