"""Token embeddings (paper section 3.4; article 1.1.1).

Each token id becomes a learned d_model-vector; the paper multiplies it by sqrt(d_model) so that
its scale matches the sinusoidal position signal added next. Output projections may share this
matrix ("tying"), and a seq2seq model may share it between source and target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class TokenEmbedding(nn.Module):
    """ids: (batch, seq) integer -> (batch, seq, d_model), times sqrt(d_model) when ``scale``."""

    def __init__(self, vocab_size: int, d_model: int, *, scale: bool = True) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.multiplier = math.sqrt(d_model) if scale else 1.0
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, ids: Tensor) -> Tensor:
        x = F.embedding(ids, self.weight)
        return x * self.multiplier if self.multiplier != 1.0 else x

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.weight.shape[1]}, multiplier={self.multiplier:.4g}"
