"""Corpus-level BLEU (Papineni et al. 2002) and chrF (Popović 2015), computed by sacrebleu.

sacrebleu (Post 2018) fixes the tokenization so that scores are comparable across papers, and
its signature string records every setting. Chinese is written without spaces: the default
``13a`` tokenizer would treat a whole sentence as one word and give near-zero BLEU to anything
short of an exact match, so Chinese targets use sacrebleu's ``zh`` tokenizer (each CJK character
a token). chrF works on characters and needs no tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass(frozen=True)
class TranslationScores:
    bleu: float  # corpus BLEU, 0-100
    chrf: float  # corpus chrF, 0-100
    bleu_signature: str  # e.g. "nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:2.6.0"
    chrf_signature: str


def bleu_tokenizer(target_lang: str) -> str:
    """sacrebleu tokenizer for a target language code: "zh" for "zh", "zh-CN", ...; "13a" otherwise."""
    if not isinstance(target_lang, str) or not target_lang:
        raise ValueError(f"target_lang must be a language code such as 'zh' or 'en', got {target_lang!r}")
    return "zh" if target_lang.lower().startswith("zh") else "13a"


def bleu(hypotheses: Sequence[str], references: Sequence[str], *, target_lang: str) -> float:
    """Corpus BLEU (0-100) of one hypothesis per reference, tokenized for ``target_lang``."""
    return translation_scores(hypotheses, references, target_lang=target_lang).bleu


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100; character 6-grams, beta 2) of one hypothesis per reference."""
    _check_pairs(hypotheses, references)
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def translation_scores(hypotheses: Sequence[str], references: Sequence[str], *, target_lang: str) -> TranslationScores:
    """BLEU and chrF of a corpus, with the sacrebleu signatures that make them reproducible."""
    _check_pairs(hypotheses, references)
    hyps, refs = list(hypotheses), [list(references)]
    bleu_metric, chrf_metric = BLEU(tokenize=bleu_tokenizer(target_lang)), CHRF()
    bleu_score = bleu_metric.corpus_score(hyps, refs).score
    chrf_score = chrf_metric.corpus_score(hyps, refs).score
    return TranslationScores(
        float(bleu_score), float(chrf_score), str(bleu_metric.get_signature()), str(chrf_metric.get_signature())
    )


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    for name, texts in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(texts, str):
            raise TypeError(f"{name} must be a list of strings, got a single string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"{name}[{bad[0]}] must be a string, got {type(texts[bad[0]]).__name__}")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but {len(references)} references; they must pair up one to one"
        )
    if not hypotheses:
        raise ValueError("no hypotheses to score")
