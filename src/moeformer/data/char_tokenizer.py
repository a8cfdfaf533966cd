"""Character tokenizer: one id per Unicode character, plus four special tokens.

The simplest tokenizer that handles Chinese (no spaces between words) and English alike;
decode(encode(text)) == text for every text made of known characters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


@dataclass(frozen=True)
class CharTokenizer:
    chars: tuple[str, ...]  # the vocabulary after the specials, in id order

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """Vocabulary of every character seen, sorted so that the ids are reproducible."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(tuple(sorted(seen)))

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        index = self._index
        ids = [index.get(ch, self.unk_id) for ch in text]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; stops at EOS, skips the other special tokens."""
        out = []
        offset = len(SPECIALS)
        for i in ids:
            if i == self.eos_id:
                break
            if i >= offset:
                out.append(self.chars[i - offset])
        return "".join(out)

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {ch: i + len(SPECIALS) for i, ch in enumerate(self.chars)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def to_dict(self) -> dict[str, object]:
        return {"kind": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CharTokenizer:
        if data.get("kind") != "char":
            raise ValueError(f"not a character tokenizer: kind={data.get('kind')!r}")
        return cls(tuple(str(data["chars"])))
