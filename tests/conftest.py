"""Shared test fixtures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

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


@pytest.fixture
def encoded_frames(monkeypatch):
    """The uint8 frames each ``VideoWriter`` hands to its encoder, by output file name (``{name: (T, H, W, 3)}``).

    In-process tests compare these, not the mp4 bytes: on the CI machine the same frames encoded twice by
    x264 in one process that also runs torch have decoded differently (one frame, by ~11 levels), so file
    bytes only reproduce across fresh processes (``test_two_cli_runs_and_a_killed_resumed_run_...``).
    """
    import numpy as np

    from egolcd import video_io

    written: dict[str, list] = {}
    encode = video_io.VideoWriter.write

    def record(self, frames, layout="CTHW"):
        written.setdefault(self.path.name, []).append(video_io.to_uint8_frames(frames, layout).copy())
        return encode(self, frames, layout)

    monkeypatch.setattr(video_io.VideoWriter, "write", record)

    class Frames:
        def __getitem__(self, name: str):
            return np.concatenate(written[name])

    return Frames()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def egolcd_processes():
    """``egolcd ARGS`` as the README launches it: one plain process, or ``processes`` gloo processes under
    torchrun (``ACCELERATE_USE_CPU=1``, one thread each). Fails the test, with the end of stderr, on a non-zero
    exit; returns the finished process."""

    def run(processes: int, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        if processes == 1:
            cmd = [sys.executable, "-m", "egolcd", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "egolcd", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run
