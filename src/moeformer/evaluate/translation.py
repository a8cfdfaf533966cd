"""Decode then score: the one evaluation of a translation model on (source, reference) pairs.

Used by the validation BLEU during training (:mod:`moeformer.train.pipeline`), the test split at
the end of a run (:mod:`moeformer.train.run`) and ``moeformer eval``
(:mod:`moeformer.evaluate.checkpoint`), so the three report the same numbers for the same model
and pairs: the sources are translated by :func:`moeformer.decode.text.translate` and the
translations scored by :func:`moeformer.evaluate.metrics.translation_scores` (BLEU and chrF
against the references as given and, with ``zh_script``, converted to that script).

A long evaluation may be cut into chunks: ``progress`` hears of each chunk, and at ``deadline``
decoding stops and the scores cover the pairs decoded so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from moeformer.data.tokenizer import TokenizerPair
from moeformer.decode.text import Note, Overlong, translate
from moeformer.evaluate.metrics import TranslationScores, translation_scores

Pair = tuple[str, str]  # (source, reference)

__all__ = ["TranslationEval", "evaluate_translation"]


@dataclass(frozen=True)
class TranslationEval:
    hypotheses: list[str]  # one per pair decoded, in the pairs' order: pairs[: len(hypotheses)]
    scores: TranslationScores | None  # None when the deadline came before any pair was decoded

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The scores as :meth:`TranslationScores.as_dict` gives them; empty when nothing was scored."""
        return self.scores.as_dict(prefix) if self.scores is not None else {}


def evaluate_translation(
    model: nn.Module,
    tokenizers: TokenizerPair,
    pairs: Sequence[Pair],
    *,
    target_lang: str,
    zh_script: str = "keep",
    beam_size: int = 1,
    batch_size: int = 64,
    overlong: Overlong = "refuse",
    note: Note | None = None,
    chunk_size: int | None = None,
    deadline: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> TranslationEval:
    """Translate the sources of ``pairs``, then score the translations against their references.

    beam_size, batch_size, overlong, note: as :func:`~moeformer.decode.text.translate` takes them.
    chunk_size: translate this many sources at a time (all at once when None); ``progress`` is
    given each chunk's size once it is decoded. deadline: a :func:`time.monotonic` value, looked
    at before each chunk; once it has passed, decoding stops and the pairs decoded are scored.
    Raises ValueError for no pairs.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    step = chunk_size or len(pairs)
    hypotheses: list[str] = []
    for start in range(0, len(pairs), step):
        if deadline is not None and time.monotonic() >= deadline:
            break
        sources = [s for s, _ in pairs[start : start + step]]
        hypotheses += translate(
            model, tokenizers, sources, beam_size=beam_size, batch_size=batch_size, overlong=overlong, note=note
        )
        if progress is not None:
            progress(len(sources))
    if not hypotheses:
        return TranslationEval([], None)
    references = [t for _, t in pairs[: len(hypotheses)]]
    scores = translation_scores(hypotheses, references, target_lang=target_lang, zh_script=zh_script)
    return TranslationEval(hypotheses, scores)
