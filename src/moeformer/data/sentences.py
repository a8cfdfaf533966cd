"""Splitting a text into sentences, and joining the translations of the pieces back into one line.

Used by :func:`moeformer.inference.translate` for inputs longer than the model's ``max_seq_len``:
a model trained on sentences translates sentence by sentence better than a cut-off text.

    split_sentences("Hi. How are you? 你好。再见！")  # ['Hi.', 'How are you?', '你好。', '再见！']
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# A sentence ends at . ! ? (one or more, then closing quotes or brackets) followed by whitespace or
# the end, so "3.14" and "e.g.x" stay whole; Chinese 。！？ end a sentence with or without a space.
_SENTENCE = re.compile(
    r"""\S.*?(?:[.!?]+["'”’)\]]*(?=\s|$)|[。！？]+[”’」』）)]*|$)""",
    re.DOTALL,
)


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, whitespace around them dropped; ``[]`` for a blank text."""
    return [m.group().strip() for m in _SENTENCE.finditer(text) if m.group().strip()]


def _wide(char: str) -> bool:
    """CJK characters and punctuation: no space is written next to them."""
    return ord(char) >= 0x2E80


def join_sentences(parts: Sequence[str]) -> str:
    """Translated sentences as one line: a space between them, none next to a CJK character."""
    out = ""
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if out and not (_wide(out[-1]) or _wide(part[0])):
            out += " "
        out += part
    return out
