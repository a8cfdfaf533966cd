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

from moeformer.layers.attention import write_in_place
from moeformer.models.blocks import LayerCache


@dataclass
class DecoderCache:
    layers: list[LayerCache]
    padding_mask: Tensor | None = None  # (B, S_past) bool, True at padding; None while nothing is padding
    next_position: Tensor | None = None  # (B,) position of each row's next real token
    length: int = 0  # S_past: tokens already fed, padding included
    extras: dict[str, Tensor] = field(default_factory=dict)
    capacity: int = 0  # > 0: the padding mask is written in place, as the layers' caches (KVCache)
    padding_buffer: Tensor | None = field(default=None, repr=False)  # (B, capacity) storage of padding_mask

    def positions_after(self, padding_mask: Tensor | None, seq: int) -> int:
        """Positions the longest row will have taken once ``seq`` more tokens are fed (padding and
        discarded slots take none): what must fit in the model's ``max_seq_len``."""
        if self.next_position is None:
            return self.length + seq
        new = seq if padding_mask is None else (~padding_mask).sum(1)
        return int((self.next_position + new).max())

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search), in place."""
        for layer in self.layers:
            layer.self_attn.reorder(index)
            if layer.cross_attn is not None:
                layer.cross_attn.reorder(index)
        if self.padding_buffer is not None:
            self.padding_buffer = self.padding_buffer.index_select(0, index)
            self.padding_mask = self.padding_buffer[:, : self.length]
        elif self.padding_mask is not None:
            self.padding_mask = self.padding_mask.index_select(0, index)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, index)

    def forget_last(self, fed: int, keep: Tensor) -> None:
        """Of the last ``fed`` slots, row b keeps its first ``keep[b]`` (B,) and forgets the rest
        (rejected speculative drafts). Slots that no row keeps are cut off the end; the others
        become padding, never attended again. A forgotten real token gives its position back, so
        each row's next token takes the position after its last kept one."""
        fewest, most = (int(k) for k in torch.aminmax(keep.clamp(0, fed)))
        if fewest == fed:
            return
        recorded = self.padding_mask
        if fewest == most and recorded is None:  # every row forgets the same real slots (batch 1)
            self.next_position = self.next_position - (fed - most)
            self._cut(fed - most)
            return
        forgotten = torch.arange(fed, device=keep.device) >= keep[:, None]  # (B, fed)
        real = forgotten if recorded is None else forgotten & ~recorded[:, self.length - fed :]
        self.next_position = self.next_position - real.sum(1)
        self._cut(fed - most)  # cheaper than padding: later steps need no mask for these slots
        rest = real[:, :most]  # forgotten slots that were padding already stay so
        if not bool(rest.any()):
            return
        if self.padding_mask is None:
            self.padding_mask = rest.new_zeros(rest.shape[0], self.length)
            if self.capacity:
                self.padding_buffer = self.padding_mask
        self.padding_mask[:, self.length - most :] |= rest

    def _cut(self, slots: int) -> None:
        """Drop the last ``slots`` positions of every row (their positions already given back)."""
        if not slots:
            return
        self.length -= slots
        for layer in self.layers:
            layer.self_attn.truncate(self.length)
        if self.padding_mask is not None:
            self.padding_mask = self.padding_mask[:, : self.length]


def step_positions(
    padding_mask: Tensor | None, cache: DecoderCache | None, batch: int, seq: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Positions (B, T) of the new tokens and the key padding mask (B, S_past + T) or None.

    Updates ``cache`` (its padding, next positions and length) when one is given.
    """
    past = 0 if cache is None else cache.length
    past_padding = None if cache is None else cache.padding_mask
    if padding_mask is None and past_padding is None:  # nothing padded: positions count every token
        start = cache.next_position[:, None] if past else 0
        positions = (torch.arange(seq, device=device) + start).expand(batch, seq)
        if cache is not None:
            cache.next_position = positions[:, -1] + 1
            cache.length += seq
        return positions, None
    real = torch.ones(batch, seq, dtype=torch.long, device=device) if padding_mask is None else (~padding_mask).long()
    start = cache.next_position if past else torch.zeros(batch, dtype=torch.long, device=device)
    positions = (start[:, None] + real.cumsum(1) - 1).clamp_min(0)
    new = torch.zeros(batch, seq, dtype=torch.bool, device=device) if padding_mask is None else padding_mask
    if cache is None:
        return positions, new
    cache.next_position = start + real.sum(1)
    cache.padding_mask = _append_padding(cache, new)
    cache.length += seq
    return positions, cache.padding_mask


def _append_padding(cache: DecoderCache, new: Tensor) -> Tensor:
    """The cache's padding (B, S_past), False where none was recorded, followed by ``new`` (B, T)."""
    past = cache.padding_mask
    if past is None:  # padding appears for the first time: nothing before it was padding
        past = new.new_zeros(new.shape[0], cache.length)
    if not cache.capacity:
        return torch.cat([past, new], dim=1)
    if cache.padding_buffer is None:
        cache.padding_buffer = past  # its first ``length`` columns are what is recorded so far
    cache.padding_buffer, mask = write_in_place(cache.padding_buffer, new, cache.length, 1, cache.capacity)
    return mask
