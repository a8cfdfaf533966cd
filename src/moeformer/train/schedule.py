"""Learning-rate schedules as multipliers of the peak rate (for ``LambdaLR``).

- ``inverse_sqrt`` (the paper, section 5.3): linear warmup to the peak, then peak *
  sqrt(warmup / step). With peak = d_model^-0.5 * warmup^-0.5 it is exactly the paper's
  lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (6.99e-4 at d=512, warmup 4000);
  ``noam`` sets that peak from d_model and warmup and ignores the configured one.
- ``cosine``: linear warmup, then cosine decay to ``min_ratio`` * peak at ``total`` steps.
- ``constant``: linear warmup, then the peak.
Steps count optimiser updates from 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(kind: str, *, warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """f(step) with lr = peak * f(step); ``step`` is the number of updates done (0 at the start)."""
    warmup = max(warmup, 0)

    def inverse_sqrt(step: int) -> float:
        step = step + 1
        if warmup and step < warmup:
            return step / warmup
        return math.sqrt(max(warmup, 1) / step)

    def cosine(step: int) -> float:
        step = step + 1
        if warmup and step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def constant(step: int) -> float:
        step = step + 1
        return step / warmup if warmup and step < warmup else 1.0

    table = {"inverse_sqrt": inverse_sqrt, "noam": inverse_sqrt, "cosine": cosine, "constant": constant}
    if kind not in table:
        raise ValueError(f"schedule: unknown {kind!r}; allowed: {', '.join(table)}")
    return table[kind]


def noam_peak(d_model: int, warmup: int) -> float:
    """The paper's peak learning rate: d_model^-0.5 * warmup^-0.5."""
    return d_model**-0.5 * max(warmup, 1) ** -0.5
