"""Run a function in N spawned processes with a deadline: a hung collective fails the test
instead of stalling the suite."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def spawn(fn: Callable, args: tuple, nprocs: int = 2, timeout_s: float = 300.0) -> None:
    context = mp.start_processes(fn, args=args, nprocs=nprocs, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):  # raises ProcessRaisedException when a rank fails
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{nprocs} spawned processes did not finish within {timeout_s:.0f} s")


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
