"""Readable labels for token ids (the axes of every picture) and the script of each token.

Byte-level BPE may split one Chinese character over two tokens; decoding such a token alone
gives U+FFFD. :func:`token_labels` instead gives each character to the token that completes it
and labels the incomplete piece "·", so the axes show real glyphs.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeformer.data.tokenizer import Tokenizer

SPECIAL_NAMES = {"pad_id": "<pad>", "bos_id": "<bos>", "eos_id": "<eos>", "unk_id": "<unk>"}
PARTIAL = "·"  # a token holding part of a character that a later token completes
SCRIPTS = ("latin", "han", "other")  # the values of token_script, in this order
# CJK Unified Ideographs, Extension A, compatibility ideographs, Extensions B and later.
HAN_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x3134F))


def token_labels(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """One short display string per id: specials by name, text with visible spaces."""
    specials = {getattr(tokenizer, attr): name for attr, name in SPECIAL_NAMES.items()}
    labels: list[str] = []
    run: list[int] = []  # consecutive ordinary ids, decoded together
    shown = ""
    for i in ids:
        if i in specials:
            labels.append(specials[i])
            run, shown = [], ""
            continue
        run.append(i)
        text = tokenizer.decode(run).rstrip("\ufffd")  # a trailing U+FFFD: a character not finished yet
        piece = text[len(shown) :] if text.startswith(shown) else tokenizer.decode([i])
        shown = text
        labels.append(_visible(piece) if piece else PARTIAL)
    return labels


def _visible(piece: str) -> str:
    return piece.replace(" ", "▁").replace("\n", "↵").replace("\t", "⇥")  # ▁: a word-initial space


def token_script(label: str) -> str:
    """The script of a label: "han" if it holds a CJK character, "latin" if an ASCII/Latin letter, else "other"."""
    if label in SPECIAL_NAMES.values():
        return "other"
    if any(_is_han(ch) for ch in label):
        return "han"
    if any(ch.isalpha() and ord(ch) < 0x250 for ch in label):
        return "latin"
    return "other"


def _is_han(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in HAN_RANGES)
