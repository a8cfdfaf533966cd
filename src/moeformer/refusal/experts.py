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

Works on moeformer DecoderLMs and on transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and
DeepSeek-V3 (:mod:`moeformer.refusal.moe_views`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from moeformer.refusal.interventions import project_out, unit
from moeformer.refusal.lm import ChatLM, RefusalError, iter_batches
from moeformer.refusal.moe_views import MoEView, moe_views


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


def _per_expert_write(view: MoEView, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x: (N, D) the layer's input at the tokens read -> chosen experts (N, K), routed writes (N, E)
    and shared writes (N,) along r."""
    index, weights = view.route(x)
    E, N = view.n_experts, x.shape[0]
    writes = x.new_zeros(N, E)
    token, slot = (index < E).nonzero(as_tuple=True)
    e = index[token, slot]
    y = view.expert_outputs(x[token], e)
    writes.index_put_((token, e), weights[token, slot].to(y.dtype) * (y @ r), accumulate=True)
    shared = view.shared(x) @ r if view.shared is not None else x.new_zeros(N)
    return index, writes, shared


@torch.no_grad()
def expert_study(
    lm: ChatLM, direction: Tensor, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16,
    fdr: float = 0.05,
) -> list[LayerExperts]:  # fmt: skip
    """Routing frequencies (with significance) and writes along ``direction`` of every MoE layer."""
    views = moe_views(lm)
    r = unit(lm.check_direction(direction))
    n = lm.n_eoi
    found = {i: {"chosen": {}, "tokens": {}, "routed": {}, "shared": {}} for i in views}
    for side, texts in (("harmful", harmful), ("harmless", harmless)):
        if not texts:
            raise RefusalError(f"the expert study needs {side} instructions")
        inputs: dict[int, list[Tensor]] = {i: [] for i in views}
        handles = [views[i].block.register_forward_hook(_keep_last(inputs[i], n)) for i in views]
        try:
            for chunk in iter_batches(texts, batch_size):
                lm.forward_logits(lm.batch(chunk))
        finally:
            for handle in handles:
                handle.remove()
        for i, view in views.items():
            x = torch.cat(inputs[i])
            weight = next(view.routed_module.parameters())
            index, routed, shared = _per_expert_write(view, x.to(weight.dtype), r.to(weight.dtype))
            E = view.n_experts
            found[i]["chosen"][side] = torch.bincount(index[index < E].reshape(-1), minlength=E).double().cpu()
            found[i]["tokens"][side] = x.shape[0]
            found[i]["routed"][side] = routed.float().mean(0).cpu()
            found[i]["shared"][side] = float(shared.float().mean())
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


def _project_output(r: Tensor):  # noqa: ANN202
    """A forward hook removing r from a module's output (a tensor, or an FFNOutput's ``output``)."""

    def hook(module: object, args: tuple, out: object) -> object:
        if isinstance(out, Tensor):
            return project_out(out, r.to(out.device))
        return type(out)(project_out(out.output, r.to(out.output.device)))

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
    views = moe_views(lm)
    unknown = [i for i in experts if i not in views]
    if unknown:
        raise RefusalError(f"layers {unknown} have no MoE layer; MoE layers: {sorted(views)}")
    for i, ids in experts.items():
        if len(ids) > views[i].n_experts - views[i].top_k:
            raise RefusalError(f"layer {i}: masking {len(ids)} of {views[i].n_experts} experts leaves fewer than "
                               f"top_k = {views[i].top_k} to choose from")  # fmt: skip
    with contextlib.ExitStack() as stack:
        for i, ids in experts.items():
            if ids:
                stack.enter_context(views[i].mask(ids))
        yield


@contextlib.contextmanager
def ablate_in_part(lm: ChatLM, direction: Tensor, part: Literal["routed", "shared"]) -> Iterator[None]:
    """Remove r from the routed experts' output only, or from the shared experts' only, at every MoE layer."""
    r = unit(lm.check_direction(direction))
    if part not in ("routed", "shared"):
        raise RefusalError(f"part must be 'routed' or 'shared', got {part!r}")
    handles = []
    for view in moe_views(lm).values():
        module = view.routed_module if part == "routed" else view.shared_module
        if module is None:
            raise RefusalError("this model's MoE layers have no shared experts to ablate in")
        handles.append(module.register_forward_hook(_project_output(r)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
