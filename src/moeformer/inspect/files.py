"""Atomic output files: each is written beside its destination, then renamed over it.

A reader (a browser refreshing report.html, a notebook loading attention.npz) sees either the
old file or the new one, never half of one, and an interrupted run leaves no truncated file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write itself failed
    return path


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Compressed ``.npz`` of ``arrays``; strings are stored as numpy unicode (no pickle needed)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())


def figure_png(fig: Any, *, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed (pyplot keeps no reference)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()
