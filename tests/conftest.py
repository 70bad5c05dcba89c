"""Shared pytest configuration: deterministic, CPU-only, no network."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.manual_seed(0)

# Under pytest-xdist (``-n auto``: one worker per core) each worker gets its share of the cores, so
# the workers' OpenMP threads do not oversubscribe the machine; the CLI tests' child processes inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(min(_THREADS, torch.get_num_threads()))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module's tests on one thread: tiny models are fastest so, and on a loaded 2-core
    machine OpenMP spinning makes two threads up to 40x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
