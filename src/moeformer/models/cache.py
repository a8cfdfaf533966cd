"""Incremental decoding state of a whole decoder stack, and the positions it implies.

Generation feeds only the new tokens at each step; each layer's keys/values and the padding of
every past token live here, so masks and positions continue where the last call stopped.
Positions count real (non-padding) tokens, so a left-padded prompt gets the same positions,
and the same outputs, as the unpadded one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeformer.models.blocks import LayerCache


@dataclass
class DecoderCache:
    layers: list[LayerCache]
    padding_mask: Tensor | None = None  # (B, S_past) bool, True at padding
    next_position: Tensor | None = None  # (B,) position of each row's next real token
    length: int = 0  # S_past: tokens already fed, padding included
    extras: dict[str, Tensor] = field(default_factory=dict)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search), in place."""
        for layer in self.layers:
            layer.self_attn.reorder(index)
            if layer.cross_attn is not None:
                layer.cross_attn.reorder(index)
        if self.padding_mask is not None:
            self.padding_mask = self.padding_mask.index_select(0, index)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, index)


def step_positions(
    padding_mask: Tensor | None, cache: DecoderCache | None, batch: int, seq: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Positions (B, T) of the new tokens and the key padding mask (B, S_past + T) or None.

    Updates ``cache`` (its padding, next positions and length) when one is given.
    """
    if padding_mask is None:
        real = torch.ones(batch, seq, dtype=torch.long, device=device)
    else:
        real = (~padding_mask).long()
    start = torch.zeros(batch, dtype=torch.long, device=device)
    past_padding = None
    if cache is not None and cache.length:
        start = cache.next_position
        past_padding = cache.padding_mask
    positions = (start[:, None] + real.cumsum(1) - 1).clamp_min(0)
    keys_padding = _concat_padding(past_padding, padding_mask, batch, cache.length if cache else 0, seq, device)
    if cache is not None:
        cache.next_position = start + real.sum(1)
        cache.padding_mask = keys_padding
        cache.length += seq
    return positions, keys_padding


def _concat_padding(
    past: Tensor | None, new: Tensor | None, batch: int, past_len: int, seq: int, device: torch.device
) -> Tensor | None:
    if past is None and new is None:
        return None
    if past is None:
        past = torch.zeros(batch, past_len, dtype=torch.bool, device=device)
    if new is None:
        new = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    return torch.cat([past, new], dim=1)
