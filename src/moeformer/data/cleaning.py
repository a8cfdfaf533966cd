"""Cleaning parallel text: Unicode normalisation, whitespace, length and ratio filters, de-duplication.

The usual corpus filters of machine translation (Moses ``clean-corpus-n.perl``: length limits
and a length-ratio limit of 9; exact-pair de-duplication), applied to characters rather than
words so that they work for unspaced Chinese as well. Every pair that is dropped is counted by
reason in a :class:`CleaningReport`.

NFKC (the default) also folds full-width forms: "你好吗？" would become "你好吗?". The sides named
in ``CleaningConfig.chinese`` are cleaned as Chinese instead (:mod:`moeformer.data.chinese`):
full-width punctuation is kept and ASCII "?" after a CJK character becomes "？". Traditional ->
simplified conversion (OpenCC) is not done here: see :func:`moeformer.data.chinese.convert_script`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from moeformer.data.chinese import fullwidth_after_cjk, nfkc_keeping_punctuation
from moeformer.data.readers import ReadReport
from moeformer.validation import ConfigError, check_field_types

Pair = tuple[str, str]

# Rejection reasons, the keys of CleaningReport.rejected, in the order the checks run.
EMPTY = "empty"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
LENGTH_RATIO = "length_ratio"
DUPLICATE = "duplicate"

# Invisible format characters removed besides the control characters (Unicode category Cc).
_INVISIBLE = {"\u200b", "\ufeff", "\u00ad", "\u2060"}  # zero-width space, BOM, soft hyphen, word joiner


@dataclass(kw_only=True)
class CleaningConfig:
    """What :func:`clean_pairs` changes and which pairs it drops; lengths count characters per side."""

    unicode_form: Literal["NFKC", "NFC", "none"] = "NFKC"  # Unicode normalisation applied first
    min_chars: int = 1  # shortest side kept (after clean-up)
    max_chars: int | None = 300  # longest side kept; None: no limit
    max_ratio: float | None = 9.0  # longer side / shorter side, in characters; None: no limit
    dedupe: bool = True  # drop exact repeats of a (source, target) pair, keeping the first
    # the sides cleaned as Chinese text (full-width punctuation kept; see clean_text's chinese=)
    chinese: Literal["none", "source", "target", "both"] = "none"

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.min_chars < 1:
            raise ConfigError("min_chars", f"must be at least 1, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError("max_chars", f"must be None or >= min_chars ({self.min_chars}), got {self.max_chars}")
        if self.max_ratio is not None and self.max_ratio < 1:
            raise ConfigError("max_ratio", f"must be None or >= 1, got {self.max_ratio}")


@dataclass
class CleaningReport(ReadReport):
    """Pairs kept, pairs dropped by reason, and how many kept pairs the clean-up changed."""

    changed: int = 0


def clean_text(text: str, unicode_form: Literal["NFKC", "NFC", "none"] = "NFKC", *, chinese: bool = False) -> str:
    """``text`` normalised, control and invisible characters dropped, whitespace runs made one space, stripped.

    ``chinese``: NFKC leaves full-width punctuation alone ("你好吗？" stays) and ASCII ``? ! , : ;``
    after a CJK character are made full-width ("你好吗?" -> "你好吗？"); see :mod:`moeformer.data.chinese`.
    """
    if unicode_form == "NFKC" and chinese:
        text = nfkc_keeping_punctuation(text)
    elif unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    kept = (" " if ch.isspace() else ch for ch in text if not _is_invisible(ch))
    text = " ".join("".join(kept).split())
    return fullwidth_after_cjk(text) if chinese else text


def clean_pair(source: str, target: str, config: CleaningConfig) -> Pair:
    """Both sides cleaned by :func:`clean_text`, the Chinese ones (``config.chinese``) as Chinese."""
    return (
        clean_text(source, config.unicode_form, chinese=config.chinese in ("source", "both")),
        clean_text(target, config.unicode_form, chinese=config.chinese in ("target", "both")),
    )


def _is_invisible(ch: str) -> bool:
    return ch in _INVISIBLE or (unicodedata.category(ch) == "Cc" and not ch.isspace())


def rejection_reason(source: str, target: str, config: CleaningConfig) -> str | None:
    """Why a cleaned pair fails the length filters, or None when it passes."""
    shorter, longer = sorted((len(source), len(target)))
    if shorter == 0:
        return EMPTY
    if shorter < config.min_chars:
        return TOO_SHORT
    if config.max_chars is not None and longer > config.max_chars:
        return TOO_LONG
    if config.max_ratio is not None and longer / shorter > config.max_ratio:
        return LENGTH_RATIO
    return None


def clean_pairs(pairs: Iterable[Pair], config: CleaningConfig | None = None) -> tuple[list[Pair], CleaningReport]:
    """Cleaned pairs that pass every filter, in input order, and the report of the others."""
    config = config or CleaningConfig()
    report = CleaningReport()
    seen: set[Pair] = set()
    out: list[Pair] = []
    for source, target in pairs:
        pair = clean_pair(source, target, config)
        reason = rejection_reason(*pair, config)
        if reason is None and config.dedupe:
            reason = DUPLICATE if pair in seen else None
            seen.add(pair)
        if reason is not None:
            report.reject(reason)
            continue
        report.kept += 1
        report.changed += pair != (source, target)
        out.append(pair)
    return out, report
