"""Publishing files and directories so that a crash, a Ctrl-C or a full disk never leaves half of one.

Every file and directory this project writes for users goes through here:

- :func:`write_bytes` / :func:`write_text`: a temporary sibling is written, flushed to disk
  (``fsync``), renamed over the destination, and the directory entry itself is fsynced, so that
  after a power loss the path holds either the old content or the new, never a truncated file.
- :func:`staged_dir`: a directory is assembled in a temporary sibling; on success every file in
  it and the directory are fsynced, then it is swapped into place. An old directory of the same
  name is renamed aside first and deleted only once the new one is in place, so there is no
  moment at which neither exists on disk under some name.
- :func:`check_replaceable`: ``--force`` may only replace a directory this project (or
  transformers) wrote, recognised by its files; a user's own folder, ``.``, a parent of the
  working directory or a regular file is refused with a message that says why.

Files get the mode the user's umask gives new files (safetensors writes 0600 by default).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

MARKER = ".moeformer-output"  # written into every staged directory: recognises our own outputs
# Files by which a directory is recognised as a model or run directory that --force may replace.
_MODEL_FILES = ("checkpoint.json", "latest", "best", "run.json", "metrics.jsonl")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class OutputExistsError(FileExistsError):
    """An output path exists and may not be replaced; the message names what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fix_mode(path: Path, *, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the names in it) to disk; a no-op where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (temporary sibling, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fix_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write itself failed
    fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (root included), fixing modes on the way."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath) / name
            _fix_mode(file)
            fsync_file(file)
        _fix_mode(Path(dirpath), directory=True)
        fsync_dir(Path(dirpath))


def is_replaceable(path: Path) -> bool:
    """Whether ``path`` is an empty directory or one this project or transformers wrote."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if not names or MARKER in names or names & set(_MODEL_FILES):
        return True
    return "config.json" in names and bool(names & set(_HF_WEIGHTS))


def check_replaceable(out: str | Path, *, force: bool, option: str = "--force") -> None:
    """Refuse to write ``out`` when it exists, unless ``force`` and it is ours to replace.

    Raised before any long computation, so that nothing is computed for an output that cannot be
    written.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputExistsError(f"{out}: refusing to write over the working directory or one of its parents")
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another output path")
    if not force:
        raise OutputExistsError(f"{out} already exists; choose another output path or pass {option} to replace it")
    if not is_replaceable(out):
        raise OutputExistsError(
            f"{out} exists and does not look like a directory this tool wrote (no {MARKER}, checkpoint "
            f"or transformers model files in it); {option} only replaces those. Remove it yourself or "
            "choose another output path"
        )


@contextlib.contextmanager
def staged_dir(out: str | Path, *, force: bool = False, option: str = "--force") -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; publish it as ``out`` if the block succeeds.

    On an exception (Ctrl-C included) the temporary directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    check_replaceable(out, force=force, option=option)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text("written by moeformer; --force may replace this directory\n", encoding="utf-8")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discard_dir(path: Path) -> None:
    """Delete the directory ``path`` so that it is never seen half-deleted under its own name.

    It is renamed aside (``.NAME.old-PID``, one atomic step) and deleted there: a process killed
    meanwhile leaves that dot-named leftover, which the next run removes, not a ``path`` with
    some of its files gone (a checkpoint that looks present but cannot be loaded).
    """
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def publish_dir(tmp: Path, out: Path) -> None:
    """Make the finished directory ``tmp`` durable and move it to ``out``, replacing an old one.

    The old ``out`` is renamed aside and deleted only after the new one is in place; a crash in
    between leaves it as ``.NAME.old-PID`` beside the new one, never neither.
    """
    fsync_tree(tmp)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
