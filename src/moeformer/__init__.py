"""moeformer: the Transformer, decoder-only LMs and the Mixture-of-Experts line, in PyTorch."""

from moeformer.config import AttentionConfig, ConfigError, FeedForwardConfig, ModelConfig, load_config
from moeformer.hooks import add_hooks, hook_points, record
from moeformer.models import DecoderLM, Seq2SeqTransformer, build_model
from moeformer.presets import PRESETS, preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AttentionConfig",
    "ConfigError",
    "DecoderLM",
    "FeedForwardConfig",
    "ModelConfig",
    "Seq2SeqTransformer",
    "add_hooks",
    "build_model",
    "hook_points",
    "load_config",
    "preset",
    "record",
]
