"""Beyond the paper, for MoE models: does refusal show in the routing, and does ablation move it?

For every MoE layer we count, over the real tokens of chat-formatted prompts, how often the
router sends a token to each expert (fraction of all top-k choices), separately for harmful and
harmless prompts, and again for harmful prompts with the direction ablated. Reported per layer:
the difference in frequencies (harmful - harmless), the experts with the largest differences,
and the total-variation distance of each pair of distributions.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor

from moeformer.refusal.interventions import BASELINE, Intervention
from moeformer.refusal.lm import ChatLM, PromptBatch, RefusalError, iter_batches


@torch.no_grad()
def routing_frequencies(
    lm: ChatLM, instructions: Sequence[str], intervention: Intervention = BASELINE, *, batch_size: int = 16
) -> dict[int, Tensor]:
    """layer -> (n_experts,) fraction of the top-k choices of real prompt tokens that went to each expert."""
    sites = lm.router_sites()
    if not sites:
        raise RefusalError(f"this {lm.family} model has no MoE layer whose routing can be read")
    counts = {layer: torch.zeros(n, dtype=torch.float64) for layer, (_, n) in sites.items()}
    current: list[PromptBatch] = []

    def count(layer: int):  # noqa: ANN202
        def hook(module: object, args: tuple, output: object) -> None:
            choices = lm.router_choices(output)
            real = ~current[0].padding_mask.reshape(-1)
            chosen = choices.reshape(real.shape[0], -1)[real].reshape(-1)
            chosen = chosen[chosen < counts[layer].shape[0]]  # padding sentinels, if any
            counts[layer] += torch.bincount(chosen.cpu(), minlength=counts[layer].shape[0]).double()

        return hook

    with ExitStack() as stack, intervention.apply(lm):
        for layer, (module, _) in sites.items():
            handle = module.register_forward_hook(count(layer))
            stack.callback(handle.remove)
        for chunk in iter_batches(instructions, batch_size):
            current[:] = [lm.batch(chunk)]
            lm.forward_logits(current[0])
    return {layer: (c / c.sum().clamp_min(1)).float() for layer, c in counts.items()}


@dataclass
class LayerRouting:
    layer: int
    harmful: Tensor  # (n_experts,) frequencies
    harmless: Tensor
    harmful_ablated: Tensor

    @property
    def difference(self) -> Tensor:
        return self.harmful - self.harmless

    def to_dict(self, top: int = 5) -> dict[str, object]:
        diff = self.difference
        order = diff.abs().argsort(descending=True)[:top].tolist()
        return {
            "layer": self.layer,
            "tv_harmful_vs_harmless": float(0.5 * diff.abs().sum()),
            "tv_harmful_vs_ablated": float(0.5 * (self.harmful - self.harmful_ablated).abs().sum()),
            "top_experts": [{"expert": e, "difference": float(diff[e])} for e in order],
            "harmful": self.harmful.tolist(),
            "harmless": self.harmless.tolist(),
            "harmful_ablated": self.harmful_ablated.tolist(),
        }


def routing_report(
    lm: ChatLM, harmful: Sequence[str], harmless: Sequence[str], direction: Tensor, *, batch_size: int = 16
) -> list[LayerRouting]:
    """Per MoE layer: routing of harmful vs harmless prompts, and of harmful prompts under ablation."""
    a = routing_frequencies(lm, harmful, batch_size=batch_size)
    b = routing_frequencies(lm, harmless, batch_size=batch_size)
    c = routing_frequencies(lm, harmful, Intervention("ablation", direction), batch_size=batch_size)
    return [LayerRouting(layer, a[layer], b[layer], c[layer]) for layer in sorted(a)]
