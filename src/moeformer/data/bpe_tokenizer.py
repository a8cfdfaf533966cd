"""Byte-level BPE tokenizer (GPT-2's scheme), trained with Hugging Face ``tokenizers``.

Sennrich et al. 2016 (BPE over subwords); Radford et al. 2019 (byte-level: the base alphabet is
the 256 bytes, so every string is encodable and no text is ever unknown). Chinese needs no
spaces: the pre-tokenizer's regex keeps a run of Han characters as one word and BPE learns merges
inside it.

Exact round trip, ``decode(encode(text)) == text`` for any text (Chinese, emoji, tabs, runs of
spaces), comes from three choices: no normaliser; the ByteLevel pre-tokenizer without a prefix
space; the ByteLevel decoder. Special-token strings typed in the text ("<eos>") are encoded as
ordinary text (``encode_special_tokens``), so they too survive the round trip.

The special ids are those of :class:`~moeformer.data.char_tokenizer.CharTokenizer`: pad 0,
bos 1, eos 2, unk 3 (unk is reserved but never produced: every byte has an id).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
MIN_VOCAB = len(SPECIALS) + 256  # the specials and one token per byte


@dataclass(frozen=True, eq=False)
class BPETokenizer:
    """A trained byte-level BPE model; build with :meth:`train` or :meth:`from_dict`."""

    backend: HFTokenizer

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3

    def __post_init__(self) -> None:
        ids = [self.backend.token_to_id(token) for token in SPECIALS]
        if ids != [0, 1, 2, 3]:
            raise ValueError(f"BPE tokenizer must map {SPECIALS} to ids [0, 1, 2, 3], got {ids}")
        self.backend.encode_special_tokens = True  # "<eos>" in the text is text, not a special token

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickle rebuild the backend from its JSON, which does not hold the flag
        # above: without this, a copied tokenizer reads "<unk>" in a text as the special token
        object.__setattr__(self, "__dict__", state)
        self.backend.encode_special_tokens = True

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from ``texts`` until the vocabulary (specials and bytes included) reaches ``vocab_size``."""
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (4 specials + 256 bytes), got {vocab_size}")
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
        backend = HFTokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """:meth:`encode` of each text, run in parallel by the Rust backend."""
        head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [head + e.ids + tail for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; stops at EOS, skips the other special tokens and ids outside the vocabulary.

        A cut-off multi-byte character (a model may emit half of one) decodes to U+FFFD.
        """
        vocab_size = self.vocab_size
        kept = []
        for i in ids:
            if i == self.eos_id:
                break
            if len(SPECIALS) <= i < vocab_size:
                kept.append(i)
        return self.backend.decode(kept, skip_special_tokens=True)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form: the kind and the backend's own JSON (merges, vocabulary, pipeline)."""
        return {"kind": "bpe", "tokenizer": self.backend.to_str()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BPETokenizer:
        if data.get("kind") != "bpe":
            raise ValueError(f"not a BPE tokenizer: kind={data.get('kind')!r}")
        if not isinstance(data.get("tokenizer"), str):
            raise ValueError("BPE tokenizer data needs 'tokenizer': the JSON string of Tokenizer.to_str()")
        return cls(HFTokenizer.from_str(data["tokenizer"]))  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self.backend.to_str() == other.backend.to_str()

    def __hash__(self) -> int:
        return hash(self.backend.to_str())
