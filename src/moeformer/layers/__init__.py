"""The Transformer's parts, one module per concept of the article."""

from moeformer.layers.attention import (
    AttentionOutput,
    KVCache,
    MultiHeadAttention,
    scaled_dot_product_attention,
)
from moeformer.layers.embedding import TokenEmbedding
from moeformer.layers.feedforward import FeedForward, FFNOutput
from moeformer.layers.mla import LatentKVCache, MultiHeadLatentAttention
from moeformer.layers.norm import RMSNorm, build_norm
from moeformer.layers.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_table,
)
from moeformer.layers.softmax import stable_softmax

__all__ = [
    "AttentionOutput",
    "FFNOutput",
    "FeedForward",
    "KVCache",
    "LatentKVCache",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "TokenEmbedding",
    "apply_rotary",
    "build_norm",
    "scaled_dot_product_attention",
    "sinusoidal_table",
    "stable_softmax",
]
