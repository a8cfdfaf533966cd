"""Label-smoothed cross-entropy (Szegedy et al. 2016; the paper, section 5.4, eps = 0.1).

Target distribution: q = (1 - eps) * onehot(y) + eps * u, with u uniform over the V - 1 classes
that are not padding. (PyTorch's ``label_smoothing`` spreads eps / V over every class, padding
included; fairseq uses eps / (V - 1) on the non-targets.) Positions whose target is padding are
left out, and the loss is the mean over the remaining tokens:

    loss = (1 - eps) * (-log p_y) + eps * mean_{c != pad} (-log p_c)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def smoothed_cross_entropy(logits: Tensor, target: Tensor, *, pad_id: int, eps: float) -> tuple[Tensor, Tensor]:
    """logits: (B, T, V), target: (B, T) -> (smoothed loss, plain NLL), both means over real tokens."""
    logp = F.log_softmax(logits.float(), dim=-1)
    real = target != pad_id
    n = real.sum().clamp_min(1)
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    nll_mean = (nll * real).sum() / n
    if eps == 0.0:
        return nll_mean, nll_mean.detach()
    V = logits.shape[-1]
    uniform = -(logp.sum(-1) - logp[..., pad_id]) / (V - 1)
    smooth = (1 - eps) * nll + eps * uniform
    return (smooth * real).sum() / n, nll_mean.detach()


def mtp_loss(
    logits_by_depth: list[Tensor], target: Tensor, *, pad_id: int, eps: float, weight: float
) -> tuple[Tensor, list[Tensor]]:
    """DeepSeek-V3's multi-token prediction loss (report eq. 25): lambda / D * sum_k L_MTP^k.

    logits_by_depth[k - 1]: (B, T - k, V), position i predicting t_{i+k+1}, which is
    ``target[:, i + k]`` (target: (B, T), the main model's next-token targets). Each depth's loss
    is the mean over its real targets (the report divides by T; padding makes the mean the
    comparable figure). -> (weighted loss, each depth's plain NLL, detached).
    """
    losses, nlls = [], []
    for k, logits in enumerate(logits_by_depth, start=1):
        loss, nll = smoothed_cross_entropy(logits, target[:, k:], pad_id=pad_id, eps=eps)
        losses.append(loss)
        nlls.append(nll)
    return weight * torch.stack(losses).mean(), nlls
