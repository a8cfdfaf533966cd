"""One view of every MoE layer the refusal tools read: moeformer's and transformers' (Mixtral,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3), so that the expert study is written once.

A view says how to route a token, run one expert ungated, compute the (gated) shared experts,
which modules' outputs are the routed sum and the shared part (for hooks), and how to take
experts out of routing. transformers' routers pick their experts inside ``forward``; masking them
re-routes from the router's own logits with the masked experts at -inf (and, for DeepSeek-V3,
at -inf in the biased choice scores), following each family's rule; with nothing masked the
re-routing equals the router's own output (tested for every family).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moeformer.moe.layer import MoELayer
from moeformer.refusal.lm import ChatLM, RefusalError


@dataclass
class MoEView:
    layer: int
    block: nn.Module  # its forward's first argument is the layer's normalised input (B, T, D)
    n_experts: int
    top_k: int
    route: Callable[[Tensor], tuple[Tensor, Tensor]]  # x (N, D) -> index (N, K) (E: none), weights (N, K)
    expert_outputs: Callable[[Tensor, Tensor], Tensor]  # x (P, D), expert ids (P,) -> ungated outputs (P, D)
    shared: Callable[[Tensor], Tensor] | None  # x (N, D) -> the shared experts' (gated) output (N, D)
    routed_module: nn.Module  # forward output: the gated sum of the routed experts
    shared_module: nn.Module | None  # forward output: the shared experts' output (before a scalar gate)
    mask: Callable[[list[int]], contextlib.AbstractContextManager]


def _stacked_expert_outputs(gate_up: Tensor, down: Tensor, act: Callable[[Tensor], Tensor]) -> Callable:
    """Experts stored as (E, 2H, D) gate-then-up rows and (E, D, H), SwiGLU-style: act(gate) * up."""

    def run(x: Tensor, e: Tensor) -> Tensor:
        gate, up = torch.einsum("pd,phd->ph", x, gate_up[e]).chunk(2, dim=-1)
        return torch.einsum("ph,pdh->pd", act(gate) * up, down[e])

    return run


def moe_views(lm: ChatLM) -> dict[int, MoEView]:
    """layer index -> view, for every MoE layer of ``lm``; RefusalError if it has none or an unknown kind."""
    layers = getattr(lm.model, "layers", None)
    if layers is not None and lm.family == "moeformer":
        views = {i: _native(i, block.ffn) for i, block in enumerate(layers) if isinstance(block.ffn, MoELayer)}
    else:
        views = {i: view for i, block in enumerate(lm._base.layers) if (view := _hf(i, block)) is not None}  # type: ignore[attr-defined]
    if not views:
        raise RefusalError(f"the expert study needs MoE layers; this {lm.family} model has none it can read")
    return views


# --- moeformer ----------------------------------------------------------------------------------------
def _native(i: int, layer: MoELayer) -> MoEView:
    experts = layer.experts

    def route(x: Tensor) -> tuple[Tensor, Tensor]:
        r = layer.router(x.to(layer.router.weight.dtype), logits_hook=layer.router_logits)
        return r.index, r.weights

    def outputs(x: Tensor, e: Tensor) -> Tensor:
        h = torch.einsum("pd,phd->ph", x, experts.first_weight[e])
        if experts.up_bias is not None:
            h = h + experts.up_bias[e]
        y = torch.einsum("ph,pdh->pd", experts.activate(h), experts.down_proj[e])
        return y + experts.down_bias[e] if experts.down_bias is not None else y

    return MoEView(i, layer, layer.router.n_experts, layer.router.top_k, route, outputs,
                   layer.shared_output if layer.shared_experts is not None else None, experts,
                   layer.shared_experts, lambda ids: _mask_native(layer, ids))  # fmt: skip


@contextlib.contextmanager
def _mask_native(layer: MoELayer, ids: list[int]) -> Iterator[None]:
    index = torch.tensor(ids, dtype=torch.long)
    saved = layer.router.expert_bias.clone()
    layer.router.expert_bias[index] = float("-inf")  # sigmoid scores: the choice is score + bias

    def hook(module: object, args: tuple, logits: Tensor) -> Tensor:
        return logits.index_fill(-1, index.to(logits.device), float("-inf"))

    handle = layer.router_logits.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        layer.router.expert_bias.copy_(saved)


# --- transformers -------------------------------------------------------------------------------------
def _hf(i: int, block: nn.Module) -> MoEView | None:
    moe = getattr(block, "mlp", None) or getattr(block, "block_sparse_moe", None)
    gate, experts = getattr(moe, "gate", None), getattr(moe, "experts", None)
    if gate is None or experts is None or not hasattr(experts, "gate_up_proj") or not hasattr(gate, "weight"):
        return None
    n, k = gate.weight.shape[0], gate.top_k

    def route(x: Tensor) -> tuple[Tensor, Tensor]:
        _, weights, index = gate(x)
        return index, weights.float()

    shared_module, shared = None, None
    if hasattr(moe, "shared_experts"):  # DeepSeek-V2/V3: always on
        shared_module = moe.shared_experts
        shared = moe.shared_experts
    elif hasattr(moe, "shared_expert"):  # Qwen2-MoE: scaled per token by sigmoid(x . w)
        shared_module = moe.shared_expert
        shared = lambda x: torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)  # noqa: E731
    outputs = _stacked_expert_outputs(experts.gate_up_proj, experts.down_proj, experts.act_fn)
    return MoEView(i, moe, n, k, route, outputs, shared, experts, shared_module,
                   lambda ids: _mask_hf(gate, ids))  # fmt: skip


def reroute(gate: nn.Module, x: Tensor, masked: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The output transformers' router ``gate`` gives for ``x`` (N, D), with ``masked`` experts
    unavailable: (logits, weights, indices), following the family's routing rule."""
    logits = F.linear(x.reshape(-1, gate.weight.shape[1]).float(), gate.weight.float())
    blocked = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    blocked[masked.to(logits.device)] = True
    if hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3: sigmoid, biased group-limited choice
        scores = logits.sigmoid()
        choice = (scores + gate.e_score_correction_bias).masked_fill(blocked, float("-inf"))
        G = gate.num_group
        grouped = choice.view(-1, G, gate.num_experts // G)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        best = group_scores.topk(gate.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, best, 1)
        choice = grouped.masked_fill(~keep.bool()[..., None], float("-inf")).view(choice.shape)
        index = choice.topk(gate.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if gate.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, weights * gate.routed_scaling_factor, index
    probs = logits.masked_fill(blocked, float("-inf")).softmax(-1)
    if hasattr(gate, "topk_method"):  # DeepSeek-V2: softmax, greedy or group-limited, scaled
        if gate.topk_method == "group_limited_greedy":
            G = gate.num_group
            group_scores = probs.view(-1, G, gate.num_experts // G).max(dim=-1).values
            best = group_scores.topk(gate.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores).scatter_(1, best, 1)
            probs = probs.masked_fill(~keep.bool().repeat_interleave(gate.num_experts // G, dim=1), 0.0)
        weights, index = probs.topk(gate.top_k, dim=-1, sorted=False)
        return logits, weights * gate.routed_scaling_factor, index
    weights, index = probs.topk(gate.top_k, dim=-1)  # Mixtral (always renormalised), Qwen2/3-MoE
    if getattr(gate, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights, index


@contextlib.contextmanager
def _mask_hf(gate: nn.Module, ids: list[int]) -> Iterator[None]:
    masked = torch.tensor(ids, dtype=torch.long)

    def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
        logits, weights, index = reroute(module, args[0], masked)
        return logits.to(output[0].dtype), weights.to(output[1].dtype), index

    handle = gate.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
