"""Evaluation: corpus BLEU / chrF (sacrebleu) and perplexity / validation loss."""

from moeformer.evaluate.metrics import TranslationScores, bleu, bleu_tokenizer, chrf, translation_scores
from moeformer.evaluate.perplexity import LossTotals, lm_loss, perplexity, seq2seq_loss

__all__ = [
    "LossTotals",
    "TranslationScores",
    "bleu",
    "bleu_tokenizer",
    "chrf",
    "lm_loss",
    "perplexity",
    "seq2seq_loss",
    "translation_scores",
]
