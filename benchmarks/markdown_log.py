"""Where a benchmark's table goes with ``--append FILE``: a dated section naming the command that
made it, so that BENCHMARKS.md records what was run, when, and what it printed."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def append_table(path: str, table: str) -> None:
    """Append ``table`` to ``path`` under "### <date>: `python <this script> <its arguments>`"."""
    command = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"\n### {time.strftime('%Y-%m-%d')}: `{command}`\n\n{table}\n")
