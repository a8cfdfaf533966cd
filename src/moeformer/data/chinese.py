"""Chinese text: one script (OpenCC) and full-width punctuation.

Two things that Unicode normalisation and a mixed corpus get wrong for Chinese readers:

* **Punctuation.** NFKC folds the full-width forms that Chinese is written with ("？" U+FF1F,
  "，" U+FF0C, ...) to ASCII, so a model trained on NFKC'd text answers "你好吗?" where a reader
  expects "你好吗？". :func:`nfkc_keeping_punctuation` applies NFKC to everything except
  :data:`FULLWIDTH_PUNCTUATION` (full-width letters and digits, "％", the ideographic space are
  still folded); :func:`fullwidth_after_cjk` writes ASCII ``? ! , : ;`` that follow a CJK
  character in their full-width form, and ASCII parentheses around CJK text as "（）".
  :func:`moeformer.data.cleaning.clean_text` with ``chinese=True`` does both.
* **Script.** Tatoeba's Chinese side mixes scripts ("我愛你。" beside "我爱你。"; OpenCC t2s
  changes 12,906 of its 29,391 sentences). :func:`convert_script` converts with OpenCC (the open
  converter most tools use), configs ``t2s`` / ``s2t``. It works on phrases, where a character
  table cannot: s2t gives "头发" -> "頭髮" but "发现" -> "發現", and t2s keeps the name "乾隆"
  while "乾燥" -> "干燥".

Quotes are left as they are: Chinese text uses curly quotes (“ ” U+201C/D, which NFKC does not
touch) or corner brackets (「」), and an ASCII ``"`` after a CJK character could open or close a
quotation; choosing “ or ” would need pairing that the corpus does not guarantee. The ASCII
full stop is left too: after a CJK character it is rare in Tatoeba (12 times in 29,392 lines)
and "." is also the decimal point. The ellipsis "…" is protected from NFKC (which makes it "...").
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from typing import Literal

ZhScript = Literal["simplified", "traditional", "keep"]
ZH_SCRIPTS: tuple[str, ...] = ("simplified", "traditional", "keep")
# OpenCC's config for each script; "keep" converts nothing
_OPENCC_CONFIGS = {"simplified": "t2s", "traditional": "s2t"}

# Full-width punctuation that Chinese is written with and that NFKC would fold to ASCII: kept.
FULLWIDTH_PUNCTUATION = "？！，：；（）～…"
# ASCII punctuation written in its full-width form when it follows a CJK character
_TO_FULLWIDTH = {"?": "？", "!": "！", ",": "，", ":": "：", ";": "；"}
# the NFKC-stable part of a text: runs of anything but the protected characters
_PROTECTED = re.compile(f"([{re.escape(FULLWIDTH_PUNCTUATION)}])")


def is_chinese(lang: str) -> bool:
    """Whether a language code names Chinese: "zh", "zh-CN", "zh_Hant", ... (and Tatoeba's "cmn")."""
    lang = lang.lower()
    return lang.startswith("zh") or lang == "cmn"


def is_cjk(ch: str) -> bool:
    """Whether ``ch`` is a wide East Asian character: ideographs, kana, CJK and full-width punctuation."""
    return unicodedata.east_asian_width(ch) in ("W", "F")


@cache
def _converter(config: str):  # noqa: ANN202 (opencc.OpenCC has no type stubs)
    import opencc  # loaded on first use: reading its dictionaries takes a moment

    return opencc.OpenCC(config)


def convert_script(text: str, script: ZhScript) -> str:
    """``text`` in ``script`` ("keep": unchanged), converted phrase by phrase by OpenCC.

    One converter per OpenCC config is made and kept (they are slow to load, fast to use).
    Non-Chinese characters pass through unchanged.
    """
    if script not in ZH_SCRIPTS:
        raise ValueError(f"zh_script must be one of {', '.join(map(repr, ZH_SCRIPTS))}, got {script!r}")
    if script == "keep":
        return text
    return _converter(_OPENCC_CONFIGS[script]).convert(text)


def fullwidth_after_cjk(text: str) -> str:
    """ASCII ``? ! , : ;`` after a CJK character in full-width form; ``(...)`` holding CJK as "（...）".

    Spaces around a converted mark are dropped (full-width marks carry their own spacing):
    "你好 , 我" -> "你好，我". Marks after Latin letters or digits stay ASCII ("Tom, 你好" keeps
    its ","); "…" and "”" count as CJK, so '他说“好”?' ends in "？".
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        prev = out[-1] if out else ""
        if ch == " " and _space_before_mark(text, i, prev):
            i += 1
            continue
        if ch in _TO_FULLWIDTH and _ends_cjk(prev):
            out.append(_TO_FULLWIDTH[ch])
            i += 1
            while i < len(text) and text[i] == " ":  # no space after a full-width mark
                i += 1
            continue
        out.append(ch)
        i += 1
    return _fullwidth_parentheses("".join(out))


def _space_before_mark(text: str, i: int, prev: str) -> bool:
    """Whether the spaces at ``text[i]`` lie between a CJK character and a mark that becomes full-width."""
    j = i
    while j < len(text) and text[j] == " ":
        j += 1
    return j < len(text) and text[j] in _TO_FULLWIDTH and _ends_cjk(prev)


def _ends_cjk(prev: str) -> bool:
    """Whether a mark after ``prev`` belongs to Chinese text: a CJK character, a closing quote, "…"."""
    return bool(prev) and (is_cjk(prev) or prev in "”’…")


def _fullwidth_parentheses(text: str) -> str:
    """ASCII parentheses that enclose a CJK character (and no other parenthesis) made full-width."""
    return re.sub(r"\(([^()]*)\)", lambda m: f"（{m[1]}）" if any(map(is_cjk, m[1])) else m[0], text)


def nfkc_keeping_punctuation(text: str) -> str:
    """NFKC applied to everything in ``text`` except :data:`FULLWIDTH_PUNCTUATION`.

    "你好吗？" stays "你好吗？"; "ＡＢＣ１２３" -> "ABC123"; "１０％" -> "10%".
    """
    parts = _PROTECTED.split(text)  # odd positions are the protected characters themselves
    return "".join(p if k % 2 else unicodedata.normalize("NFKC", p) for k, p in enumerate(parts))


def convert_pairs(
    pairs: list[tuple[str, str]], script: ZhScript, sides: Literal["none", "source", "target", "both"]
) -> list[tuple[str, str]]:
    """``pairs`` with their Chinese ``sides`` in ``script`` (:func:`convert_script`), in order, repeats kept."""
    if script == "keep" or sides == "none":
        return list(pairs)
    src, tgt = sides in ("source", "both"), sides in ("target", "both")
    return [(convert_script(s, script) if src else s, convert_script(t, script) if tgt else t) for s, t in pairs]
