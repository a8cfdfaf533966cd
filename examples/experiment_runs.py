"""Running a grid of ``moeformer train`` commands for an experiment: resumable, a few at a time.

Each run gets one thread (two 2-thread processes on a 2-core machine wreck each other's OpenMP
timing), its own log beside the run directory, and is skipped when its ``summary.json`` exists or
resumed from its latest checkpoint when it has one: Ctrl-C an experiment and start it again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]


def train_command(config: Path, run_dir: Path, sets: list[str]) -> list[str]:
    """``moeformer train CONFIG --out RUN --quiet --set ...`` as an argument list."""
    cmd = [sys.executable, "-m", "moeformer", "train", str(config), "--out", str(run_dir), "--quiet"]
    return cmd + [a for s in sets for a in ("--set", s)]


def train_one(run_dir: Path, fresh: list[str]) -> Path:
    """Train (or finish) one run on one thread; ``fresh`` is the command that starts it anew."""
    if (run_dir / "summary.json").exists():
        return run_dir
    if (run_dir / "latest").exists():
        cmd = [sys.executable, "-m", "moeformer", "train", "--resume", str(run_dir), "--quiet"]
    else:
        cmd = fresh + (["--force"] if run_dir.exists() else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    began = time.monotonic()
    with log.open("a") as fh:
        done = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = run_dir.parent / f"{run_dir.name}.seconds"  # summed over resumptions
    wall.write_text(f"{wall_seconds(run_dir) + time.monotonic() - began:.1f}\n")
    if done.returncode != 0:
        raise RuntimeError(f"{run_dir.name} failed (exit {done.returncode}); see {log}")
    return run_dir


def save_figure(fig, path: Path) -> None:  # noqa: ANN001
    """A matplotlib figure as a PNG at ``path``, written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    from moeformer.publish import write_bytes

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def wall_seconds(run_dir: Path) -> float:
    """Seconds :func:`train_one` has spent on this run so far (0 if none recorded)."""
    wall = run_dir.parent / f"{run_dir.name}.seconds"
    return float(wall.read_text()) if wall.exists() else 0.0


def run_all(runs: list[tuple[Path, list[str]]], jobs: int) -> None:
    """Every (run directory, fresh command), ``jobs`` at a time, in the order given."""
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(runs), desc="runs") as bar:
        futures = [pool.submit(train_one, run_dir, cmd) for run_dir, cmd in runs]
        for future in futures:
            future.result()
            bar.update()
