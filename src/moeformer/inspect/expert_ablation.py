"""Disable each token's top routed experts: DeepSeekMoE's redundancy test (Dai et al. 2024, sec. 4.5).

The paper masks, for every token, the routed experts with the highest routing probability and
lets the router pick its top-K among the rest; the more the loss rises, the less the remaining
experts can stand in for the masked ones, i.e. the less redundant (more specialised) they are.
Here the masked experts' router logits are set to -inf before selection, through each MoE
layer's ``router_logits`` hook point, so that with softmax routing the affinities are
renormalised over the remaining experts (with sigmoid routing a masked expert scores 0). Shared
experts are untouched: they are not routed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from moeformer.hooks import add_hooks
from moeformer.inspect.routing import moe_layers


@contextmanager
def disable_top_experts(model: nn.Module, n: int) -> Iterator[None]:
    """Inside the block every MoE layer routes each token past its ``n`` best routed experts.

    ``n`` must leave the layer's top-K choices possible: 0 <= n <= E - K for every layer (checked
    before any hook is attached). n = 0 changes nothing.
    """
    layers = moe_layers(model)
    for name, layer in layers.items():
        E, K = layer.router.n_experts, layer.router.top_k
        if layer.router.hierarchical:
            raise ValueError(
                f"{name}: hierarchical routing picks experts inside groups; disabling top experts needs a flat router"
            )
        if not 0 <= n <= E - K:
            raise ValueError(
                f"{name}: can disable 0 to {E - K} top experts (E = {E} routed experts, top-K = {K}), not {n}"
            )
    if n == 0:
        yield
        return

    def mask_top(logits: Tensor, name: str) -> Tensor:
        top = logits.topk(n, dim=-1).indices  # (N, n): by logit = by affinity (softmax/sigmoid are monotone)
        return logits.scatter(-1, top, float("-inf"))

    with add_hooks(model, {f"{name}.ffn.router_logits": mask_top for name in layers}):
        yield
