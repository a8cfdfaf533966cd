"""Decoding over the KV cache."""

from moeformer.decode.greedy import greedy_generate, greedy_translate

__all__ = ["greedy_generate", "greedy_translate"]
