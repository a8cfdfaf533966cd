"""Data: tokenizers (and, later, corpus readers, splits and batching)."""

from moeformer.data.char_tokenizer import CharTokenizer

__all__ = ["CharTokenizer"]
