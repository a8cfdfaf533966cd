"""Token-budget batching with length bucketing, and padding a batch into tensors.

Vaswani et al. 2017, section 5.1: "Sentence pairs were batched together by approximate sequence
length. Each training batch contained a set of sentence pairs containing approximately 25000
source tokens and 25000 target tokens." As in fairseq, the budget here bounds the *padded*
size of each side: ``len(batch) * max(lengths in batch) <= max_tokens``.

Examples are shuffled with the seed (so equal lengths mix differently per seed), stably sorted
by length (target, then source), cut greedily into batches under the budget, and the batches are
shuffled with the same seed. Every example appears in exactly one batch. An example that alone
exceeds ``max_tokens`` raises ``ValueError`` (it names the example): filter long examples
first, or raise the budget; a batch never exceeds it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


def token_batches(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    target_lengths: Sequence[int] | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> list[list[int]]:
    """Lists of example indices whose padded size stays within ``max_tokens`` on each side.

    ``lengths`` are the token counts of the examples (the source side of pairs);
    ``target_lengths``, when given, those of the target side. ``max_examples`` caps the number
    of examples in a batch. ``shuffle=False`` keeps the examples and batches in length order.
    """
    sides = [list(lengths)] + ([list(target_lengths)] if target_lengths is not None else [])
    _check(sides, max_tokens, max_examples)
    order = list(range(len(sides[0])))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    order.sort(key=lambda i: tuple(side[i] for side in reversed(sides)))
    batches = _cut(order, sides, max_tokens, max_examples or len(order))
    if shuffle:
        rng.shuffle(batches)
    return batches


def _check(sides: list[list[int]], max_tokens: int, max_examples: int | None) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be None or a positive count, got {max_examples}")
    if len(sides) == 2 and len(sides[0]) != len(sides[1]):
        raise ValueError(f"lengths ({len(sides[0])}) and target_lengths ({len(sides[1])}) differ in size")
    for name, side in zip(("lengths", "target_lengths"), sides):
        for i, n in enumerate(side):
            if n < 0:
                raise ValueError(f"{name}[{i}] is negative ({n})")
            if n > max_tokens:
                raise ValueError(
                    f"example {i} has {n} tokens in {name}, more than max_tokens={max_tokens}; "
                    "drop examples that long (e.g. a length filter) or raise max_tokens"
                )


def _cut(order: list[int], sides: list[list[int]], max_tokens: int, max_examples: int) -> list[list[int]]:
    """Greedy batches over ``order``: add examples while every side's padded size fits the budget."""
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = [0] * len(sides)
    for i in order:
        grown = [max(m, side[i]) for m, side in zip(longest, sides)]
        fits = len(batch) < max_examples and all((len(batch) + 1) * m <= max_tokens for m in grown)
        if batch and not fits:
            batches.append(batch)
            batch, grown = [], [side[i] for side in sides]
        batch.append(i)
        longest = grown
    if batch:
        batches.append(batch)
    return batches


def padded_size(batch: Sequence[int], lengths: Sequence[int]) -> int:
    """Tokens of ``batch`` once padded: ``len(batch) * max(length)``."""
    return len(batch) * max((lengths[i] for i in batch), default=0)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or, with ``left``, left-pad) id lists into ``ids`` (B, T) long and ``padding``
    (B, T) bool, True at padding.

    T is the longest sequence; the mask is what ``src_padding_mask`` and the losses expect. Left
    padding puts the last tokens of every row at the same positions, as prompt decoding needs.
    """
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence, got none")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    padding = torch.ones((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        padding[row, span] = False
    return ids, padding
