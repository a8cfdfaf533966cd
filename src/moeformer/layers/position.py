"""Positional information (paper section 3.5; article 1.1.2).

Attention is blind to order ("Are you OK ?" and "OK ? you are" give the same set of vectors), so
each position gets a signal:

- sinusoidal (the paper's formula, added to the embeddings):
      PE[pos, 2i]   = sin(pos / 10000^(2i / d_model))
      PE[pos, 2i+1] = cos(pos / 10000^(2i / d_model))
- learned: one trained vector per position, added to the embeddings (GPT-2, BERT);
- rotary (RoPE, Su et al. 2021): queries and keys are rotated by a position-dependent angle, so
  their dot product depends only on the distance between positions. Pairs are formed between
  the two halves of each head (the "rotate half" layout of GPT-NeoX and Llama), which keeps
  weights interchangeable with Hugging Face checkpoints.

Positions are passed explicitly as ``(batch, seq)`` integer tensors, so left-padded batches and
incremental decoding (positions continue after the cache) use the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from moeformer.validation import ConfigError, check_field_types


def sinusoidal_table(n_positions: int, d_model: int) -> Tensor:
    """The paper's table, (n_positions, d_model) float32, computed in float64 for exactness."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, two_i / d_model)  # (n_positions, ceil(d/2))
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # odd d_model: one fewer cosine column
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """positions: (batch, seq) -> (batch, seq, d_model), read from a fixed (non-trained) table."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        # Not persistent: it is a function of the config, so checkpoints need not carry it.
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]


class LearnedPositionalEmbedding(nn.Module):
    """positions: (batch, seq) -> (batch, seq, d_model), one trained vector per position."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: Tensor) -> Tensor:
        return self.weight[positions]


@dataclass(kw_only=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling for long contexts (transformers' ``rope_type = "llama3"``).

    With L = ``original_max_seq_len`` and r_i = L / wavelength_i (how many turns of frequency i
    fit in the original context): r_i < ``low_freq_factor`` -> theta_i / ``factor`` (stretched);
    r_i > ``high_freq_factor`` -> theta_i (kept); in between, a linear blend of the two in r_i.
    """

    kind: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("high_freq_factor", f"must exceed low_freq_factor ({self.low_freq_factor})")

    def apply(self, inv_freq: Tensor) -> Tensor:
        turns = self.original_max_seq_len * inv_freq / (2 * math.pi)  # r_i = L / wavelength_i
        blend = ((turns - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)).clamp(0, 1)
        return (1 - blend) * inv_freq / self.factor + blend * inv_freq


class RotaryEmbedding(nn.Module):
    """positions: (batch, seq) -> (cos, sin), each (batch, seq, head_dim) in float32.

    Frequencies theta_i = base^(-2i / head_dim) for i < head_dim / 2, repeated for both halves;
    ``scaling`` rescales them for contexts beyond the trained one (:class:`RopeScaling`).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        if scaling is not None:
            inv_freq = scaling.apply(inv_freq)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions.float()[..., None] * self.inv_freq  # (B, T, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, head_dim)
        return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x: (batch, heads, seq, head_dim) by angles cos/sin: (batch, seq, head_dim)."""
    cos = cos[:, None].to(x.dtype)
    sin = sin[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin
