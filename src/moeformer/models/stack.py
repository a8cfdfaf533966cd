"""Running a stack of blocks: each block's output feeds the next; FFN reports gathered by name."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from moeformer.models.cache import DecoderCache
from moeformer.models.outputs import FFNReports


def run_blocks(
    blocks: nn.ModuleList, x: Tensor, prefix: str, reports: FFNReports, cache: DecoderCache | None = None, **kwargs: Any
) -> Tensor:
    """x: (B, T, D) through every block; reports gain "{prefix}.{i}" entries; kwargs go to each block."""
    for i, block in enumerate(blocks):
        if cache is not None:
            kwargs["cache"] = cache.layers[i]
        out = block(x, **kwargs)
        x = out.hidden
        reports.add(f"{prefix}.{i}", out)
    return x
