"""What the models return: logits plus everything the FFN sublayers reported, by layer name.

Auxiliary losses (MoE balance terms, router z-loss) are already weighted by their coefficients;
``aux_loss`` is their sum, ready to add to the task loss. Nothing is stashed on modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeformer.models.blocks import BlockOutput
from moeformer.models.cache import DecoderCache


@dataclass
class FFNReports:
    """Auxiliary losses and routing statistics gathered from the blocks of one forward pass."""

    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # "decoder.3.balance" -> scalar
    stats: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # "decoder.3" -> {...}

    def add(self, prefix: str, block: BlockOutput) -> None:
        for name, value in block.ffn.aux_losses.items():
            self.aux_losses[f"{prefix}.{name}"] = value
        if block.ffn.stats:
            self.stats[prefix] = block.ffn.stats

    def merge(self, other: FFNReports) -> None:
        self.aux_losses.update(other.aux_losses)
        self.stats.update(other.stats)

    def total(self, like: Tensor) -> Tensor:
        if not self.aux_losses:
            return like.new_zeros(())
        return torch.stack([v.float() for v in self.aux_losses.values()]).sum()


@dataclass
class EncoderOutput:
    hidden: Tensor  # (B, S, D), the "memory" cross-attention reads
    padding_mask: Tensor | None  # (B, S), True at padding
    reports: FFNReports


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, vocab)
    aux_loss: Tensor  # scalar: sum of every auxiliary loss (0 for dense models)
    reports: FFNReports  # per-layer auxiliary losses and routing statistics
    hidden: Tensor  # (B, T, D), final hidden states (after the final norm, if any)
    cache: DecoderCache | None = None
    residual: Tensor | None = None  # (B, T, D) decoder-only: the residual stream before the final norm
    mtp_logits: list[Tensor] = field(default_factory=list)  # depth k: (B, T - k, V), position i -> t_{i+k+1}
