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
    """RoPE frequency scaling for contexts beyond the trained one; the fields of transformers'
    ``rope_parameters``, so checkpoints map one to one. With L = ``original_max_seq_len``:

    - ``llama3`` (Llama 3.1): r_i = L / wavelength_i turns of frequency i fit in the original
      context; r_i < ``low_freq_factor`` -> theta_i / ``factor``, r_i > ``high_freq_factor`` ->
      theta_i, a linear blend in r_i between.
    - ``yarn`` (Peng et al. 2023, arXiv 2309.00071; DeepSeek-V2/V3): dimensions that turn more than
      ``beta_fast`` times in L keep theta_i, fewer than ``beta_slow`` times get theta_i / ``factor``,
      a linear ramp over the dimensions between; cos and sin are multiplied by the attention
      factor 0.1 ln(factor) + 1 (or mscale / mscale_all_dim's ratio of that form, or
      ``attention_factor``), and DeepSeek's MLA also multiplies its softmax scale by
      (0.1 ``mscale_all_dim`` ln(factor) + 1)^2.
    """

    kind: Literal["llama3", "yarn"] = "llama3"
    factor: float = 8.0
    original_max_seq_len: int = 8192
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 0.0  # yarn; 0: unset
    mscale_all_dim: float = 0.0  # yarn; 0: unset
    attention_factor: float | None = None  # yarn; None: from factor and mscale
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("high_freq_factor", f"must exceed low_freq_factor ({self.low_freq_factor})")

    def inverse_frequencies(self, head_dim: int, base: float) -> Tensor:
        """theta_i for i < head_dim / 2, float64."""
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        if self.kind == "llama3":
            turns = self.original_max_seq_len * inv_freq / (2 * math.pi)
            blend = ((turns - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)).clamp(0, 1)
            return (1 - blend) * inv_freq / self.factor + blend * inv_freq
        return self._yarn(inv_freq, head_dim, base)

    def _yarn(self, inv_freq: Tensor, head_dim: int, base: float) -> Tensor:
        def dim_turning(turns: float) -> float:  # the dimension whose frequency turns this often in L
            return head_dim * math.log(self.original_max_seq_len / (turns * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_turning(self.beta_fast), dim_turning(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        high = high + 0.001 if high == low else high
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        return inv_freq / self.factor * ramp + inv_freq * (1 - ramp)

    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by (yarn's attention factor; 1 for llama3)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor, 1.0)

    def softmax_scale_factor(self) -> float:
        """DeepSeek MLA's extra factor on 1 / sqrt(head size): yarn's mscale_all_dim term, squared."""
        return _yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """positions: (batch, seq) -> (cos, sin), each (batch, seq, head_dim) in float32.

    Frequencies theta_i = base^(-2i / head_dim) for i < head_dim / 2, repeated for both halves;
    ``scaling`` rescales them for contexts beyond the trained one (:class:`RopeScaling`).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if scaling is None:
            inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        else:
            inv_freq = scaling.inverse_frequencies(head_dim, base)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scale = 1.0 if scaling is None else scaling.cos_sin_scale()

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions.float()[..., None] * self.inv_freq  # (B, T, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, head_dim)
        if self.scale != 1.0:
            return angles.cos() * self.scale, angles.sin() * self.scale
        return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x: (batch, heads, seq, head_dim) by angles cos/sin: (batch, seq, head_dim), or
    (batch, 1, seq, head_dim) already broadcast over heads (as the models pass them, once per step
    instead of once per layer)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin
