"""The factory that fills every block's FFN slot from the model config.

Blocks call this and never look at what they get: everything it builds maps
(batch, seq, d_model) to an :class:`~moeformer.layers.feedforward.FFNOutput`. Mixture-of-Experts
kinds plug in here, per layer, without any block changing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from torch import nn

from moeformer.layers.feedforward import FeedForward
from moeformer.model_config import ModelConfig
from moeformer.moe.layer import moe_from_config


def build_ffn(config: ModelConfig, layer_index: int, stack: Literal["encoder", "decoder"]) -> nn.Module:
    """The FFN sublayer of layer ``layer_index`` of the ``stack``.

    ``moe.kind = "expert_choice"`` routes the encoder only: the (causal) decoder's layers get token
    choice (kind ``topk``) with the same experts and top_k (expert choice's average experts per token).
    """
    f = config.ffn
    if config.moe is not None and config.moe.is_moe_layer(layer_index):
        moe = config.moe
        if moe.kind == "expert_choice" and stack == "decoder":
            moe = replace(moe, kind="topk", capacity_factor=None)
        return moe_from_config(moe, config.d_model, f.d_ff, activation=f.activation, bias=f.bias)
    return FeedForward(config.d_model, f.d_ff, activation=f.activation, bias=f.bias)
