"""The tokenizer interface, saving and loading by kind, and the source/target pair of a translation model.

Two implementations share the interface and the special ids (pad 0, bos 1, eos 2, unk 3):
:class:`~moeformer.data.char_tokenizer.CharTokenizer` (one id per character) and
:class:`~moeformer.data.bpe_tokenizer.BPETokenizer` (byte-level BPE). ``to_dict()`` gives
JSON-able data with a ``"kind"`` key; :func:`tokenizer_from_dict` reads it back.

A translation model has a :class:`TokenizerPair`: one tokenizer shared by both sides (a joint
vocabulary, needed to tie the source and target embeddings) or one per side::

    pair = train_tokenizer_pair(pairs, kind="bpe", vocab_size=8000, shared=True)
    src_ids = pair.source.encode("Are you OK?")
    tgt_ids = pair.target.encode("你好吗？", bos=True, eos=True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from moeformer.data.bpe_tokenizer import BPETokenizer
from moeformer.data.char_tokenizer import CharTokenizer

TokenizerKind = Literal["char", "bpe"]
KINDS: tuple[str, ...] = ("char", "bpe")


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> ids. ``decode`` stops at EOS and skips the other special ids."""

    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_dict(self) -> dict[str, object]: ...


def tokenizer_from_dict(data: dict[str, object]) -> Tokenizer:
    """The tokenizer saved as ``data`` (from ``to_dict()``), chosen by ``data["kind"]``."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "char":
        return CharTokenizer.from_dict(data)
    if kind == "bpe":
        return BPETokenizer.from_dict(data)
    if kind == "hub":  # an imported Hugging Face model's own tokenizer
        from moeformer.data.hub_tokenizer import HubTokenizer

        return HubTokenizer.from_dict(data)
    raise ValueError(f"unknown tokenizer kind {kind!r}; allowed kinds: {', '.join(map(repr, KINDS))}, 'hub'")


def train_tokenizer(texts: Iterable[str], *, kind: TokenizerKind = "bpe", vocab_size: int = 8000) -> Tokenizer:
    """A tokenizer of ``kind`` trained on ``texts`` (``vocab_size`` applies to BPE only)."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; allowed kinds: {', '.join(map(repr, KINDS))}")


@dataclass(frozen=True)
class TokenizerPair:
    """The tokenizers of a translation model's source and target; the same object when shared."""

    source: Tokenizer
    target: Tokenizer

    @property
    def shared(self) -> bool:
        return self.source is self.target

    def to_dict(self) -> dict[str, object]:
        if self.shared:
            return {"shared": True, "tokenizer": self.source.to_dict()}
        return {"shared": False, "source": self.source.to_dict(), "target": self.target.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TokenizerPair:
        if data.get("shared") is True:
            one = tokenizer_from_dict(data["tokenizer"])  # type: ignore[arg-type]
            return cls(one, one)
        if data.get("shared") is False:
            return cls(tokenizer_from_dict(data["source"]), tokenizer_from_dict(data["target"]))  # type: ignore[arg-type]
        raise ValueError(f"tokenizer pair data needs 'shared': true or false, got {data.get('shared')!r}")


def train_tokenizer_pair(
    pairs: Sequence[tuple[str, str]], *, kind: TokenizerKind = "bpe", vocab_size: int = 8000, shared: bool = True
) -> TokenizerPair:
    """Tokenizers for (source, target) pairs: one trained on both sides, or one per side of ``vocab_size`` each."""
    if shared:
        one = train_tokenizer((text for pair in pairs for text in pair), kind=kind, vocab_size=vocab_size)
        return TokenizerPair(one, one)
    source = train_tokenizer((s for s, _ in pairs), kind=kind, vocab_size=vocab_size)
    target = train_tokenizer((t for _, t in pairs), kind=kind, vocab_size=vocab_size)
    return TokenizerPair(source, target)
