"""Shared test settings: deterministic, single-threaded-friendly, and quiet."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may touch the network


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
