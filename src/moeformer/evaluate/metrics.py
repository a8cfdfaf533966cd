"""Corpus-level BLEU (Papineni et al. 2002) and chrF (Popović 2015), computed by sacrebleu.

sacrebleu (Post 2018) fixes the tokenization so that scores are comparable across papers, and
its signature string records every setting. Chinese is written without spaces: the default
``13a`` tokenizer would treat a whole sentence as one word and give near-zero BLEU to anything
short of an exact match, so Chinese targets use sacrebleu's ``zh`` tokenizer (each CJK character
a token). chrF works on characters and needs no tokenizer.

Chinese references may mix scripts (a quarter of Tatoeba's Chinese side is traditional): a model
trained on one script (``data.zh_script``) is then rewarded for guessing which script each
reference uses. :func:`translation_scores` scores against the references as given (comparable
with runs before script conversion) and, with ``zh_script`` "simplified" or "traditional",
also against the references converted to that script by OpenCC (``bleu_script``, ``chrf_script``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF

from moeformer.data.chinese import ZH_SCRIPTS, convert_script, is_chinese


@dataclass(frozen=True)
class TranslationScores:
    bleu: float  # corpus BLEU, 0-100
    chrf: float  # corpus chrF, 0-100
    bleu_signature: str  # e.g. "nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:2.6.0"
    chrf_signature: str
    # against the references converted to zh_script by OpenCC; None when nothing is converted
    # (zh_script "keep", or a target that is not Chinese)
    zh_script: str = "keep"
    bleu_script: float | None = None
    chrf_script: float | None = None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}bleu``, ``{prefix}chrf`` and, when scored, ``{prefix}bleu_{zh_script}`` and
        ``{prefix}chrf_{zh_script}`` (e.g. ``test_bleu_simplified``), for summary files and printing."""
        out = {f"{prefix}bleu": self.bleu, f"{prefix}chrf": self.chrf}
        if self.bleu_script is not None and self.chrf_script is not None:
            out[f"{prefix}bleu_{self.zh_script}"] = self.bleu_script
            out[f"{prefix}chrf_{self.zh_script}"] = self.chrf_script
        return out


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


def translation_scores(
    hypotheses: Sequence[str], references: Sequence[str], *, target_lang: str, zh_script: str = "keep"
) -> TranslationScores:
    """BLEU and chrF of a corpus, with the sacrebleu signatures that make them reproducible.

    ``zh_script`` "simplified" / "traditional" (Chinese targets only): also score against the
    references converted to that script (:func:`moeformer.data.chinese.convert_script`).
    """
    _check_pairs(hypotheses, references)
    if zh_script not in ZH_SCRIPTS:
        raise ValueError(f"zh_script must be one of {', '.join(map(repr, ZH_SCRIPTS))}, got {zh_script!r}")
    hyps = list(hypotheses)
    bleu_metric, chrf_metric = BLEU(tokenize=bleu_tokenizer(target_lang)), CHRF()
    bleu_score = float(bleu_metric.corpus_score(hyps, [list(references)]).score)
    chrf_score = float(chrf_metric.corpus_score(hyps, [list(references)]).score)
    signatures = str(bleu_metric.get_signature()), str(chrf_metric.get_signature())
    if zh_script == "keep" or not is_chinese(target_lang):
        return TranslationScores(bleu_score, chrf_score, *signatures)
    converted = [[convert_script(r, zh_script) for r in references]]  # type: ignore[arg-type]
    return TranslationScores(
        bleu_score,
        chrf_score,
        *signatures,
        zh_script=zh_script,
        bleu_script=float(bleu_metric.corpus_score(hyps, converted).score),
        chrf_script=float(chrf_metric.corpus_score(hyps, converted).score),
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
