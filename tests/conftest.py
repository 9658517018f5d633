"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread_module():
    """Run a module single-threaded: tiny models are faster so, and immune to OpenMP spinning on a busy
    2-core box (restores the previous thread count afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
