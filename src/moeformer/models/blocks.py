"""Encoder and decoder blocks (paper section 3.1, Figure 1; article section 1.1.3).

Each sublayer (self-attention, cross-attention, FFN) is wrapped in a residual connection with
dropout and a norm, in one of two positions:

    post-norm (the paper):        x = Norm(x + Dropout(Sublayer(x)))
    pre-norm (modern LMs, and the Annotated Transformer): x = x + Dropout(Sublayer(Norm(x)))

The FFN slot is filled by a factory (:func:`moeformer.models.ffn_factory.build_ffn`); a block only
relies on it returning an :class:`~moeformer.layers.feedforward.FFNOutput`, so dense FFNs and MoE
layers drop in unchanged. Hook points: resid_pre, attn_out, [cross_attn_out,] mlp_out, resid_post.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from moeformer.hooks import HookPoint
from moeformer.layers.attention import KVCache, MultiHeadAttention
from moeformer.layers.feedforward import FFNOutput
from moeformer.layers.mla import LatentKVCache, MultiHeadLatentAttention
from moeformer.layers.norm import build_norm
from moeformer.model_config import ModelConfig
from moeformer.moe.layer import MoELayer


@dataclass
class BlockOutput:
    hidden: Tensor  # (batch, seq, d_model)
    ffn: FFNOutput  # carries the FFN's auxiliary losses and routing statistics


@dataclass
class LayerCache:
    """Incremental-decoding state of one decoder block."""

    self_attn: KVCache | LatentKVCache  # LatentKVCache with attention.kind "mla"
    cross_attn: KVCache | None = None


def _attention(config: ModelConfig) -> MultiHeadAttention | MultiHeadLatentAttention:
    a = config.attention
    if a.kind == "mla":
        return _latent_attention(config)
    return MultiHeadAttention(
        config.d_model,
        a.n_heads,
        n_kv_heads=a.n_kv_heads,
        dropout=a.dropout,
        bias=a.bias,
        qkv_bias=a.qkv_bias,
        backend=a.backend,
        head_dim=a.head_dim,
        qk_norm=a.qk_norm,
        norm_eps=config.norm_eps,
    )


def _latent_attention(config: ModelConfig) -> MultiHeadLatentAttention:
    a = config.attention
    if a.kv_lora_rank is None or a.qk_nope_head_dim is None or a.qk_rope_head_dim is None or a.v_head_dim is None:
        raise ValueError("attention.kind 'mla' needs kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim")
    yarn = 1.0 if a.rope_scaling is None else a.rope_scaling.softmax_scale_factor()
    return MultiHeadLatentAttention(
        config.d_model,
        a.n_heads,
        kv_lora_rank=a.kv_lora_rank,
        qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        q_lora_rank=a.q_lora_rank,
        dropout=a.dropout,
        bias=a.bias,
        backend=a.backend,
        norm_eps=config.norm_eps,
        softmax_scale=(a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5 * yarn,
    )


class _Block(nn.Module):
    """What encoder and decoder blocks share: residual wiring, norms, FFN slot, hook points."""

    def __init__(self, config: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = _attention(config)
        self.attn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.ffn = ffn
        self.ffn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.resid_pre = HookPoint()
        self.attn_out = HookPoint()
        self.mlp_out = HookPoint()
        self.resid_post = HookPoint()

    def residual(self, x: Tensor, norm: nn.Module, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return x + self._dropout(sublayer(norm(x)))
        return norm(x + self._dropout(sublayer(x)))

    def _dropout(self, h: Tensor) -> Tensor:
        return self.dropout(h) if self.training else h  # eval: identity, without a module call per sublayer

    def feed_forward(self, x: Tensor, token_padding: Tensor | None, report: bool = True) -> tuple[Tensor, FFNOutput]:
        """token_padding: (B, T) True at padding; MoE layers route only real tokens.

        ``report=False``: an MoE layer skips its auxiliary losses and routing statistics (the only
        FFN with something to skip; other FFNs keep the plain ``(x, padding_mask)`` contract)."""
        result: list[FFNOutput] = []
        skip = not report and isinstance(self.ffn, MoELayer)

        def run(h: Tensor) -> Tensor:
            result.append(self.ffn(h, token_padding, report=False) if skip else self.ffn(h, token_padding))
            return self.mlp_out(result[0].output)

        x = self.residual(x, self.ffn_norm, run)
        return x, result[0]


class EncoderBlock(_Block):
    """Self-attention over the whole source, then the FFN."""

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None) -> BlockOutput:
        """x: (B, S, D); padding_mask: (B, S) bool, True at padding."""
        x = self.resid_pre(x)
        x = self.residual(
            x,
            self.attn_norm,
            lambda h: self.attn_out(self.self_attn(h, h, h, key_padding_mask=padding_mask).output),
        )
        x, ffn = self.feed_forward(x, padding_mask)
        return BlockOutput(self.resid_post(x), ffn)


class DecoderBlock(_Block):
    """Masked self-attention, [encoder-decoder attention,] then the FFN.

    Without cross-attention this is the block of a decoder-only LM.
    """

    def __init__(self, config: ModelConfig, ffn: nn.Module, *, cross_attention: bool) -> None:
        super().__init__(config, ffn)
        if cross_attention:
            self.cross_attn = _attention(config)
            self.cross_norm = build_norm(config.norm, config.d_model, config.norm_eps)
            self.cross_attn_out = HookPoint()
        self.has_cross = cross_attention

    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        report: bool = True,
        token_padding: Tensor | None = None,
    ) -> BlockOutput:
        """x: (B, T, D) new target positions; padding_mask: (B, S_total) over cached + new keys.

        memory: (B, S_src, D) encoder output, with memory_padding_mask (B, S_src). ``report=False``
        lets an MoE FFN skip its losses and statistics (decoding; :class:`~moeformer.moe.layer.MoELayer`).
        token_padding: (B, T) padding of the new tokens, where it is not the last T columns of
        ``padding_mask`` (a fixed-shape cache's mask spans every slot: ``moeformer.decode.compiled``).
        """
        x = self.resid_pre(x)

        def self_attention(h: Tensor) -> Tensor:
            out = self.self_attn(
                h,
                h,
                h,
                key_padding_mask=padding_mask,
                is_causal=True,
                cache=None if cache is None else cache.self_attn,
                rotary=rotary,
            )
            return self.attn_out(out.output)

        x = self.residual(x, self.attn_norm, self_attention)
        if self.has_cross:
            if memory is None:
                raise ValueError("this decoder block attends to an encoder: pass memory=")

            def cross_attention(h: Tensor) -> Tensor:
                out = self.cross_attn(
                    h,
                    memory,
                    memory,
                    key_padding_mask=memory_padding_mask,
                    cache=None if cache is None else cache.cross_attn,
                )
                return self.cross_attn_out(out.output)

            x = self.residual(x, self.cross_norm, cross_attention)
        if token_padding is None and padding_mask is not None:
            token_padding = padding_mask[:, -x.shape[1] :]
        x, ffn = self.feed_forward(x, token_padding, report)
        return BlockOutput(self.resid_post(x), ffn)

    def new_cache(self, capacity: int = 0) -> LayerCache:
        """``capacity`` > 0: self-attention keys are written in place into buffers of that many positions."""
        latent = isinstance(self.self_attn, MultiHeadLatentAttention)
        attn = LatentKVCache(capacity=capacity) if latent else KVCache(capacity=capacity)
        return LayerCache(attn, KVCache(static=True) if self.has_cross else None)
