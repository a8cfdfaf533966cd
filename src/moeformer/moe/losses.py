"""Load-balancing and stability losses of MoE routers, unweighted (coefficients live in config).

Shapes: N real tokens (padding already removed), E routed experts, K experts per token.
f_i: the fraction of the N * K assignments that chose expert i (before capacity dropping);
P_i: the mean over tokens of expert i's score, normalised to sum 1 per token (a no-op for softmax
probabilities; for DeepSeek-V3's sigmoid scores it is the report's s'_{i,t}, eq. 19).

- load balance (Switch Transformer eq. 4-6; GShard; DeepSeekMoE eq. 12-13, the "expert-level
  balance loss", which is the same formula): E * sum_i f_i P_i.
  1 for perfectly uniform routing, E for total collapse onto one expert.
- device balance (DeepSeekMoE eq. 14-15): experts split into D equal groups (devices);
  sum_d f'_d P'_d with f'_d the mean of E * f_i and P'_d the sum of P_i over the group's
  experts; 1 for uniform routing, like the expert-level term.
- sequence-wise balance (DeepSeek-V3 eq. 17-20): the load-balance term computed within each
  sequence, with scores first normalised to sum 1 per token, averaged over sequences.
- router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2; keeps logits small.
"""

from __future__ import annotations

import torch
from torch import Tensor


def assignment_fraction(index: Tensor, n_experts: int) -> Tensor:
    """f: (E,) fraction of the assignments in ``index`` (N, K) sent to each expert."""
    counts = torch.bincount(index.reshape(-1), minlength=n_experts)[:n_experts]
    return counts.float() / max(index.numel(), 1)


def _normalised(scores: Tensor) -> Tensor:
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)


def load_balance_loss(scores: Tensor, index: Tensor) -> Tensor:
    """E * sum_i f_i P_i; scores: (N, E), index: (N, K)."""
    E = scores.shape[-1]
    return E * (assignment_fraction(index, E) * _normalised(scores).mean(0)).sum()


def device_balance_loss(scores: Tensor, index: Tensor, n_devices: int) -> Tensor:
    """sum_d f'_d P'_d over D contiguous groups of E / D experts."""
    E = scores.shape[-1]
    f = assignment_fraction(index, E).view(n_devices, -1).mean(-1) * E  # f_i = E * fraction_i
    P = _normalised(scores).mean(0).view(n_devices, -1).sum(-1)
    return (f * P).sum()


def sequence_balance_loss(scores: Tensor, index: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
    """Mean over sequences of E * sum_i f_i P_i within each; scores: (B, T, E), index: (B, T, K).

    padding_mask: (B, T) True at padding (left out of f and P), as every mask in moeformer; None: no padding.
    Keyword-only: it was once a positional ``token_mask`` True at real tokens, and a call written for that
    must fail, not silently invert.
    """
    B, T, E = scores.shape
    K = index.shape[-1]
    real = torch.ones(B, T, device=scores.device) if padding_mask is None else (~padding_mask).float()
    n_real = real.sum(1).clamp_min(1.0)  # (B,)
    P = (_normalised(scores) * real[..., None]).sum(1) / n_real[:, None]  # (B, E)
    chosen = torch.zeros(B, T, E + 1, device=scores.device).scatter_(2, index, 1.0)[..., :E]
    f = (chosen * real[..., None]).sum(1) / (K * n_real[:, None])  # (B, E)
    return (E * (f * P).sum(-1)).mean()


def router_z_loss(logits: Tensor) -> Tensor:
    """mean_t logsumexp(logits_t)^2; logits: (N, E)."""
    # logsumexp written out: torch's asks whether the input is empty, which a compiled graph cannot
    # answer for padding-masked rows (a graph break per layer); the shift changes no gradient
    top = logits.detach().amax(-1, keepdim=True).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # rows of -inf
    lse = (logits - top).exp().sum(-1).log() + top.squeeze(-1)
    return lse.pow(2).mean()


def router_entropy(scores: Tensor) -> Tensor:
    """Mean entropy (nats) of the per-token routing distribution (scores normalised to sum 1)."""
    p = _normalised(scores)
    return -(p * p.clamp_min(1e-20).log()).sum(-1).mean()
