"""Writing a run's checkpoints: safetensors weights + JSON sidecar + trainer state, atomically.

The file names, :class:`Checkpoint`, finding and reading one live in :mod:`moeformer.checkpoint_io`
(a low floor that inference, interop and refusal read through); they are re-exported here, so
``moeformer.train.checkpoint`` keeps every name it had. A run directory holds::

    checkpoints/step-00000400/model.safetensors   weights and persistent buffers (MoE balancing
                                                  biases included); tied matrices stored once
    checkpoints/step-00000400/checkpoint.json     config, tokenizer, step, metrics, versions
    checkpoints/step-00000400/trainer.pt          optimiser, schedule, RNG, data position
    latest, best                                  one line: the checkpoint directory they name

Each checkpoint is written into a temporary directory, flushed to disk (files and directory) and
renamed into place (:func:`moeformer.publish.publish_dir`), then the ``latest`` / ``best``
pointers are replaced atomically, so a crash or a power loss leaves either the old or the new
checkpoint, never a broken one, and the pointers name complete checkpoints only. Loading checks
every file and names what is wrong.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from moeformer.checkpoint_io import (
    SIDECAR,
    TRAINER,
    WEIGHTS,
    Checkpoint,
    CheckpointError,
    load_weights,
    paths_overlap,
    pointer_target,
    read_checkpoint,
    resolve,
)
from moeformer.publish import discard_dir, publish_dir, write_text

__all__ = [  # the first eleven re-exported from moeformer.checkpoint_io
    "SIDECAR",
    "TRAINER",
    "WEIGHTS",
    "Checkpoint",
    "CheckpointError",
    "load_weights",
    "paths_overlap",
    "pointer_target",
    "read_checkpoint",
    "resolve",
    "load_trainer_state",
    "remove_partial",
    "save_checkpoint",
    "staging_dir",
]


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where :func:`save_checkpoint` assembles step ``step`` before renaming it."""
    return run_dir / "checkpoints" / f".tmp-step-{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    meta: dict[str, Any],
    trainer_state: dict[str, Any],
    *,
    best: bool = False,
    keep_last: int = 2,
    before_publish: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoints/step-N and point ``latest`` (and ``best`` when asked) at it.

    before_publish: called with the temporary directory once this function's files are in it,
    before it becomes step-N (sharded runs write their DCP shards there from every rank).
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = staging_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    safetensors.torch.save_model(model, str(tmp / WEIGHTS))
    (tmp / SIDECAR).write_text(json.dumps({**meta, "step": step}, ensure_ascii=False, indent=1), encoding="utf-8")
    torch.save(trainer_state, tmp / TRAINER)
    if before_publish is not None:
        before_publish(tmp)
    publish_dir(tmp, final)  # replaces a same-step checkpoint only once the new one is complete
    write_text(run_dir / "latest", f"checkpoints/{final.name}\n")
    if best:
        write_text(run_dir / "best", f"checkpoints/{final.name}\n")
    _prune(run_dir, keep_last)
    return final


def _prune(run_dir: Path, keep_last: int) -> None:
    """Delete old checkpoints, never the ones ``latest`` or ``best`` name."""
    protected = {pointer_target(run_dir, name) for name in ("latest", "best")}
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    for old in steps[: max(len(steps) - keep_last, 0)]:
        if old.resolve() not in protected:
            discard_dir(old)


def remove_partial(run_dir: Path) -> int:
    """Delete staging directories left by a run killed while saving; returns how many."""
    partial = list((run_dir / "checkpoints").glob(".tmp-step-*")) + list((run_dir / "checkpoints").glob(".step-*"))
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return len(partial)


def load_trainer_state(ckpt: Checkpoint) -> dict[str, Any]:
    file = ckpt.path / TRAINER
    if not file.exists():
        raise CheckpointError(f"{ckpt.path}: missing {TRAINER}; it can be used for inference but not resumed")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{file}: unreadable trainer state ({type(err).__name__}: {err})") from None


DCP_DIR = "dcp"  # a sharded run's model and optimizer state, written by torch.distributed.checkpoint


def has_sharded_state(checkpoint_dir: Path) -> bool:
    """Whether the checkpoint was saved by sharded ranks (FSDP, expert parallelism)."""
    return (checkpoint_dir / DCP_DIR / ".metadata").is_file()
