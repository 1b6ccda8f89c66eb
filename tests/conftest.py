"""Shared test settings: offline, seeded, one torch thread per test process.

Tiny models gain nothing from a second thread, and with several processes on two cores (pytest plus
the subprocesses some tests start) extra threads only oversubscribe the machine.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may touch the network
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses tests start


@pytest.fixture(autouse=True, scope="session")
def _demo_cache(tmp_path_factory):
    """The built-in demo dataset is written to a temporary cache, never to the user's home."""
    os.environ["RESDIFF_CACHE"] = str(tmp_path_factory.mktemp("resdiff-cache"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
