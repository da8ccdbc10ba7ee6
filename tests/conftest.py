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


@pytest.fixture
def restore_logging():
    """The CLI's main() configures logging (handlers, level, captured warnings): put the test
    process's back afterwards."""
    import logging
    import warnings

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with warnings.catch_warnings():
        yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
