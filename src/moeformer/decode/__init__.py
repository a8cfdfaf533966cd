"""Decoding over the KV cache: greedy, beam search and sampling, for both model families; text in,
text out (``translate``, ``generate``) in :mod:`moeformer.decode.text`; weights laid out for a
decoding batch size in :mod:`moeformer.decode.prepared`."""

from moeformer.decode.beam import beam_generate, beam_translate, gnmt_length_penalty
from moeformer.decode.greedy import greedy_generate, greedy_translate
from moeformer.decode.prepared import Preparation, prepare_for_decoding
from moeformer.decode.sampling import filter_logits, sample_generate, sample_translate
from moeformer.decode.speculative import SpeculativeOutput, speculative_generate

__all__ = [
    "Preparation",
    "SpeculativeOutput",
    "beam_generate",
    "beam_translate",
    "filter_logits",
    "gnmt_length_penalty",
    "greedy_generate",
    "greedy_translate",
    "prepare_for_decoding",
    "sample_generate",
    "sample_translate",
    "speculative_generate",
]
