"""Checks on what users pass to a model, raised before any computation with a clear message."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tokens(tokens: Tensor, vocab_size: int, name: str) -> None:
    """tokens: (batch, seq) integer ids in [0, vocab_size)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (torch.long), got {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must be (batch, seq), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(tokens.shape)}")
    if torch.compiler.is_compiling():  # reading ids on the host breaks the graph; the lookup still bounds-checks
        return
    low, high = (int(v) for v in torch.aminmax(tokens))  # one reduction: this runs at every decoding step
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds id {bad}, outside the vocabulary [0, {vocab_size})")


def check_padding_mask(mask: Tensor | None, tokens: Tensor, name: str) -> None:
    """mask: None, or bool of the same shape as ``tokens``, True at padding."""
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor (True = padding), got {got}")
    if mask.shape != tokens.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; it must match the tokens, {tuple(tokens.shape)}")


def check_length(total: int, max_seq_len: int, name: str) -> None:
    if total > max_seq_len:
        raise ValueError(
            f"{name}: {total} positions exceed the model's max_seq_len={max_seq_len}; "
            "shorten the input or build the model with a larger max_seq_len"
        )
