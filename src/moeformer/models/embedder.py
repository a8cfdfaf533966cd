"""The model's input stage (article 1.1.1-1.1.2): token embeddings plus positional information.

Sinusoidal and learned positions are added to the (scaled) embeddings, then dropout (paper 5.4);
RoPE adds nothing here and instead returns the (cos, sin) that attention rotates queries and
keys by.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeformer.layers.embedding import TokenEmbedding
from moeformer.layers.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)
from moeformer.model_config import ModelConfig


def rotary_embedding(config: ModelConfig) -> RotaryEmbedding:
    """The RoPE tables ``config`` asks for: head (or MLA rope) width, base, scaling."""
    a = config.attention
    return RotaryEmbedding(config.rotary_dim, a.rope_theta, a.rope_scaling)


class InputEmbedding(nn.Module):
    """ids, positions: (B, T) -> x: (B, T, D) and RoPE angles (or None)."""

    def __init__(self, config: ModelConfig, embed: TokenEmbedding) -> None:
        super().__init__()
        self.embed = embed
        self.dropout = nn.Dropout(config.dropout)
        self.position_kind = config.position
        if config.position == "sinusoidal":
            self.positions = SinusoidalPositionalEncoding(config.max_seq_len, config.d_model)
        elif config.position == "learned":
            self.positions = LearnedPositionalEmbedding(config.max_seq_len, config.d_model)
        elif config.position == "rope":
            self.rotary = rotary_embedding(config)

    def forward(self, ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """-> x (B, T, D) and, for RoPE, (cos, sin) each (B, 1, T, head_dim): shaped (and cast to the
        embeddings' dtype) here, once per forward, rather than in every layer."""
        x = self.embed(ids)
        if self.position_kind in ("sinusoidal", "learned"):
            x = x + self.positions(positions).to(x.dtype)
        if self.training:
            x = self.dropout(x)
        return x, self.angles(positions, x.dtype)

    def angles(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """RoPE's (cos, sin), each (B, 1, T, rotary_dim), at ``positions`` (B, T); None without RoPE."""
        if self.position_kind != "rope":
            return None
        cos, sin = self.rotary(positions)
        return cos[:, None].to(dtype), sin[:, None].to(dtype)
