"""Where refusal lives inside an MoE: which experts carry the refusal direction (issue 15).

For every MoE layer of a moeformer DecoderLM, at the post-instruction positions (the template
tokens after the instruction, where the paper reads its directions), over harmful and over
harmless prompts:

- routing: how often each routed expert is chosen, with a two-sided two-proportion z-test per
  expert (harmful vs harmless choice rates) and Benjamini-Hochberg control of the false-discovery
  rate over every (layer, expert) test, so that noise is not read as specialisation;
- writes: how much each routed expert writes along the unit direction r per token, gate included,
  mean over tokens (an expert not chosen for a token writes 0 for it):
      w_e = mean_t g_te (E_e(x_t) . r),      and the shared experts' mean_t (S(x_t) . r);
- interventions (context managers, combined with the refusal score by the caller):
  :func:`mask_experts` takes experts out of routing (a router logit of -inf and a balancing bias of
  -inf, so that neither softmax nor sigmoid routing can pick them; equal to a layer built without
  them, for softmax routing exactly), and :func:`ablate_in_part` removes r from the routed
  experts' output only or from the shared experts' only.

Hugging Face MoE families are not read yet: their expert modules differ per family.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from moeformer.moe.layer import MoELayer
from moeformer.refusal.interventions import project_out, unit
from moeformer.refusal.lm import ChatLM, RefusalError, iter_batches


@dataclass
class LayerExperts:
    layer: int
    chosen: dict[str, Tensor]  # "harmful"/"harmless" -> (E,) choices at post-instruction tokens
    tokens: dict[str, int]  # post-instruction tokens seen per side
    routed_write: dict[str, Tensor]  # side -> (E,) mean gate-weighted write along r per token
    shared_write: dict[str, float]  # side -> mean write along r of the shared experts (0 without)
    p_value: Tensor  # (E,) two-proportion z-test, harmful vs harmless choice rate
    significant: Tensor | None = None  # (E,) bool, Benjamini-Hochberg over every test of the study

    def to_dict(self) -> dict[str, object]:
        rate = {s: (c / max(self.tokens[s], 1)).tolist() for s, c in self.chosen.items()}
        return {"layer": self.layer, "tokens": self.tokens, "choice_rate": rate, "p_value": self.p_value.tolist(),
                "significant": None if self.significant is None else self.significant.tolist(),
                "routed_write": {s: w.tolist() for s, w in self.routed_write.items()},
                "shared_write": self.shared_write}  # fmt: skip


def moe_layers(lm: ChatLM) -> dict[int, MoELayer]:
    layers = getattr(lm.model, "layers", None)
    found = {i: block.ffn for i, block in enumerate(layers or []) if isinstance(getattr(block, "ffn", None), MoELayer)}
    if not found:
        raise RefusalError(f"the expert study reads moeformer MoE layers; this {lm.family} model has none")
    return found


def _per_expert_write(layer: MoELayer, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """x: (N, D) the layer's input at the tokens read -> routed writes (N, E) and shared writes (N,)."""
    routing = layer.router(x, logits_hook=layer.router_logits)
    experts, E = layer.experts, layer.router.n_experts
    N, K = routing.index.shape
    writes = x.new_zeros(N, E)
    valid = routing.index < E
    token, slot = valid.nonzero(as_tuple=True)
    e = routing.index[token, slot]
    h = torch.einsum("pd,phd->ph", x[token], experts.first_weight[e])
    if experts.up_bias is not None:
        h = h + experts.up_bias[e]
    y = torch.einsum("ph,pdh->pd", experts.activate(h), experts.down_proj[e])
    if experts.down_bias is not None:
        y = y + experts.down_bias[e]
    writes.index_put_((token, e), routing.weights[token, slot].to(y.dtype) * (y @ r), accumulate=True)
    shared = layer.shared_output(x) @ r if layer.shared_experts is not None else x.new_zeros(N)
    return writes, shared


@torch.no_grad()
def expert_study(
    lm: ChatLM, direction: Tensor, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16,
    fdr: float = 0.05,
) -> list[LayerExperts]:  # fmt: skip
    """Routing frequencies (with significance) and writes along ``direction`` of every MoE layer."""
    layers = moe_layers(lm)
    r = unit(lm.check_direction(direction))
    n = lm.n_eoi
    found = {i: {"chosen": {}, "tokens": {}, "routed": {}, "shared": {}} for i in layers}
    for side, texts in (("harmful", harmful), ("harmless", harmless)):
        if not texts:
            raise RefusalError(f"the expert study needs {side} instructions")
        inputs: dict[int, list[Tensor]] = {i: [] for i in layers}
        handles = [layers[i].register_forward_hook(_keep_last(inputs[i], n)) for i in layers]
        try:
            for chunk in iter_batches(texts, batch_size):
                lm.forward_logits(lm.batch(chunk))
        finally:
            for handle in handles:
                handle.remove()
        for i, layer in layers.items():
            x = torch.cat(inputs[i])
            routed, shared = _per_expert_write(layer, x.to(layer.router.weight.dtype), r.to(x.dtype))
            index = layer.router(x, logits_hook=layer.router_logits).index
            E = layer.router.n_experts
            found[i]["chosen"][side] = torch.bincount(index[index < E], minlength=E).double().cpu()
            found[i]["tokens"][side] = x.shape[0]
            found[i]["routed"][side] = routed.mean(0).cpu()
            found[i]["shared"][side] = float(shared.mean())
    out = []
    for i, f in found.items():
        p = two_proportion_p(f["chosen"]["harmful"], f["tokens"]["harmful"], f["chosen"]["harmless"],
                             f["tokens"]["harmless"])  # fmt: skip
        out.append(LayerExperts(i, f["chosen"], f["tokens"], f["routed"], f["shared"], p))
    flags = benjamini_hochberg(torch.cat([layer.p_value for layer in out]), fdr)
    start = 0
    for layer in out:
        layer.significant = flags[start : start + layer.p_value.numel()]
        start += layer.p_value.numel()
    return out


def _keep_last(store: list[Tensor], n: int):  # noqa: ANN202
    """A forward hook keeping the layer input's last ``n`` positions of every row, as (rows * n, D)."""

    def hook(module: object, args: tuple, output: object) -> None:
        store.append(args[0][:, -n:].reshape(-1, args[0].shape[-1]).float())

    return hook


def _mask_logits(index: Tensor):  # noqa: ANN202
    def hook(module: object, args: tuple, logits: Tensor) -> Tensor:
        return logits.index_fill(-1, index.to(logits.device), float("-inf"))

    return hook


def two_proportion_p(count_a: Tensor, n_a: int, count_b: Tensor, n_b: int) -> Tensor:
    """Two-sided p-values of H0: rate_a = rate_b, per entry (pooled z-test; a choice is one of the
    k picks of a token, so a token counts once per expert: rates are choices per token, <= 1)."""
    pa, pb = count_a / max(n_a, 1), count_b / max(n_b, 1)
    pooled = (count_a + count_b) / max(n_a + n_b, 1)
    se = (pooled * (1 - pooled) * (1 / max(n_a, 1) + 1 / max(n_b, 1))).sqrt()
    z = torch.where(se > 0, (pa - pb) / se.clamp_min(1e-300), torch.zeros_like(se))
    return torch.erfc(z.abs() / math.sqrt(2.0))


def benjamini_hochberg(p: Tensor, q: float) -> Tensor:
    """Which hypotheses the Benjamini-Hochberg step-up procedure rejects at false-discovery rate q."""
    m = p.numel()
    order = p.argsort()
    passed = p[order] <= q * torch.arange(1, m + 1, dtype=p.dtype) / m
    k = int(passed.nonzero().max()) + 1 if passed.any() else 0
    out = torch.zeros(m, dtype=torch.bool)
    out[order[:k]] = True
    return out


def refusal_experts(study: Sequence[LayerExperts], n: int) -> dict[int, list[int]]:
    """Per layer, the n routed experts whose harmful-minus-harmless write along r is largest."""
    out = {}
    for layer in study:
        lean = layer.routed_write["harmful"] - layer.routed_write["harmless"]
        out[layer.layer] = lean.argsort(descending=True)[:n].tolist()
    return out


def random_experts(study: Sequence[LayerExperts], n: int, seed: int) -> dict[int, list[int]]:
    """The control: n routed experts per layer drawn at random (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return {layer.layer: torch.randperm(layer.p_value.numel(), generator=g)[:n].tolist() for layer in study}


@contextlib.contextmanager
def mask_experts(lm: ChatLM, experts: dict[int, list[int]]) -> Iterator[None]:
    """Take ``experts`` (layer -> routed expert ids) out of routing while the context lasts."""
    layers = moe_layers(lm)
    unknown = [i for i in experts if i not in layers]
    if unknown:
        raise RefusalError(f"layers {unknown} have no MoE layer; MoE layers: {sorted(layers)}")
    handles, saved = [], {}
    try:
        for i, ids in experts.items():
            if not ids:
                continue
            layer, index = layers[i], torch.tensor(ids, dtype=torch.long)
            if len(ids) > layer.router.n_experts - layer.router.top_k:
                raise RefusalError(f"layer {i}: masking {len(ids)} of {layer.router.n_experts} experts leaves fewer "
                                   f"than top_k = {layer.router.top_k} to choose from")  # fmt: skip
            saved[i] = layer.router.expert_bias.clone()
            layer.router.expert_bias[index] = float("-inf")  # sigmoid scores: the choice is score + bias
            handles.append(layer.router_logits.register_forward_hook(_mask_logits(index)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for i, bias in saved.items():
            layers[i].router.expert_bias.copy_(bias)


@contextlib.contextmanager
def ablate_in_part(lm: ChatLM, direction: Tensor, part: Literal["routed", "shared"]) -> Iterator[None]:
    """Remove r from the routed experts' output only, or from the shared experts' only, at every MoE layer."""
    r = unit(lm.check_direction(direction))
    handles = []
    for layer in moe_layers(lm).values():
        if part == "routed":
            handles.append(layer.experts.register_forward_hook(lambda m, a, y: project_out(y, r.to(y.dtype))))
        elif part == "shared":
            if layer.shared_experts is None:
                raise RefusalError("this model's MoE layers have no shared experts to ablate in")
            handles.append(layer.shared_experts.register_forward_hook(
                lambda m, a, out: type(out)(project_out(out.output, r.to(out.output.dtype)))))  # fmt: skip
        else:
            raise RefusalError(f"part must be 'routed' or 'shared', got {part!r}")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
