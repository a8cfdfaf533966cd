"""The MoE layer kinds that replace the Transformer's FFN sublayer, and their one factory.

- ``dense``: the plain FFN, the baseline every MoE is compared with.
- ``soft``: the article's basic MoE (Jacobs et al. 1991; Shazeer et al. 2017 without sparsity):
  y = sum_i G(x)_i E_i(x) with G = softmax(x W_g) over all experts; every expert runs.
- ``topk``: sparse MoE, y = sum_{i in TopK} g_i E_i(x): Shazeer's noisy top-k, Switch (k=1),
  GShard (k=2 with capacity), Mixtral (softmax over the chosen k), by router options.
- ``deepseek``: DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066): fine-grained experts
  (each of N experts split into m, route to mK of mN) plus K_s shared experts every token uses:
  y = sum_{i<=K_s} FFN_i(x) + sum_{i in TopK} g_i FFN_i(x); DeepSeek-V3 routing by options.
  Qwen2-MoE's variant gates the shared part per token: sigmoid(x . w_s) * sum_{i<=K_s} FFN_i(x).
- ``expert_choice``: experts pick tokens (Zhou et al. 2022, arXiv 2202.09368): each of E experts
  takes its top capacity_factor * N / E tokens of the batch (capacity_factor defaults to top_k:
  the same compute as top-k routing); balanced by construction, no balance loss. Non-causal: a
  seq2seq encoder's layers only (:func:`moeformer.models.ffn_factory.build_ffn`).

Every layer maps x (B, T, D) to an :class:`~moeformer.layers.feedforward.FFNOutput` whose
``aux_losses`` hold the enabled, weighted balance terms and whose ``stats`` hold per-expert
token counts, dropped fraction, router entropy and the unweighted loss terms (detached).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moeformer.hooks import HookPoint
from moeformer.layers.feedforward import FeedForward, FFNOutput
from moeformer.model_config import MoEConfig
from moeformer.moe import losses
from moeformer.moe.experts import Experts
from moeformer.moe.router import Router, Routing, apply_capacity

Activation = Literal["relu", "gelu", "swiglu"]


class MoELayer(nn.Module):
    """Router -> experts (-> + shared experts). Kinds 'soft', 'topk' and 'deepseek'."""

    def __init__(
        self, config: MoEConfig, d_model: int, expert_hidden: int, *, activation: Activation, bias: bool
    ) -> None:
        super().__init__()
        if config.kind not in ("soft", "topk", "deepseek", "expert_choice"):
            raise ValueError(f"MoELayer builds kinds 'soft', 'topk', 'deepseek', 'expert_choice', not {config.kind!r}")
        self.config = config
        hidden = expert_hidden // config.granularity
        n_experts = config.routed_experts
        top_k = n_experts if config.kind in ("soft", "expert_choice") else config.routed_top_k
        if config.kind == "soft":  # a plain softmax gate over every expert, nothing renormalised
            config = _soft_router_config(config)
        self.router = Router(d_model, n_experts, top_k, config)
        self.router_logits = HookPoint()
        self.experts = Experts(n_experts, d_model, hidden, activation=activation, bias=bias, backend=config.backend)
        shared_hidden = config.shared_hidden or config.n_shared * hidden
        self.shared_experts = (
            FeedForward(d_model, shared_hidden, activation=activation, bias=bias) if config.n_shared else None
        )
        if config.shared_gate:  # Qwen2-MoE: a per-token sigmoid gate on the shared output
            self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)
        self.expert_parallel: nn.Module | None = None  # set by moe.parallel.shard_experts

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, *, report: bool = True) -> FFNOutput:
        """x: (B, T, D); padding_mask: (B, T) True at padding (not routed, left out of the losses).

        ``report=False`` leaves ``aux_losses`` and ``stats`` empty: the decoding functions ask for
        that (about 20 small kernels per layer and step; 7% of a batch-1 generation, BENCHMARKS.md).
        """
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        real = None if padding_mask is None else ~padding_mask.reshape(B * T)
        if self.config.kind == "expert_choice":
            return self._expert_choice(x, flat, real, report)
        routing = self.router(flat, logits_hook=self.router_logits)
        if real is not None:  # padding takes no expert and no capacity
            routing = Routing(
                routing.logits,
                routing.scores,
                routing.index.masked_fill(~real[:, None], self.router.n_experts),
                routing.weights.masked_fill(~real[:, None], 0.0),
            )
        chosen = routing.index  # before capacity: what the balance losses measure
        dropped = torch.zeros_like(chosen, dtype=torch.bool)
        if self.config.capacity_factor is not None:
            n_real = B * T if real is None else real.sum(dtype=torch.float64)  # a tensor: no host sync
            capacity = self.config.capacity_factor * n_real * self.router.top_k / self.router.n_experts
            routing, dropped = apply_capacity(routing, math.ceil(capacity) if real is None else capacity.ceil())
        shared = (lambda: self.shared_output(flat)) if self.shared_experts is not None else None
        if self.expert_parallel is None:
            out = self.experts(flat, routing.index, routing.weights)
            out = out if shared is None else out + shared()
        else:  # the shared experts run while the routed rows travel
            out = self.expert_parallel(flat, routing.index, routing.weights, self.experts, meanwhile=shared)
        if not report:
            return FFNOutput(out.view(B, T, D))
        aux, stats = self._losses_and_stats(routing, chosen, dropped, real, B, T)
        return FFNOutput(out.view(B, T, D), aux, stats)

    def _expert_choice(self, x: Tensor, flat: Tensor, real: Tensor | None, report: bool) -> FFNOutput:
        """Experts pick tokens (:meth:`Router.choose_tokens`); the same grouped kernels run them."""
        factor = self.config.capacity_factor if self.config.capacity_factor is not None else self.config.top_k
        routing = self.router.choose_tokens(flat, real, factor, self.router_logits)
        if self.expert_parallel is None:
            out = self.experts(flat, routing.index, routing.weights)
        else:
            out = self.expert_parallel(flat, routing.index, routing.weights, self.experts)
        if not report:
            return FFNOutput(out.view(x.shape))
        E = self.router.n_experts
        taken = (routing.index < E).sum(1)
        if real is not None:
            taken, scores = taken[real], routing.scores[real]
        else:
            scores = routing.scores
        aux: dict[str, Tensor] = {}
        terms: dict[str, Tensor] = {}
        if self.config.z_loss:
            terms["z"] = losses.router_z_loss(routing.logits if real is None else routing.logits[real])
            aux["z"] = self.config.z_loss * terms["z"]
        stats = {
            "tokens_per_expert": torch.bincount(routing.index.reshape(-1), minlength=E + 1)[:E].float(),
            "dropped_fraction": (taken == 0).float().mean().nan_to_num(0.0),  # tokens no expert took
            "experts_per_token": taken.float().mean().nan_to_num(0.0),
            "router_entropy": losses.router_entropy(scores),
            **{f"loss_{k}": v for k, v in terms.items()},
        }
        return FFNOutput(out.view(x.shape), aux, {k: v.detach() for k, v in stats.items()})

    def shared_output(self, flat: Tensor) -> Tensor:
        """flat: (N, D) -> the shared experts' (gated) contribution (N, D)."""
        shared = self.shared_experts(flat).output
        if self.config.shared_gate:
            shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
        return shared

    def _losses_and_stats(
        self, routing: Routing, chosen: Tensor, dropped: Tensor, real: Tensor | None, B: int, T: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        c, E = self.config, self.router.n_experts
        scores, logits = routing.scores, routing.logits
        chosen_by_sequence = chosen.view(B, T, -1)  # padding rows hold the sentinel E
        if real is not None:  # one nonzero, not five masks: the selections share one row count when compiled
            rows = real.nonzero().squeeze(1)
            scores, logits, chosen, dropped, index = (
                t.index_select(0, rows) for t in (scores, logits, chosen, dropped, routing.index)
            )
        else:
            index = routing.index
        terms: dict[str, Tensor] = {"balance": losses.load_balance_loss(scores, chosen)}
        weighted: dict[str, Tensor] = {}
        if c.balance_loss:
            weighted["balance"] = c.balance_loss * terms["balance"]
        if c.device_loss:
            devices = c.n_devices if self.expert_parallel is None else self.expert_parallel.size
            terms["device_balance"] = losses.device_balance_loss(scores, chosen, devices)
            weighted["device_balance"] = c.device_loss * terms["device_balance"]
        if c.seq_balance_loss:
            padding = None if real is None else ~real.view(B, T)
            terms["seq_balance"] = losses.sequence_balance_loss(
                routing.scores.view(B, T, E), chosen_by_sequence, padding_mask=padding
            )
            weighted["seq_balance"] = c.seq_balance_loss * terms["seq_balance"]
        if c.z_loss:
            terms["z"] = losses.router_z_loss(logits)
            weighted["z"] = c.z_loss * terms["z"]
        stats = {
            "tokens_per_expert": torch.bincount(index.reshape(-1), minlength=E + 1)[:E].float(),
            # all padding: mean of nothing is NaN, read as 0 (no numel test: data-dependent when compiled)
            "dropped_fraction": dropped.float().mean().nan_to_num(0.0),
            "router_entropy": losses.router_entropy(scores),
            **{f"loss_{k}": v for k, v in terms.items()},
        }
        return weighted, {k: v.detach() for k, v in stats.items()}


def _soft_router_config(config: MoEConfig) -> MoEConfig:
    return replace(config, normalize=False, score="softmax", n_group=1, topk_group=1, noisy=False)


def build_moe(
    *,
    kind: Literal["dense", "soft", "topk", "deepseek", "expert_choice"],
    d_model: int,
    n_experts: int = 8,
    top_k: int = 2,
    expert_hidden: int,
    n_shared: int = 0,
    activation: Activation = "swiglu",
    bias: bool = False,
    **options: Any,
) -> nn.Module:
    """The one entry point: e.g. ``build_moe(kind="deepseek", d_model=512, n_experts=64, top_k=6,
    expert_hidden=256, n_shared=2, score="sigmoid")``. ``options`` are :class:`MoEConfig` fields.

    ``dense`` returns the plain FFN of hidden size ``expert_hidden``.
    """
    config = MoEConfig(
        kind=kind, n_experts=n_experts, top_k=top_k, expert_hidden=expert_hidden, n_shared=n_shared, **options
    )
    return moe_from_config(config, d_model, expert_hidden, activation=activation, bias=bias)


def moe_from_config(config: MoEConfig, d_model: int, d_ff: int, *, activation: Activation, bias: bool) -> nn.Module:
    """The layer ``config`` describes; ``d_ff`` is used when ``config.expert_hidden`` is unset."""
    hidden = config.expert_hidden if config.expert_hidden is not None else d_ff
    if config.kind == "dense":
        return FeedForward(d_model, hidden, activation=activation, bias=bias)
    return MoELayer(config, d_model, hidden, activation=activation, bias=bias)


def segment_experts(*, n_experts: int, top_k: int, d_ff: int, granularity: int, n_shared: int) -> dict[str, int]:
    """DeepSeekMoE's equal-compute accounting (Dai et al. 2024, section 3): MoEConfig numbers.

    N coarse experts of hidden d_ff, K per token, each split into m = ``granularity`` experts
    of d_ff / m; K_s of the m*N become shared: m*N - K_s routed experts, m*K - K_s routed per
    token. Total and active parameters equal those of the coarse layer.
    """
    if d_ff % granularity:
        raise ValueError(f"granularity ({granularity}) must divide d_ff ({d_ff})")
    if not 0 <= n_shared < granularity * top_k:
        raise ValueError(f"n_shared must be in [0, m*K = {granularity * top_k}), got {n_shared}")
    return {
        "n_experts": granularity * n_experts - n_shared,
        "top_k": granularity * top_k - n_shared,
        "expert_hidden": d_ff // granularity,
        "n_shared": n_shared,
    }
