"""Normalisation: LayerNorm (paper, Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g: LayerNorm without centring or bias, as used by the
decoder-only LMs (Llama, Qwen, DeepSeek). Computed in float32 whatever the input dtype, because
the mean of squares loses precision in bf16.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x: (..., d) -> (..., d)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(kind: Literal["layernorm", "rmsnorm"], d: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(d, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(d, eps=eps)
    raise ValueError(f"norm: unknown kind {kind!r}; allowed: 'layernorm', 'rmsnorm'")
