"""Train / valid / test splits decided by a hash of the source sentence; seeded subsets spread over a split.

Tatoeba lists many English sentences with several translations; a random split by pair would put
"I'm sorry." -> "对不起。" in training and "I'm sorry." -> "抱歉。" in the test set, and the test
would reward memorisation. Here every pair is placed by the BLAKE2b hash of its *normalised*
source (NFKC, case-folded, whitespace collapsed), so all pairs that share a source land in the
same split, and the split is the same on every run, machine and Python version (the built-in
``hash()`` is salted per process and is not used).

Each key gets a position u in [0, 1) from its hash (salted by ``seed``). Test takes the lowest
positions, valid the next ones, train the rest:

* a fraction (a float in [0, 1)) is a fixed threshold on u: adding pairs to the corpus never
  moves an existing source to another split;
* a count (an int) takes keys in order of u until the split holds at least that many pairs (it
  overshoots by less than the size of one source's group).
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_SCALE = float(2**64)


@dataclass(frozen=True)
class Splits(Generic[T]):
    """The three splits, each in corpus order."""

    train: list[T]
    valid: list[T]
    test: list[T]


def normalize_key(text: str) -> str:
    """The form of a source sentence that is hashed: NFKC, case-folded, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def key_position(text: str, seed: int = 0) -> float:
    """Position of a key in [0, 1): the first 8 bytes of BLAKE2b(seed, normalised key), scaled."""
    digest = hashlib.blake2b(f"{seed}\x00{normalize_key(text)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def split_indices(
    keys: Sequence[str], *, valid: float | int = 0.05, test: float | int = 0.05, seed: int = 0
) -> Splits[int]:
    """Indices of ``keys`` per split; equal keys (after :func:`normalize_key`) always share a split."""
    _check_size("valid", valid, len(keys))
    _check_size("test", test, len(keys))
    positions = [key_position(k, seed) for k in keys]
    test_cut = _cut(positions, test, 0.0)
    valid_cut = _cut(positions, valid, test_cut)
    train_ids, valid_ids, test_ids = [], [], []
    for i, u in enumerate(positions):
        (test_ids if u < test_cut else valid_ids if u < valid_cut else train_ids).append(i)
    return Splits(train_ids, valid_ids, test_ids)


def split_pairs(
    items: Sequence[T],
    *,
    valid: float | int = 0.05,
    test: float | int = 0.05,
    seed: int = 0,
    key: Callable[[T], str] | None = None,
) -> Splits[T]:
    """``items`` split by the hash of ``key(item)`` (default: ``item[0]``, the source of a pair)."""
    get_key = key or (lambda item: item[0])  # type: ignore[index]
    ids = split_indices([get_key(item) for item in items], valid=valid, test=test, seed=seed)
    return Splits([items[i] for i in ids.train], [items[i] for i in ids.valid], [items[i] for i in ids.test])


def _check_size(name: str, size: float | int, n_items: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"{name} must be a fraction (float in [0, 1)) or a count (int >= 0), got {size!r}")
    if isinstance(size, float) and not 0.0 <= size < 1.0:
        raise ValueError(f"{name} as a fraction must be in [0, 1), got {size}; give an int for a count of pairs")
    if isinstance(size, int) and not 0 <= size <= n_items:
        raise ValueError(f"{name} as a count must be in [0, {n_items}] (the number of items), got {size}")


def _cut(positions: list[float], size: float | int, start: float) -> float:
    """Upper bound of a split that begins at ``start``: a fraction adds to it, a count ranks the keys above it."""
    if isinstance(size, float):
        if start + size >= 1.0:
            raise ValueError(f"valid and test together must leave some data for train, got {start + size:.3f} of it")
        return start + size
    if size == 0:
        return start
    above = sorted(u for u in positions if u >= start)
    if size > len(above):
        raise ValueError(f"valid and test together ask for more than the {len(positions)} items there are")
    return math.nextafter(above[size - 1], 2.0)  # includes every pair whose key sits at that position


def spread_subset(items: Sequence[T], k: int, *, seed: int = 0) -> list[T]:
    """``k`` of ``items`` spread over the whole sequence: one from each of ``k`` equal strata, in order.

    Corpora are often sorted (Tatoeba's file by length), so the first ``k`` items would be the
    shortest; one item drawn from each consecutive k-th of the sequence covers it end to end
    while staying a random sample. The draw within each stratum is BLAKE2b(seed, stratum), so
    the subset depends only on ``seed`` and the items' count, never on the process.
    """
    n = len(items)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k >= n:
        return list(items)
    picks = []
    for j in range(k):
        lo, hi = j * n // k, (j + 1) * n // k  # stratum j: [lo, hi), never empty since k < n
        digest = hashlib.blake2b(f"{seed}\x00spread\x00{j}".encode(), digest_size=8).digest()
        picks.append(items[lo + int.from_bytes(digest, "big") % (hi - lo)])
    return picks
