"""The bytes of the commands' output files: compressed arrays and PNG figures.

The commands publish them as one directory with :func:`moeformer.publish.staged_dir`, so a
reader (a browser refreshing report.html, a notebook loading attention.npz) never sees half of one.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Compressed ``.npz`` of ``arrays``; strings are stored as numpy unicode (no pickle needed)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def figure_png(fig: Any, *, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed (pyplot keeps no reference)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()
