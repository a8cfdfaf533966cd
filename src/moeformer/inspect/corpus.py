"""What the inspection tools feed the model: a data file read and checked, encoded, batched.

A translation (seq2seq) model reads parallel data (TSV / Tatoeba / JSONL, as ``moeformer eval``
does); its encoder gets ``source + <eos>`` and its decoder ``<bos> + target``, as in training. A
decoder-only LM reads plain text, one sequence per non-empty line, or parallel data, where each
side becomes a sequence of its own, labelled side 0 (source, e.g. English) or 1 (target, e.g.
Chinese) so that routing can be compared across the two languages. Every sequence is cut to the
model's ``max_seq_len``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moeformer.data.batching import pad_batch
from moeformer.data.cleaning import clean_text
from moeformer.data.readers import ReadReport, iter_lines, read_parallel
from moeformer.data.tokenizer import TokenizerPair

PARALLEL_SUFFIXES = (".tsv", ".jsonl", ".json")


class InspectError(ValueError):
    """A request the inspection tools cannot answer (empty data, a dense model asked for routing, ...)."""


@dataclass(frozen=True)
class Item:
    source: str  # the encoder's input, or the LM's sequence
    target: str | None = None  # the decoder's input (seq2seq only)
    side: int | None = None  # LM over parallel data: 0 source side, 1 target side


@dataclass(frozen=True)
class Example:
    source: list[int]  # encoder ids (source + <eos>) or LM ids
    target: list[int] | None = None  # decoder ids (<bos> + target)
    side: int | None = None


@dataclass
class SentenceBatch:
    """Corpus items padded for one forward pass, with which ids feed which stack of the model."""

    inputs: dict[str, Tensor]  # keyword arguments of the model's forward
    stacks: dict[str, tuple[Tensor, Tensor]]  # "encoder"/"decoder"/"layers" -> (ids, padding_mask), (B, T) each
    sides: Tensor | None  # (B,) side of each row, or None


def check_data_file(path: str | Path) -> Path:
    """The data file, or a clear error before any model is loaded."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise InspectError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InspectError(f"{path}: the data file is empty")
    return path


def spread(values: list, limit: int | None) -> list:
    """At most ``limit`` of ``values``, evenly spaced: corpora are often sorted (Tatoeba by length),
    so the first ``limit`` would describe only the shortest sentences."""
    if limit is None or len(values) <= limit:
        return values
    return [values[i * len(values) // limit] for i in range(limit)]


def example_item(items: list[Item]) -> Item:
    """A typical sentence for the pictures: the one of median length."""
    return sorted(items, key=lambda item: len(item.source))[len(items) // 2]


def read_items(path: str | Path, arch: str, *, limit: int | None = None) -> list[Item]:
    """Up to ``limit`` pairs (seq2seq), or lines / pair sides (LM), cleaned as training data is,
    evenly spaced over the file."""
    path = check_data_file(path)
    if arch == "seq2seq" or _looks_parallel(path):
        pairs, report = read_parallel(path)
        pairs = spread([(clean_text(s), clean_text(t)) for s, t in pairs], limit)
        if not pairs:
            raise InspectError(f"{path}: no readable source/target pairs (rejected lines: {dict(report.rejected)})")
        if arch == "seq2seq":
            return [Item(s, t) for s, t in pairs]
        return [Item(text, None, side) for s, t in pairs for side, text in enumerate((s, t))]
    lines = spread([clean_text(line) for line in iter_lines(path, ReadReport()) if line.strip()], limit)
    if not lines:
        raise InspectError(f"{path}: no non-empty line of text")
    return [Item(line) for line in lines]


def _looks_parallel(path: Path) -> bool:
    """Parallel by suffix, or a first non-empty line with a tab (Tatoeba's cmn.txt)."""
    if path.suffix.lower() in PARALLEL_SUFFIXES:
        return True
    first = next((line for line in iter_lines(path, ReadReport()) if line.strip()), "")
    return "\t" in first


def encode_item(item: Item, tokenizers: TokenizerPair, arch: str, max_len: int) -> Example:
    if arch == "seq2seq":
        if item.target is None:
            raise InspectError("a translation model needs a target sentence for the decoder")
        source = tokenizers.source.encode(item.source, eos=True)[:max_len]
        target = tokenizers.target.encode(item.target, bos=True)[:max_len]
        return Example(source, target)
    if item.target is not None:
        raise InspectError("a decoder-only model reads one sequence: give no target")
    ids = tokenizers.source.encode(item.source)[:max_len]
    if not ids:
        raise InspectError(f"{item.source!r} is empty after tokenisation")
    return Example(ids, None, item.side)


def batches(examples: Sequence[Example], pad_id: int, batch_size: int) -> Iterator[SentenceBatch]:
    """Padded batches in order; ``stacks`` says which ids (and padding, True at padding) feed which stack."""
    if batch_size < 1:
        raise InspectError(f"batch size must be positive, got {batch_size}")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        src, src_pad = pad_batch([e.source for e in chunk], pad_id)
        sides = None if chunk[0].side is None else torch.tensor([e.side for e in chunk])
        if chunk[0].target is None:
            yield SentenceBatch({"tokens": src, "padding_mask": src_pad}, {"layers": (src, src_pad)}, sides)
            continue
        tgt, tgt_pad = pad_batch([e.target for e in chunk], pad_id)
        inputs = {"src": src, "tgt": tgt, "src_padding_mask": src_pad, "tgt_padding_mask": tgt_pad}
        yield SentenceBatch(inputs, {"encoder": (src, src_pad), "decoder": (tgt, tgt_pad)}, sides)
