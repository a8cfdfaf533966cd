"""Scaled dot-product and multi-head attention (paper section 3.2; article sections 1.1.4, 2.2).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V                          (paper eq. 1)
    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,
        head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

Shapes: B batch, T queries, S keys, D model width, H query heads, G key/value heads
(G < H is grouped-query attention: each K/V head serves H / G query heads), Dh head width.

Mask conventions, the same as torch's own functions so that they are easy to remember:
- ``attn_mask`` follows ``F.scaled_dot_product_attention``: boolean True = "may attend", or a
  float tensor added to the scores;
- ``key_padding_mask`` follows ``nn.MultiheadAttention``: (B, S) boolean True = "padding".
A query that may attend to no key at all (e.g. a left-pad position under a causal mask) gets a
zero output rather than NaN, on both backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moeformer.layers.norm import RMSNorm
from moeformer.layers.position import apply_rotary
from moeformer.layers.softmax import stable_softmax

Backend = Literal["sdpa", "reference"]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The paper's equation 1 step by step (article 2.2.1); returns (output, weights).

    query: (..., T, Dk), key: (..., S, Dk), value: (..., S, Dv); ``attn_mask`` broadcastable to
    (..., T, S). ``is_causal`` lets query i see keys j <= i (top-left aligned, exactly as
    ``F.scaled_dot_product_attention``). Output (..., T, Dv), weights (..., T, S).
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale  # 1-2. dot products q_i . k_j, scaled
    if is_causal:
        T, S = scores.shape[-2:]
        future = torch.ones(T, S, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = stable_softmax(scores, dim=-1)  # 3. alpha_ij, each row sums to 1
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ value, weights  # 4. c_i = sum_j alpha_ij v_j


@dataclass
class KVCache:
    """Keys and values of one attention layer for incremental decoding, (B, G, S, Dh) each.

    Self-attention appends the new keys at every step; cross-attention (``static=True``) is
    filled once from the encoder output and then reused, so the source is projected only once.

    With ``capacity`` > 0 (what the decoding functions ask for: prompt + new tokens), keys and
    values are written in place into buffers of that many positions, allocated at the first
    update and doubled if ever outgrown; ``key``/``value`` are views of the filled part. Without
    it each step concatenates, copying the whole cache (O(S) per step: cheap next to the matrix
    products at a few hundred positions on a CPU, BENCHMARKS.md; the compiled decoding step needs
    the fixed buffers). The in-place writes are for inference: under autograd, a later step would
    overwrite what an earlier one saved for backward.
    """

    key: Tensor | None = None
    value: Tensor | None = None
    static: bool = False
    capacity: int = 0
    buffers: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # (key, value) storage, capacity > 0

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    @property
    def elements_per_token(self) -> int:
        """Numbers stored per token of one sequence: 2 * G * Dh (0 while empty)."""
        if self.key is None or self.value is None:
            return 0
        return self.key.shape[1] * self.key.shape[3] + self.value.shape[1] * self.value.shape[3]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.value) if t is not None)

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new (B, G, T, Dh) keys and values; return all (B, G, S, Dh) so far."""
        if self.static or (self.key is None and not self.capacity):
            self.key, self.value = key, value
        elif not self.capacity:
            self.key = torch.cat([self.key, key], dim=-2)
            self.value = torch.cat([self.value, value], dim=-2)
        else:
            self.key, self.value = self._write(key, value)
        return self.key, self.value

    def _write(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        S, old = self.length, self.buffers or (None, None)
        k_buf, key = write_in_place(old[0], key, S, -2, self.capacity)
        v_buf, value = write_in_place(old[1], value, S, -2, self.capacity)
        self.buffers = (k_buf, v_buf)
        return key, value

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (a rejected speculative draft); buffers are kept."""
        if self.key is not None and self.value is not None:
            self.key, self.value = self.key[:, :, :length], self.value[:, :, :length]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search), in place."""
        if self.buffers is not None:
            S = self.length
            self.buffers = (self.buffers[0].index_select(0, index), self.buffers[1].index_select(0, index))
            self.key, self.value = self.buffers[0][:, :, :S], self.buffers[1][:, :, :S]
        elif self.key is not None:
            self.key = self.key.index_select(0, index)
            self.value = self.value.index_select(0, index)


def write_in_place(buffer: Tensor | None, new: Tensor, filled: int, dim: int, capacity: int) -> tuple[Tensor, Tensor]:
    """Write ``new`` at [filled, filled + T) of ``buffer`` along ``dim``; -> (buffer, view of [0, filled + T)).

    A missing or outgrown buffer is replaced by one of max(capacity, 2 x its size, filled + T)
    positions that keeps the first ``filled``: appends cost O(T), not O(S), amortised.
    """
    T = new.shape[dim]
    if buffer is None or filled + T > buffer.shape[dim]:
        size = max(capacity, filled + T, 0 if buffer is None else 2 * buffer.shape[dim])
        shape = list(new.shape)
        shape[dim] = size
        grown = new.new_empty(shape)
        if buffer is not None and filled:
            grown.narrow(dim, 0, filled).copy_(buffer.narrow(dim, 0, filled))
        buffer = grown
    buffer.narrow(dim, filled, T).copy_(new)
    return buffer, buffer.narrow(dim, 0, filled + T)


@dataclass
class AttentionOutput:
    output: Tensor  # (B, T, D)
    weights: Tensor | None = None  # (B, H, T, S) when asked for


def build_attention_mask(
    B: int,
    T: int,
    S: int,
    n_heads: int,
    device: torch.device,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
) -> tuple[Tensor | None, bool]:
    """Merge padding, explicit and causal masks into one (B or 1, H or 1, T, S) mask.

    Returns (mask, causal_fast): when the only constraint is a square causal one, the fused
    kernel's own ``is_causal`` path is used instead of materialising the mask.
    """
    if is_causal and key_padding_mask is None and attn_mask is None and T == S:
        return None, True
    if T == 1:  # one query, the last key (a decoding step): the causal constraint excludes nothing
        is_causal = False
    mask: Tensor | None = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (B, S):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (batch, keys) = ({B}, {S}) "
                f"with True at padding, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        mask = ~key_padding_mask[:, None, None, :]
    if is_causal:
        # Query t is the (S - T + t)-th key: with a cache, the T new tokens come last.
        rows = torch.arange(T, device=device)[:, None] + (S - T)
        causal = rows >= torch.arange(S, device=device)[None, :]
        mask = causal if mask is None else mask & causal
    if attn_mask is not None:
        attn_mask = _check_attn_mask(attn_mask, B, T, S, n_heads)
        if attn_mask.dtype == torch.bool:
            mask = attn_mask if mask is None else mask & attn_mask
        elif mask is not None:
            mask = attn_mask.masked_fill(~mask, float("-inf"))
        else:
            mask = attn_mask
    return mask, False


def _check_attn_mask(attn_mask: Tensor, B: int, T: int, S: int, n_heads: int) -> Tensor:
    allowed = [(T, S), (B, T, S), (B, 1, T, S), (B, n_heads, T, S), (1, 1, T, S)]
    if tuple(attn_mask.shape) not in allowed:
        raise ValueError(
            f"attn_mask has shape {tuple(attn_mask.shape)}; allowed: (queries, keys) = "
            f"({T}, {S}), (batch, queries, keys) or (batch, heads|1, queries, keys)"
        )
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool (True = may attend) or float, got {attn_mask.dtype}")
    return attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: bool,
    need_weights: bool,
    *,
    backend: Backend,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """q: (B, H, T, Dk), k: (B, G, S, Dk), v: (B, G, S, Dv) -> (B, H, T, Dv), weights (B, H, T, S) or None.

    ``mask`` and ``causal`` come from :func:`build_attention_mask`; G divides H (grouped-query).
    Queries whose mask allows no key get a zero output on both backends.
    """
    dead = None
    if mask is not None:
        allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
        dead = ~allowed.any(-1, keepdim=True)  # queries that may attend to nothing
    if need_weights or backend == "reference":
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out, weights = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p, scale=scale
        )
        return out, (weights if need_weights else None)
    if dead is not None:  # let dead rows attend anywhere (no NaN), then zero them below
        mask = mask | dead if mask.dtype == torch.bool else mask.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out, None


class MultiHeadAttention(nn.Module):
    """Multi-head (or grouped-query) attention with q_proj, k_proj, v_proj and out_proj.

    Self-attention: ``mha(x, x, x)``; causal (the decoder's masked) self-attention:
    ``mha(x, x, x, is_causal=True)``; encoder-decoder (cross) attention: ``mha(y, memory, memory)``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        qkv_bias: bool | None = None,
        backend: Backend = "sdpa",
        kv_dim: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        """``qkv_bias`` (default: ``bias``) sets the q/k/v biases apart from out_proj's (Qwen2);
        ``head_dim`` (default d_model / n_heads) may be set apart from d_model (Qwen3); ``qk_norm``
        RMS-normalises each head's query and key (eps ``norm_eps``) before RoPE (Qwen3)."""
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        if backend not in ("sdpa", "reference"):
            raise ValueError(f"backend: unknown {backend!r}; allowed: 'sdpa', 'reference'")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads if head_dim is None else head_dim
        self.dropout, self.backend = dropout, backend
        kv_dim = d_model if kv_dim is None else kv_dim
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=norm_eps)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        need_weights: bool = False,
    ) -> AttentionOutput:
        """query: (B, T, D); key, value: (B, S, kv_dim).

        With a ``cache``, ``key``/``value`` are the new tokens only and the masks cover every key
        (cached + new): ``key_padding_mask`` (B, S_total), ``attn_mask`` (T, S_total) or
        (B, [H,] T, S_total); ``is_causal`` aligns the T queries with the last T keys.
        ``rotary``: (cos, sin) of the new tokens' positions, each (B, T, Dh); applied to queries
        and new keys before they are cached.
        """
        self._check_inputs(query, key, value)
        B, T, _ = query.shape
        q = self.q_proj(query).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q = self.q_norm(q)
        if cache is not None and cache.static and cache.key is not None:
            k, v = cache.key, cache.value  # cross-attention: the source was projected once
        else:
            S = key.shape[1]
            k = self.k_proj(key).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(value).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if self.qk_norm:
                k = self.k_norm(k)
            if rotary is not None:
                k = apply_rotary(k, *rotary)
            if cache is not None:
                k, v = cache.update(k, v)  # (B, G, S_total, Dh)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
        mask, causal_fast = build_attention_mask(
            B, T, k.shape[-2], self.n_heads, query.device, key_padding_mask, attn_mask, is_causal
        )
        dropout_p = self.dropout if self.training else 0.0
        out, weights = attend(q, k, v, mask, causal_fast, need_weights, backend=self.backend, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # concat heads
        return AttentionOutput(self.out_proj(out), weights)

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3:
                raise ValueError(f"{name} must be (batch, seq, features), got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if query.shape[-1] != self.d_model:
            raise ValueError(f"query has {query.shape[-1]} features; this layer expects d_model={self.d_model}")
        if key.shape[-1] != self.k_proj.in_features or value.shape[-1] != self.v_proj.in_features:
            raise ValueError(
                f"key/value have {key.shape[-1]}/{value.shape[-1]} features; "
                f"this layer expects {self.k_proj.in_features}"
            )
        if not query.shape[0] == key.shape[0] == value.shape[0]:
            raise ValueError(f"batch sizes differ: query {query.shape[0]}, key {key.shape[0]}, value {value.shape[0]}")
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key has {key.shape[1]} positions but value has {value.shape[1]}")
