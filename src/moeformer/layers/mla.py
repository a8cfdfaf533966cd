"""Multi-head latent attention (MLA): DeepSeek-V2 (arXiv 2405.04434, section 2.1) and DeepSeek-V3.

Every head's keys and values are decompressed from one small latent per token, so the cache
holds that latent and a single RoPE key instead of H keys and H values:

    c_KV = RMSNorm(x W^DKV)                      (B, T, C)   kv_a_proj_with_mqa, kv_a_layernorm
    [k^C_i ; v_i] = c_KV [W^UK_i ; W^UV_i]        per head    kv_b_proj
    k^R = RoPE(x W^KR)                            one head    the same matrix as W^DKV
    c_Q = RMSNorm(x W^DQ)                                     q_a_proj, q_a_layernorm
    q_i = [q^C_i ; RoPE(q^R_i)] = c_Q W^UQ_i                  q_b_proj (or x W^Q: q_proj)
    o_i = softmax(q_i [k^C_i ; k^R]^T / sqrt(Dn + Dr)) v_i
    u = [o_1 ... o_H] W^O                                     out_proj

(the paper's equations 9-19; the RMSNorms after both latents are from DeepSeek's models).
RoPE is "decoupled": it rotates only the Dr-wide part of each query and the one shared key k^R,
because a rotation between c_KV and W^UK would stop W^UK from being absorbed into the queries.
Weight names are DeepSeek's (and transformers' ``DeepseekV3Attention``), so checkpoints map
one to one, except ``out_proj`` (their ``o_proj``), the name every moeformer attention uses. The
rotated parts use moeformer's rotate-half layout; DeepSeek's checkpoints pair dimensions
(2i, 2i+1) instead, which an importer fixes by permuting those weight rows.

Shapes: B batch, T queries, S keys, D model width, H heads, C kv_lora_rank, Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moeformer.layers.attention import AttentionOutput, Backend, attend, build_attention_mask, write_in_place
from moeformer.layers.norm import RMSNorm
from moeformer.layers.position import apply_rotary


@dataclass
class LatentKVCache:
    """MLA's cache for incremental decoding: per token, C + Dr numbers instead of 2 * H * Dh.

    Holds the normalised latent c_KV (B, S, C) and the already rotated shared key k^R (B, S, Dr).
    Decoding steps attend in the latent space (W^UK absorbed into the queries, W^UV applied after
    the weighted sum: :meth:`MultiHeadLatentAttention._absorbed`), so the cache is read as it is
    and never expanded to per-head keys and values.
    """

    latent: Tensor | None = None  # (B, S, C)
    rope_key: Tensor | None = None  # (B, S, Dr)
    capacity: int = 0  # > 0: written in place into buffers of this many positions (KVCache's ``capacity``)
    buffers: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # (latent, rope_key) storage

    @property
    def length(self) -> int:
        return 0 if self.latent is None else self.latent.shape[1]

    @property
    def elements_per_token(self) -> int:
        """Numbers stored per token of one sequence: C + Dr (0 while empty)."""
        if self.latent is None or self.rope_key is None:
            return 0
        return self.latent.shape[-1] + self.rope_key.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latent, self.rope_key) if t is not None)

    def update(self, latent: Tensor, rope_key: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new tokens' (B, T, C) latent and (B, T, Dr) key; return all (B, S, .) so far."""
        if self.capacity:
            S, old = self.length, self.buffers or (None, None)
            c_buf, self.latent = write_in_place(old[0], latent, S, 1, self.capacity)
            r_buf, self.rope_key = write_in_place(old[1], rope_key, S, 1, self.capacity)
            self.buffers = (c_buf, r_buf)
        elif self.latent is None or self.rope_key is None:
            self.latent, self.rope_key = latent, rope_key
        else:
            self.latent = torch.cat([self.latent, latent], dim=1)
            self.rope_key = torch.cat([self.rope_key, rope_key], dim=1)
        return self.latent, self.rope_key

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (a rejected speculative draft); buffers are kept."""
        if self.latent is not None and self.rope_key is not None:
            self.latent, self.rope_key = self.latent[:, :length], self.rope_key[:, :length]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search), in place."""
        if self.buffers is not None:
            S = self.length
            self.buffers = (self.buffers[0].index_select(0, index), self.buffers[1].index_select(0, index))
            self.latent, self.rope_key = self.buffers[0][:, :S], self.buffers[1][:, :S]
        elif self.latent is not None and self.rope_key is not None:
            self.latent = self.latent.index_select(0, index)
            self.rope_key = self.rope_key.index_select(0, index)


class MultiHeadLatentAttention(nn.Module):
    """Causal self-attention with low-rank key/value (and optionally query) compression.

    Called like :class:`~moeformer.layers.attention.MultiHeadAttention` with the same tensor as
    query, key and value: ``mla(x, x, x, is_causal=True, rotary=(cos, sin), cache=LatentKVCache())``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        backend: Backend = "sdpa",
        norm_eps: float = 1e-6,
        softmax_scale: float | None = None,
    ) -> None:
        """``bias`` (DeepSeek's attention_bias) is on q_a_proj, kv_a_proj_with_mqa and out_proj only;
        ``q_lora_rank=None`` gives one full q_proj (DeepSeek-V2-Lite); ``norm_eps`` is the latent
        RMSNorms' epsilon (DeepSeek: 1e-6); ``softmax_scale`` defaults to 1 / sqrt(Dn + Dr) (YaRN
        models multiply it: :meth:`~moeformer.layers.position.RopeScaling.softmax_scale_factor`)."""
        super().__init__()
        if backend not in ("sdpa", "reference"):
            raise ValueError(f"backend: unknown {backend!r}; allowed: 'sdpa', 'reference'")
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {qk_rope_head_dim}")
        self.d_model, self.n_heads = d_model, n_heads
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = self.qk_head_dim**-0.5 if softmax_scale is None else softmax_scale  # 1 / sqrt(d_h + d_h^R)
        self.dropout, self.backend = dropout, backend
        q_width = n_heads * self.qk_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_width, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, q_width, bias=False)
        # One matrix gives both the latent (W^DKV) and the shared RoPE key (W^KR): "with MQA".
        self.kv_a_proj_with_mqa = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.out_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: LatentKVCache | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        need_weights: bool = False,
    ) -> AttentionOutput:
        """query (= key = value): (B, T, D) -> output (B, T, D) [, weights (B, H, T, S)].

        Masks and ``is_causal`` mean what they mean for ``MultiHeadAttention`` (with a cache
        they cover every key, cached + new). ``rotary``: (cos, sin) of the new tokens'
        positions, each (B, T, Dr), applied to the queries' RoPE part and to k^R before caching.
        """
        self._check_inputs(query, key, value, rotary)
        B, T, _ = query.shape
        q_nope, q_rope = self._queries(query)  # (B, H, T, Dn), (B, H, T, Dr)
        latent, k_rope = self._compress(query)  # (B, T, C), (B, T, Dr)
        if rotary is not None:
            q_rope = apply_rotary(q_rope, *rotary)
            k_rope = apply_rotary(k_rope[:, None], *rotary)[:, 0]
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope)  # (B, S, C), (B, S, Dr)
        S = latent.shape[1]
        mask, causal_fast = build_attention_mask(
            B, T, S, self.n_heads, query.device, key_padding_mask, attn_mask, is_causal
        )
        options = {"backend": self.backend, "dropout_p": self.dropout if self.training else 0.0, "scale": self.scale}
        if cache is not None and S - T >= T:  # decoding: fewer new tokens than cached ones
            q, k, v = self._absorbed(q_nope, q_rope, latent, k_rope)
            # Every head reads the same key and value: fold the heads into the query rows, so one
            # single-head kernel runs and nothing is copied per head.
            H, C = self.n_heads, self.kv_lora_rank
            if mask is not None:
                mask = mask.expand(B, H, T, S).reshape(B, 1, H * T, S)
            out, weights = attend(q.reshape(B, 1, H * T, -1), k, v, mask, causal_fast, need_weights, **options)
            out = torch.einsum("bhtc,hvc->bhtv", out.view(B, H, T, C), self._up_weights()[1])
            weights = None if weights is None else weights.view(B, H, T, S)
        else:
            k, v = self._expand(latent, k_rope)  # (B, H, S, Dn + Dr), (B, H, S, Dv)
            q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, Dn + Dr)
            out, weights = attend(q, k, v, mask, causal_fast, need_weights, **options)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim)  # concat heads
        return AttentionOutput(self.out_proj(out), weights)

    def _queries(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, D) -> q^C (B, H, T, Dn), q^R before rotation (B, H, T, Dr)."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, q_rope

    def _compress(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, D) -> normalised latent c_KV (B, T, C), shared key k^R before rotation (B, T, Dr)."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_rope

    def _expand(self, latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """latent (B, S, C), k^R (B, S, Dr) -> keys (B, H, S, Dn + Dr), values (B, H, S, Dv)."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rope = k_rope[:, None].expand(B, self.n_heads, S, self.qk_rope_head_dim)  # shared by all heads
        return torch.cat([k_nope, k_rope], dim=-1), v

    def _up_weights(self) -> tuple[Tensor, Tensor]:
        """kv_b_proj split per head: W^UK (H, Dn, C) and W^UV (H, Dv, C)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _absorbed(
        self, q_nope: Tensor, q_rope: Tensor, latent: Tensor, k_rope: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Attention in the latent space (DeepSeek-V2 section 2.1.2): q^C_i . (W^UK_i c) = (W^UK_i^T q^C_i) . c,
        and sum_s p_s W^UV_i c_s = W^UV_i (sum_s p_s c_s), so no key or value is ever decompressed.

        Returns one query per head (B, H, T, C + Dr) and a single shared key (B, 1, S, C + Dr) and
        value (B, 1, S, C): S x (C + Dr) reads per head instead of S x C x H(Dn + Dv) to expand.
        """
        w_uk = self._up_weights()[0]
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)
        q = torch.cat([q_latent, q_rope], dim=-1)
        k = torch.cat([latent, k_rope], dim=-1)[:, None]
        return q, k, latent[:, None]

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor, rotary: tuple[Tensor, Tensor] | None) -> None:
        if key is not query or value is not query:
            raise ValueError(
                "MultiHeadLatentAttention is self-attention only: pass the same tensor as query, key "
                "and value, mla(x, x, x); its keys and values come from the cached latent of x"
            )
        if query.dim() != 3 or not query.is_floating_point():
            raise ValueError(
                f"query must be a float (batch, seq, features) tensor, got {query.dtype} {tuple(query.shape)}"
            )
        if query.shape[-1] != self.d_model:
            raise ValueError(f"query has {query.shape[-1]} features; this layer expects d_model={self.d_model}")
        if rotary is not None and rotary[0].shape[-1] != self.qk_rope_head_dim:
            raise ValueError(
                f"rotary angles are {rotary[0].shape[-1]} wide; MLA rotates qk_rope_head_dim="
                f"{self.qk_rope_head_dim} dimensions (build RotaryEmbedding(qk_rope_head_dim))"
            )

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
            f"qk_nope_head_dim={self.qk_nope_head_dim}, qk_rope_head_dim={self.qk_rope_head_dim}, "
            f"v_head_dim={self.v_head_dim}, backend={self.backend!r}"
        )
