"""TensorBoard event files beside ``metrics.jsonl``, when the optional tensorboard package is installed."""

from __future__ import annotations

from pathlib import Path


def open_board(run_dir: Path, step: int):  # noqa: ANN202
    """A SummaryWriter into run_dir/tensorboard when the tensorboard package is installed, else None;
    on resume, events logged after ``step`` by the interrupted run are purged."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl always has everything
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)


def board_write(board, prefix: str, row: dict[str, float], step: int) -> None:  # noqa: ANN001
    if board is None:
        return
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
            board.add_scalar(f"{prefix}/{key}", value, step)
