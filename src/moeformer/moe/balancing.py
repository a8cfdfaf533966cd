"""Auxiliary-loss-free load balancing (DeepSeek-V3 report, section 2.1.2; Wang et al. 2024).

Each MoE router keeps a bias b (a buffer: no gradient, no weight decay, saved in checkpoints)
that is added to the affinity scores only to choose experts. After every optimiser step:

    b_i <- b_i + gamma * sign(mean_j load_j - load_i)

with loads summed over every micro-batch of that step (and, with data parallelism, every rank),
so an overloaded expert becomes less attractive and an idle one more. Loads arrive through the
models' outputs (``ModelOutput.reports.stats``), never through global state:

    tracker = LoadTracker()
    for micro_batch in step_batches:
        out = model(...); (loss + out.aux_loss).backward(); tracker.add(out.reports.stats)
    optimizer.step(); tracker.update_biases(model)   # then starts counting afresh
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from moeformer.moe.router import Router


class LoadTracker:
    """Sums tokens-per-expert by layer name ("layers.3", "decoder.1", ...) between updates."""

    def __init__(self) -> None:
        self.loads: dict[str, Tensor] = {}

    def add(self, stats: Mapping[str, Mapping[str, Tensor]]) -> None:
        for layer, layer_stats in stats.items():
            load = layer_stats.get("tokens_per_expert")
            if load is None:
                continue
            self.loads[layer] = self.loads[layer] + load if layer in self.loads else load.clone()

    def update_biases(self, model: nn.Module) -> None:
        """Apply one bias step to every tracked layer whose router balances without a loss."""
        routers = routers_by_layer(model, self.loads)
        for layer, load in self.loads.items():
            router = routers[layer]
            if router.config.bias_update_rate > 0:
                router.update_bias(load)
        self.loads = {}


def routers_by_layer(model: nn.Module, layers: Iterable[str]) -> dict[str, Router]:
    """The one :class:`Router` inside each named layer ("layers.3", "decoder.1", ...), found by type,
    not by where a model keeps it; a layer with none or several is an error that names it."""
    routers = [(name, module) for name, module in model.named_modules() if isinstance(module, Router)]
    out = {}
    for layer in layers:
        inside = [module for name, module in routers if name.startswith(f"{layer}.")]
        if len(inside) != 1:
            raise ValueError(f"layer {layer!r} holds {len(inside)} routers; expected one")
        out[layer] = inside[0]
    return out
