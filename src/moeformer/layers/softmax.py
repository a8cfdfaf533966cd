"""Numerically stable softmax (article section 2.2.2).

softmax(z)_i = exp(z_i - max(z)) / sum_j exp(z_j - max(z)).

Subtracting the maximum leaves the result unchanged (it cancels between numerator and
denominator) but keeps every exponent <= 0, so logits of 1e4 neither overflow to inf nor give
inf / inf = NaN. Rows in which every score is -inf (a query that may attend to nothing) give
zeros instead of NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stable_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``scores`` along ``dim`` with the max-subtraction trick; any shape."""
    peak = scores.amax(dim=dim, keepdim=True).detach()
    # A row of all -inf has peak -inf; -inf - -inf is NaN, so shift such rows by 0 instead.
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    exp = torch.exp(scores - peak)
    total = exp.sum(dim=dim, keepdim=True)
    return exp / torch.where(total == 0, torch.ones_like(total), total)
