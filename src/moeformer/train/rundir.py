"""Run directories: one owner at a time, no silent reuse, a metrics log that matches the checkpoints.

- :class:`RunLock`: a run directory is locked while a run owns it. The lock file ``.lock`` names the
  pid and host; the lock itself is an ``flock`` on that file, which the kernel releases when the
  process dies however it dies (SIGKILL, OOM killer), so a stale lock is recognised for certain on
  this host and taken over with a message.
- :func:`claim_run_dir`: a new run in a directory that already holds one is refused, naming
  ``--resume`` (continue it) and ``--force`` (start afresh, replacing it); ``--force`` replaces only
  a directory that looks like a run (``publish.is_replaceable``), never a user's own folder.
- :func:`trim_metrics`: on resume, the rows of ``metrics.jsonl`` past the resumed step (written
  after that checkpoint, before the run stopped) are dropped, so that no step appears twice.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from moeformer.publish import discard_dir, is_replaceable, write_text

LOCK = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid in the lock file is all there is
    fcntl = None


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked; the message says what to do instead."""


class RunLock:
    """Exclusive ownership of ``run_dir`` for one process (rank 0 of a distributed run)."""

    def __init__(self, run_dir: Path, *, echo: Callable[[str], None] | None = None) -> None:
        self.run_dir, self.path, self.echo = Path(run_dir), Path(run_dir) / LOCK, echo or (lambda _: None)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            previous = _read_owner(fd)
            if not _try_flock(fd):
                os.close(fd)
                raise RunDirError(f"{self.run_dir} is in use by {_describe(previous)}; wait for it to finish, "
                                  "stop it, or choose another --out")  # fmt: skip
            try:  # the file may have been unlinked by its releasing owner after we opened it
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if previous and fcntl is None and _alive(previous):
            os.close(fd)
            raise RunDirError(f"{self.run_dir} is in use by {_describe(previous)}; delete {self.path} if it is not")
        if previous:
            self.echo(f"note: took over the lock of {self.run_dir} left by {_describe(previous)}, which is gone")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: no one can lock the old inode after
        finally:
            os.close(self._fd)
            self._fd = None


def _try_flock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_owner(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell: assume it runs
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('started', '?')})"


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` has anything in it besides a lock file."""
    return run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir())


def claim_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Check that a run may start in ``run_dir`` (called with the lock held); clear it for ``force``."""
    if resume:
        if force:
            raise RunDirError("--resume continues a run and --force replaces it: give one of them")
        return
    if not holds_run(run_dir):
        return
    if not force:
        raise RunDirError(
            f"{run_dir} already holds a run; continue it with `moeformer train --resume {run_dir}`, "
            f"or start afresh with --force (deletes its checkpoints and metrics), or choose another --out"
        )
    if not is_replaceable(run_dir):
        raise RunDirError(
            f"{run_dir} is not empty and does not look like a run directory (no run.json, metrics.jsonl, "
            "checkpoints or latest/best); --force only replaces runs. Choose another --out"
        )
    # The pointers go first: killed half-way, what is left is a run with nothing to resume
    # (refused by --resume, replaced by the next --force), never one pointing into deleted files.
    entries = sorted(run_dir.iterdir(), key=lambda p: p.name not in ("latest", "best"))
    for entry in entries:
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            discard_dir(entry)
        else:
            entry.unlink()


def trim_metrics(path: Path, step: int) -> int:
    """Drop rows past ``step`` (and torn lines) from a metrics log; returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if int(row.get("step", 0)) > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write, so that a killed process never leaves half a row."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
    finally:
        os.close(fd)
