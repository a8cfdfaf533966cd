"""Tests for hash-based splits (moeformer.data.splits): a source never sits in two splits, sizes, stability."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from moeformer.data.readers import read_tsv
from moeformer.data.splits import key_position, normalize_key, split_indices, split_pairs, spread_subset


def numbered(n: int) -> list[str]:
    return [f"sentence number {i}" for i in range(n)]


def split_of(splits, item) -> set[str]:
    return {name for name in ("train", "valid", "test") if item in getattr(splits, name)}


def test_key_position_is_blake2b_of_the_normalised_key():
    """Position = first 8 bytes of BLAKE2b("seed\\0" + normalised key) / 2**64: fixed across runs and Pythons."""
    digest = hashlib.blake2b(b"0\x00hi.", digest_size=8).digest()
    assert key_position("Hi.") == int.from_bytes(digest, "big") / 2**64
    assert key_position("Hi.") == pytest.approx(0.289295436797233, abs=1e-15)
    assert key_position("  HI. ") == key_position("Hi.")
    assert key_position("Hi.", seed=1) != key_position("Hi.")


def test_normalize_key():
    """NFKC, case-folded, whitespace collapsed."""
    assert normalize_key("  Ｈello\t WORLD ") == "hello world"


def test_pairs_with_one_source_share_a_split():
    """Several translations (and case/space variants) of one source all land in the same split."""
    pairs = [(f"Source {i % 300}", f"翻译{i}") for i in range(1200)]
    pairs += [(f"  source {i}  ", f"变体{i}") for i in range(300)]
    splits = split_pairs(pairs, valid=0.2, test=0.2)
    where: dict[str, set[str]] = {}
    for name in ("train", "valid", "test"):
        for source, _ in getattr(splits, name):
            where.setdefault(normalize_key(source), set()).add(name)
    assert len(where) == 300
    assert all(len(names) == 1 for names in where.values())
    assert sum(len(s) for s in (splits.train, splits.valid, splits.test)) == len(pairs)


def test_fraction_sizes_are_close_and_order_is_kept():
    """Fractions give about that share of unique keys; each split keeps corpus order."""
    keys = numbered(20_000)
    ids = split_indices(keys, valid=0.1, test=0.05)
    assert len(ids.valid) == pytest.approx(2000, rel=0.1)
    assert len(ids.test) == pytest.approx(1000, rel=0.12)
    assert sorted(ids.train + ids.valid + ids.test) == list(range(len(keys)))
    assert all(part == sorted(part) for part in (ids.train, ids.valid, ids.test))


def test_counts_give_at_least_that_many():
    """An int size is a count of items: exactly met when every key is unique."""
    ids = split_indices(numbered(5000), valid=300, test=1000)
    assert (len(ids.valid), len(ids.test), len(ids.train)) == (300, 1000, 3700)
    empty = split_indices(numbered(10), valid=0, test=0)
    assert empty.train == list(range(10)) and empty.valid == empty.test == []


def test_deterministic_and_seeded():
    """The same call gives the same split; another seed gives another."""
    keys = numbered(2000)
    assert split_indices(keys) == split_indices(list(keys))
    assert split_indices(keys, seed=1).test != split_indices(keys).test


def test_adding_data_never_moves_a_source_in_fraction_mode():
    """With fractions, an existing item's split depends only on its own key."""
    small = split_pairs([(k, "t") for k in numbered(1000)], valid=0.1, test=0.1)
    large = split_pairs([(k, "t") for k in numbered(3000)], valid=0.1, test=0.1)
    for item in [(k, "t") for k in numbered(1000)]:
        assert split_of(small, item) == split_of(large, item)


def test_custom_key_for_documents():
    """key= splits any item, e.g. plain strings."""
    docs = numbered(100)
    splits = split_pairs(docs, valid=10, test=10, key=lambda d: d)
    assert sorted(splits.train + splits.valid + splits.test) == sorted(docs)
    assert len(splits.test) == 10


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"test": 1.5}, ValueError, "test as a fraction must be in"),
        ({"valid": -1}, ValueError, r"valid as a count must be in \[0, 10\]"),
        ({"valid": 11}, ValueError, "valid as a count"),
        ({"test": "10%"}, TypeError, "test must be a fraction"),
        ({"test": True}, TypeError, "test must be a fraction"),
        ({"valid": 0.6, "test": 0.5}, ValueError, "leave some data for train"),
        ({"valid": 6, "test": 5}, ValueError, "more than the 10 items"),
    ],
)
def test_bad_sizes(options, error, message):
    """Sizes that are not a fraction in [0, 1) or a feasible count fail with the parameter named."""
    with pytest.raises(error, match=message):
        split_indices(numbered(10), **options)


def test_tatoeba_test_split_of_a_thousand(shared_data):
    """cmn.txt: a test split of >= 1,000 pairs; no English sentence in two splits."""
    pairs, _ = read_tsv(shared_data("cmn-eng", "cmn.txt"))
    splits = split_pairs(pairs, valid=1000, test=1000)
    group = Counter(normalize_key(s) for s, _ in pairs)
    assert 1000 <= len(splits.test) < 1000 + max(group.values())
    assert 1000 <= len(splits.valid) < 1000 + max(group.values())
    sources = [{normalize_key(s) for s, _ in part} for part in (splits.train, splits.valid, splits.test)]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    assert len(splits.train) + len(splits.valid) + len(splits.test) == len(pairs)


def test_spread_subset_covers_a_sorted_sequence_end_to_end():
    """One item from each k-th of the sequence: a sorted list's subset reaches both ends (the first
    k items, what validation BLEU used to take, would be the k smallest)."""
    items = list(range(1000))
    subset = spread_subset(items, 10, seed=3)
    assert len(subset) == 10 and subset == sorted(subset)
    assert [x // 100 for x in subset] == list(range(10))  # one per stratum
    assert subset != items[:10]


def test_spread_subset_depends_only_on_seed_and_count():
    """Fixed for a seed (BLAKE2b, not the process's RNG or hash salt), different for another seed."""
    items = [f"pair {i}" for i in range(500)]
    assert spread_subset(items, 20, seed=0) == spread_subset(list(items), 20, seed=0)
    assert spread_subset(items, 20, seed=0) != spread_subset(items, 20, seed=1)
    # pinned: the same subset in every process and on every machine
    assert spread_subset(list(range(100)), 4, seed=0) == [18, 34, 56, 90]


def test_spread_subset_small_and_bad_sizes():
    assert spread_subset([1, 2, 3], 5) == [1, 2, 3]
    assert spread_subset([1, 2, 3], 0) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        spread_subset([1, 2, 3], -1)
