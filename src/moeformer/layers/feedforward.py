"""Position-wise feed-forward network (paper section 3.3; article section 3).

    FFN(x)    = act(x W_up + b_up) W_down + b_down          act = ReLU (paper) or GELU
    SwiGLU(x) = (SiLU(x W_gate) * (x W_up)) W_down           (Shazeer 2020, used by Llama)

Every FFN sublayer, dense or Mixture-of-Experts, returns an :class:`FFNOutput`, so a block holds
whichever kind the factory gives it and passes auxiliary losses and routing statistics on to the
model's output without knowing where they came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn
from torch.nn import functional as F

Activation = Literal["relu", "gelu", "swiglu"]


@dataclass
class FFNOutput:
    """What every FFN sublayer returns; a dense FFN leaves the two dicts empty."""

    output: Tensor  # (batch, seq, d_model)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # weighted, ready to add to the loss
    stats: dict[str, Tensor] = field(default_factory=dict)  # routing statistics, detached


class FeedForward(nn.Module):
    """x: (batch, seq, d_model) -> FFNOutput with output (batch, seq, d_model).

    Weights: ``up_proj`` (d_model -> d_ff), ``down_proj`` (d_ff -> d_model), and for SwiGLU
    ``gate_proj`` (d_model -> d_ff), the names Llama-family checkpoints use.
    """

    def __init__(self, d_model: int, d_ff: int, *, activation: Activation = "relu", bias: bool = True) -> None:
        super().__init__()
        if activation not in ("relu", "gelu", "swiglu"):
            raise ValueError(f"activation: unknown {activation!r}; allowed: 'relu', 'gelu', 'swiglu'")
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def hidden(self, x: Tensor) -> Tensor:
        """The activated hidden layer, (..., d_ff)."""
        if self.activation == "swiglu":
            return F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.activation == "gelu":
            return F.gelu(self.up_proj(x))
        return F.relu(self.up_proj(x))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> FFNOutput:
        """``padding_mask`` (batch, seq) is part of every FFN's signature; a dense FFN ignores it."""
        return FFNOutput(self.down_proj(self.hidden(x)))
