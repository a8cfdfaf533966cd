"""Information measures of routing, from count tables (all in nats).

Shapes: E experts, V token types (or any labels: scripts, sides), counts are float64.

- entropy(p) = -sum p log p of a load or a gate distribution; at most log E (uniform).
- mutual_information(joint) = sum_{v,e} p(v,e) log p(v,e) / (p(v) p(e)): how much knowing the
  token (or its language) tells about the expert it is sent to. 0 when the router ignores the
  token; at most min(H(expert), H(token)) <= log E. These are plug-in estimates: with few
  occurrences per token type they are biased upwards, so compare layers and models on the same
  data rather than reading the number alone.
"""

from __future__ import annotations

from torch import Tensor


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Entropy of distributions along ``dim`` (normalised first; zeros contribute nothing)."""
    p = p.double()
    p = p / p.sum(dim, keepdim=True).clamp_min(1e-300)
    return -(p * p.clamp_min(1e-300).log()).sum(dim)


def mutual_information(joint: Tensor) -> float:
    """I(label; expert) of a (labels, E) table of co-occurrence counts."""
    total = float(joint.sum())
    if total <= 0:
        return 0.0
    p = joint.double() / total
    p_label, p_expert = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    value = (p[nz] * (p[nz].log() - (p_label * p_expert).expand_as(p)[nz].log())).sum()
    return max(float(value), 0.0)  # rounding can give -1e-17 for independent tables


def pointwise_mutual_information(joint: Tensor) -> Tensor:
    """log p(v, e) / (p(v) p(e)) for every cell of a (labels, E) count table; -inf where count 0."""
    p = joint.double() / joint.sum().clamp_min(1e-300)
    expected = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    return p.log() - expected.clamp_min(1e-300).log()
