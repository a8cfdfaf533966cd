"""Run a function in N spawned processes with a deadline: a hung collective fails the test
instead of stalling the suite; a rank that returns with its process group alive fails it too.

Why the second check: a group still alive when a worker's interpreter exits is destroyed by the
last garbage collection inside ``Py_FinalizeEx``, where gloo's destructor joins its threads and
frees their pending work in a half-finalized interpreter. Whether work is still pending then is a
race, so such a worker aborts with SIGABRT only some of the times (issue 13: 5 failures in 9 runs).
Checking right after the function returns turns that race into a failure on every run, with the
rank named.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import time
from collections.abc import Callable

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

LEAK = "rank {rank} returned with its process group alive: destroy it (in a finally) before returning"


def spawn(fn: Callable, args: tuple, nprocs: int = 2, timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, *args)`` for rank 0..nprocs-1; re-raise the first rank's failure here."""
    context = mp.start_processes(
        _checked, args=(fn, *args), nprocs=nprocs, start_method="spawn", join=False
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):  # raises ProcessRaisedException when a rank fails
        if time.monotonic() > deadline:
            alive = [process for process in context.processes if process.is_alive()]
            for process in alive:  # each hung rank's Python stacks to stderr, shown with the failure
                os.kill(process.pid, signal.SIGUSR1)
            time.sleep(2)  # the dumps are written before the kill (not a wait for a race)
            for process in alive:
                process.kill()
            pytest.fail(f"{nprocs} spawned processes did not finish within {timeout_s:.0f} s")


def _checked(rank: int, fn: Callable, *args: object) -> None:
    """``fn(rank, *args)``, then fail if it left a process group behind (destroyed here first, so
    this process still exits cleanly and the failure is the message, not an abort)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # spawn's deadline asks for the stacks
    fn(rank, *args)
    if dist.is_initialized():
        dist.destroy_process_group()
        raise AssertionError(LEAK.format(rank=rank))


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
