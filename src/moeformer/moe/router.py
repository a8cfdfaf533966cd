"""The gating network (article section 3): which experts each token goes to, with what weight.

Shapes: N tokens, D model width, E routed experts, K experts per token, G expert groups.

Scoring and selection, covering the classic routers by configuration:

- softmax then top-k, renormalised (Mixtral; GShard top-2) or not (Switch k=1, DeepSeekMoE):
      s = softmax(x W_g^T);  chosen = TopK(s);  w = s[chosen] (/ sum s[chosen])
- noisy top-k (Shazeer et al. 2017, eq. 3-5), training only:
      H(x) = x W_g + StandardNormal() * Softplus(x W_noise)
- DeepSeek-V3 (sigmoid affinities, section 2.1.2 of the V3 report): s = sigmoid(x W_g^T);
  experts are *chosen* by s + b (b: the auxiliary-loss-free balancing bias, never trained by
  gradients) but *weighted* by s, renormalised over the k chosen, times ``routed_scaling``.
- group-limited routing (DeepSeek-V2/V3): each group of E / G experts is scored by the sum of
  its two best (biased) scores; only the ``topk_group`` best groups may be chosen from.
- expert choice (Zhou et al. 2022; :meth:`Router.choose_tokens`): experts pick their top tokens
  of the batch instead of tokens picking experts (non-causal layers only).
- hierarchical MoE (Shazeer et al. 2017, appendix B, the "gating tree" of the article): a
  primary gate picks ``topk_group`` groups, a secondary gate per group picks
  K / topk_group experts inside it; the weight is the product of both gates.

Router logits are computed in float32 whatever the model dtype (Switch Transformer's
"selective precision"): top-k choices and small weights are unstable in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moeformer.model_config import MoEConfig


@dataclass
class Routing:
    logits: Tensor  # (N, E) float32 router logits (with noise, when noisy gating trains)
    scores: Tensor  # (N, E) float32 affinities the balance losses use (probabilities or sigmoids)
    index: Tensor  # (N, K) int64 chosen experts; E marks an assignment dropped for capacity
    weights: Tensor  # (N, K) float32 gate weights, 0 where dropped


class Router(nn.Module):
    """x: (N, D) -> :class:`Routing`.

    Parameters: ``weight`` (E, D) like ``nn.Linear`` without bias; ``noise_weight`` (E, D) for
    noisy gating; ``group_weight`` (G, D) for the primary gate of hierarchical routing. Buffer
    ``expert_bias`` (E,) float32: the auxiliary-loss-free balancing bias, saved in checkpoints.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, config: MoEConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.config = n_experts, top_k, config
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        if config.noisy:
            self.noise_weight = nn.Parameter(torch.zeros(n_experts, d_model))
        self.hierarchical = config.group_routing == "hierarchical" and config.n_group > 1
        if self.hierarchical:
            self.group_weight = nn.Parameter(torch.empty(config.n_group, d_model))
            nn.init.normal_(self.group_weight, std=d_model**-0.5)
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))

    def forward(self, x: Tensor, logits_hook: Callable[[Tensor], Tensor] | None = None) -> Routing:
        """x: (N, D). ``logits_hook`` may read or replace the (N, E) logits before selection."""
        x32 = x.float()
        logits = F.linear(x32, self.weight.float())
        if self.config.noisy and self.training:
            noise_std = F.softplus(F.linear(x32, self.noise_weight.float()))
            logits = logits + torch.randn_like(logits) * noise_std
        if logits_hook is not None:
            logits = logits_hook(logits)
        if self.hierarchical:
            return self._hierarchical(x32, logits)
        scores = logits.softmax(-1) if self.config.score == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias  # the bias only steers selection
        if self.config.n_group > 1:
            choice = self._limit_groups(choice)
        index = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, index)
        if self.config.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(logits, scores, index, weights * self.config.routed_scaling)

    def choose_tokens(
        self, x: Tensor, real: Tensor | None, capacity_factor: float, logits_hook: Callable[[Tensor], Tensor] | None
    ) -> Routing:
        """Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368, section 3.1): each expert takes
        its top c tokens of the batch by affinity, c = ceil(capacity_factor * n / E) for n real tokens:

            S = softmax(X W_g^T) (N, E);  G, I = TopK(S^T, c) per expert;  y_t = sum_{e: t in I_e} S_te E_e(x_t)

        A token may be taken by several experts or by none (then only the residual carries it);
        the load is balanced by construction. Returned as token-major :class:`Routing` with K =
        the most experts any token got (E = no expert in the remaining slots), so the same sorted
        grouped kernels run it. It looks across the batch: never for causal layers.
        """
        logits = F.linear(x.float(), self.weight.float())
        if logits_hook is not None:
            logits = logits_hook(logits)
        scores = logits.softmax(-1)
        N, E = scores.shape
        n_real = N if real is None else int(real.sum())
        per_expert = min(N, max(1, math.ceil(capacity_factor * n_real / E)))
        eligible = scores if real is None else scores.masked_fill(~real[:, None], -1.0)  # padding never wins
        taken = eligible.topk(per_expert, dim=0).indices  # (c, E) token ids per expert
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, taken, True)
        if real is not None:  # fewer real tokens than c: the -1 rows were taken; give them back
            chosen &= real[:, None]
        width = max(1, int(chosen.sum(1).max()))
        experts = torch.arange(E, device=x.device).expand(N, E)
        index = torch.where(chosen, experts, E).sort(dim=1).values[:, :width]  # chosen experts first
        weights = scores.gather(1, index.clamp(max=E - 1)).masked_fill(index == E, 0.0)
        return Routing(logits, scores, index, weights)

    def _limit_groups(self, choice: Tensor) -> Tensor:
        """Mask (with -inf) every expert outside each token's ``topk_group`` best groups."""
        N, G = choice.shape[0], self.config.n_group
        grouped = choice.view(N, G, self.n_experts // G)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
        keep_groups = group_score.topk(self.config.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, self.n_experts)

    def _hierarchical(self, x32: Tensor, logits: Tensor) -> Routing:
        """Two-level gating: groups first, then experts inside each chosen group."""
        N, G, a = x32.shape[0], self.config.n_group, self.config.topk_group
        per_group = self.n_experts // G
        b = self.top_k // a  # experts per chosen group
        group_probs = F.linear(x32, self.group_weight.float()).softmax(-1)  # (N, G)
        inner = logits.view(N, G, per_group).softmax(-1)  # (N, G, E/G)
        group_w, group_idx = group_probs.topk(a, dim=-1)  # (N, a)
        inner_w, inner_idx = inner.gather(1, group_idx[..., None].expand(N, a, per_group)).topk(b, dim=-1)
        if self.config.normalize:
            group_w = group_w / group_w.sum(-1, keepdim=True)
            inner_w = inner_w / inner_w.sum(-1, keepdim=True)
        weights = (group_w[..., None] * inner_w).reshape(N, a * b)
        index = (group_idx[..., None] * per_group + inner_idx).reshape(N, a * b)
        scores = (group_probs[..., None] * inner).view(N, self.n_experts)  # a distribution over E
        return Routing(logits, scores, index, weights * self.config.routed_scaling)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # model.to(bf16) casts every float buffer; the bias must stay float32, or gamma-sized
        # steps vanish below bf16's resolution (a 1e-3 step is lost above 0.5).
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        return self

    @torch.no_grad()
    def update_bias(self, load: Tensor) -> None:
        """Auxiliary-loss-free balancing step: b_i += gamma * sign(mean load - load_i).

        ``load``: (E,) tokens per expert summed over every micro-batch (and data-parallel rank)
        since the last optimiser step. Called once per optimiser step, never from forward.
        """
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)


def apply_capacity(routing: Routing, capacity: int | Tensor) -> tuple[Routing, Tensor]:
    """Drop the assignments beyond ``capacity`` tokens per expert (GShard / Switch); ``capacity``
    may be a 0-dim tensor (computed on the device, so that no host sync breaks a compiled graph).

    Earlier choices have priority: every token's first choice is served before any second
    choice, and within a choice rank, earlier tokens first. A dropped assignment gets index E
    and weight 0 (the token then rides on the residual). Returns (routing, dropped mask (N, K)).
    """
    N, K = routing.index.shape
    E = routing.scores.shape[1]
    flat = routing.index.t().reshape(-1)  # slot-major: all first choices, then all second ...
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E + 1)
    starts = counts.cumsum(0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    dropped = ((rank >= capacity) & (flat < E)).view(K, N).t()
    index = routing.index.masked_fill(dropped, E)
    weights = routing.weights.masked_fill(dropped, 0.0)
    return Routing(routing.logits, routing.scores, index, weights), dropped
