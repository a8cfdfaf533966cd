"""Tests for token-budget batching and padding (moeformer.data.batching)."""

from __future__ import annotations

import random

import pytest
import torch

from moeformer.data.batching import pad_batch, padded_size, token_batches


def random_lengths(n: int, seed: int, low: int = 1, high: int = 60) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def test_every_example_once_and_budget_kept_on_both_sides():
    """Each index appears in exactly one batch; padded source and target sizes stay within max_tokens."""
    src, tgt = random_lengths(2000, 0), random_lengths(2000, 1)
    batches = token_batches(src, 500, target_lengths=tgt, seed=3)
    assert sorted(i for batch in batches for i in batch) == list(range(2000))
    assert all(padded_size(b, src) <= 500 and padded_size(b, tgt) <= 500 for b in batches)


def test_bucketing_keeps_padding_low():
    """Length bucketing wastes far less on padding than batches of random examples."""
    lengths = random_lengths(5000, 2, 2, 100)
    batches = token_batches(lengths, 2000, seed=0)
    padded = sum(padded_size(b, lengths) for b in batches)
    assert sum(lengths) / padded > 0.95
    rng = random.Random(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    naive = [order[i : i + 40] for i in range(0, len(order), 40)]
    assert sum(padded_size(b, lengths) for b in naive) > 1.5 * padded


def test_batches_fill_the_budget():
    """Greedy batches are full: adding the next example of the length order would break the budget."""
    lengths = [10] * 100
    batches = token_batches(lengths, 95, shuffle=False)
    assert [len(b) for b in batches] == [9] * 11 + [1]


def test_deterministic_by_seed():
    """The same seed gives the same batches; another seed shuffles them differently."""
    lengths = random_lengths(1000, 4)
    assert token_batches(lengths, 300, seed=7) == token_batches(lengths, 300, seed=7)
    assert token_batches(lengths, 300, seed=7) != token_batches(lengths, 300, seed=8)


def test_no_shuffle_gives_length_order():
    """shuffle=False: batches in increasing length, sorted by target length then source length."""
    src, tgt = [5, 1, 3, 2], [1, 2, 1, 2]
    batches = token_batches(src, 100, target_lengths=tgt, shuffle=False, max_examples=1)
    assert batches == [[2], [0], [1], [3]]


def test_max_examples_caps_batch_size():
    """max_examples bounds the number of examples even when tokens would allow more."""
    batches = token_batches([1] * 50, 1000, max_examples=8)
    assert max(len(b) for b in batches) == 8 and sum(len(b) for b in batches) == 50


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([3, 20, 4], 10), {}, "example 1 has 20 tokens in lengths, more than max_tokens=10"),
        (([3, 4], 10), {"target_lengths": [2, 11]}, "example 1 has 11 tokens in target_lengths"),
        (([3, 4], 10), {"target_lengths": [2]}, r"lengths \(2\) and target_lengths \(1\) differ"),
        (([3], 0), {}, "max_tokens must be a positive"),
        (([3], 10), {"max_examples": 0}, "max_examples must be None or a positive"),
        (([-1], 10), {}, r"lengths\[0\] is negative"),
    ],
)
def test_errors_name_the_problem(args, kwargs, message):
    """An oversize example is an error naming it (never a batch over budget); bad arguments too."""
    with pytest.raises(ValueError, match=message):
        token_batches(*args, **kwargs)


def test_empty_input_gives_no_batches():
    """No examples, no batches."""
    assert token_batches([], 10) == []


def test_pad_batch_values_and_mask():
    """Right padding to the longest row; the mask is True exactly at padding."""
    ids, padding = pad_batch([[5, 6, 7], [8], []], pad_id=0)
    assert ids.dtype == torch.long and padding.dtype == torch.bool
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert padding.tolist() == [[False, False, False], [False, True, True], [True, True, True]]


def test_pad_batch_other_pad_id_and_empty():
    """The pad id is written at padding; an empty batch is an error."""
    ids, padding = pad_batch([[1], [1, 2]], pad_id=9)
    assert ids.tolist() == [[1, 9], [1, 2]] and padding.sum().item() == 1
    with pytest.raises(ValueError, match="at least one sequence"):
        pad_batch([], pad_id=0)


def test_padded_batches_fit_the_budget():
    """The tensors built from each batch hold at most max_tokens elements."""
    rng = random.Random(5)
    sequences = [[rng.randint(4, 50) for _ in range(rng.randint(1, 30))] for _ in range(300)]
    for batch in token_batches([len(s) for s in sequences], 120, seed=1):
        ids, padding = pad_batch([sequences[i] for i in batch], pad_id=0)
        assert ids.numel() <= 120
        assert (~padding).sum().item() == sum(len(sequences[i]) for i in batch)
