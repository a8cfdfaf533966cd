"""The two model families, built from one :class:`~moeformer.config.ModelConfig`."""

from __future__ import annotations

from torch import nn

from moeformer.model_config import ModelConfig
from moeformer.models.cache import DecoderCache
from moeformer.models.decoder import DecoderLM
from moeformer.models.outputs import EncoderOutput, ModelOutput
from moeformer.models.seq2seq import Seq2SeqTransformer


def build_model(config: ModelConfig) -> nn.Module:
    """``Seq2SeqTransformer`` for arch 'seq2seq', ``DecoderLM`` for arch 'decoder'."""
    return Seq2SeqTransformer(config) if config.arch == "seq2seq" else DecoderLM(config)


__all__ = ["DecoderCache", "DecoderLM", "EncoderOutput", "ModelOutput", "Seq2SeqTransformer", "build_model"]
