"""Data: corpus checks and readers, cleaning, splits, tokenizers, batching, and the run's data report.

``pipeline.prepare`` ties them together for training; ``report.format_data_report`` prints
what it read and rejected.
"""

from moeformer.data.char_tokenizer import CharTokenizer

__all__ = ["CharTokenizer"]
