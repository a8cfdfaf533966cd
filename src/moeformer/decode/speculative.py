"""Self-speculative decoding with the model's own multi-token prediction modules.

DeepSeek-V3's report (section 5.4.3) keeps its MTP module at inference to draft the token after
next; the main model then checks the drafts and the next token in one pass. With D modules the
chain drafts up to D tokens, each module reading the one before it, as in training (report eq. 21):

    draft  d_1 ~ q_1 = MTP_1(h_t, Emb(x_{t+1})),  d_k ~ q_k = MTP_k(h^{k-1}_t, Emb(d_{k-1}))
    verify main([x_{t+1}, d_1 ... d_K]) -> p_1 ... p_{K+1}
    greedy: keep the drafts while d_j = argmax p_j; at the first miss take argmax p_j instead;
        if all K are kept, also take argmax p_{K+1}.
    sampling (Leviathan et al. 2023, Chen et al. 2023): keep d_j with probability
        min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from normalise(max(0, p_j - q_j));
        if all are kept draw from p_{K+1}.

So each main-model pass yields 1 ... K + 1 tokens, and the output is exactly what plain decoding
gives: greedy tokens are identical, and sampled tokens have exactly the target distribution
(p after temperature, top-k and top-p), whatever the drafts are.

Caches. Module k at position i reads x_{i+k}, so after a pass it can keep only the positions whose
token is settled (i <= N - k for N settled tokens); its last k - 1 positions were drafted from
drafts and are fed again in the next window, whose first input is the previous module's state at
its last kept position (the "carry"). Rows of a batch accept independently: slots that only some
rows keep become padding (never attended; their positions go to the next tokens), and slots no
row keeps are cut off, so batch 1 never carries padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeformer.decode.beam import check_left_padding
from moeformer.decode.sampling import check_sampling_options, filter_logits
from moeformer.models.cache import DecoderCache
from moeformer.models.decoder import DecoderLM


@dataclass
class SpeculativeOutput:
    tokens: Tensor  # (B, <= max_new_tokens), rows end at EOS, then repeat EOS (as greedy_generate)
    drafted: int  # drafts the main model checked (draft k only where drafts 1 ... k-1 were kept), all rows
    accepted: int  # drafts kept
    passes: int  # main-model forward passes after the prompt
    drafted_at: list[int] = field(default_factory=list)  # per draft depth k: drafts k checked (1 ... k-1 kept)
    accepted_at: list[int] = field(default_factory=list)  # per draft depth k: drafts k kept

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def acceptance_at(self) -> list[float]:
        """Per draft depth k: the share of checked k-th drafts that were kept (given 1 ... k-1 were)."""
        return [a / max(d, 1) for a, d in zip(self.accepted_at, self.drafted_at, strict=True)]


class _Chooser:
    """Greedy (``temperature=0``) or sampled choices from logits, with the speculative rule."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None):
        check_sampling_options(temperature, top_k, top_p)
        self.greedy = temperature == 0 or top_k == 1
        self.options = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.generator = generator

    def probs(self, logits: Tensor) -> Tensor:
        return torch.softmax(filter_logits(logits, **self.options), dim=-1)

    def pick(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, V) -> token (B,) and, when sampling, the distribution it came from."""
        if self.greedy:
            return logits.argmax(-1), None
        p = self.probs(logits)
        return torch.multinomial(p, 1, generator=self.generator)[:, 0], p

    def verify(self, drafts: Tensor, q: list[Tensor | None], logits: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """drafts (B, K), their distributions q (K of (B, V)), main logits (B, K + 1, V), real (B,):
        each row's drafts that were fed (the rest were padding) -> (kept (B,): how many leading
        drafts are kept, token (B,): the one after them)."""
        K = drafts.shape[1]
        fed = torch.arange(K, device=drafts.device) < real[:, None]
        if self.greedy:
            best = logits.argmax(-1)
            kept = ((best[:, :K] == drafts) & fed).long().cumprod(1).sum(1)
            return kept, best.gather(1, kept[:, None])[:, 0]
        p = self.probs(logits)
        rows = torch.arange(drafts.shape[0], device=drafts.device)
        kept = torch.zeros_like(rows)
        target = p[rows, kept]
        if K:
            qs = torch.stack([qk for qk in q if qk is not None], dim=1)  # (B, K, V)
            ratio = (p[:, :K].gather(2, drafts[..., None]) / qs.gather(2, drafts[..., None]).clamp_min(1e-30))[..., 0]
            u = torch.rand(ratio.shape, generator=self.generator, device=ratio.device)
            kept = ((u < ratio.clamp(max=1.0)) & fed).long().cumprod(1).sum(1)
            target = p[rows, kept]  # (B, V): p_j at the first rejection, p_{K+1} after K keeps
            residual = (target - qs[rows, kept.clamp(max=K - 1)]).clamp_min(0)
            empty = residual.sum(-1, keepdim=True) <= 0  # p == q: a rejection cannot happen; any row will do
            target = torch.where((kept < real)[:, None] & ~empty, residual, target)
        token = torch.multinomial(target / target.sum(-1, keepdim=True), 1, generator=self.generator)[:, 0]
        return kept, token


class _DraftChain:
    """The MTP modules 1 ... K with their caches, drafting K tokens after each main pass."""

    def __init__(self, model: DecoderLM, K: int, capacity: int, like: Tensor) -> None:
        B, D = like.shape[0], model.config.d_model
        self.model, self.K = model, K
        self.caches: list[DecoderCache] = [model.new_mtp_cache(capacity, depth=k) for k in range(1, K + 1)]
        # carry[k-1]: module k's state at its last kept position, the first input of module k+1's next window
        self.carry = [like.new_zeros(B, 1, D) for _ in range(K - 1)]
        self.carry_padding = [torch.ones(B, 1, dtype=torch.bool, device=like.device) for _ in range(K - 1)]

    def draft(
        self, hidden: Tensor, padding: Tensor, follow: Tensor, last: Tensor, choose: _Chooser
    ) -> tuple[Tensor, list[Tensor | None]]:
        """hidden (B, T, D): the main model's residual at the slots just fed; padding (B, T): slots
        to ignore (not kept, or rows not generating); follow (B, T): the settled token after each
        slot; last (B,): each row's last kept slot (its draft comes from there) -> drafts (B, K)
        and, when sampling, their distributions."""
        B = hidden.shape[0]
        rows = torch.arange(B, device=hidden.device)
        tokens = torch.cat([follow, follow.new_zeros(B, self.K - 1)], dim=1)
        keep = torch.where(padding.all(1), 0, last + 1)
        drafts, dists, carry, carry_padding = [], [], [], []
        for k in range(1, self.K + 1):
            if k > 1:  # module k's window starts one position earlier than module k-1's
                hidden = torch.cat([self.carry[k - 2], hidden], dim=1)
                padding = torch.cat([self.carry_padding[k - 2], padding], dim=1) | padding.all(1, keepdim=True)
            T = hidden.shape[1]
            out = self.model.mtp_step(hidden, tokens[:, :T], cache=self.caches[k - 1], depth=k,
                                      padding_mask=padding if bool(padding.any()) else None)  # fmt: skip
            token, q = choose.pick(out.logits[rows, last + k - 1])
            drafts.append(token)
            dists.append(q)
            if k < self.K:
                tokens[rows, last + k] = token
                carry.append(out.hidden[rows, last][:, None])
                carry_padding.append(padding[rows, last][:, None])
            self.caches[k - 1].forget_last(T, keep)  # positions drafted from drafts are fed again next time
            hidden = out.hidden
        self.carry, self.carry_padding = carry, carry_padding
        return torch.stack(drafts, dim=1), dists


@torch.no_grad()
def speculative_generate(
    model: DecoderLM,
    prompt: Tensor,
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    padding_mask: Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    draft_tokens: int | None = None,
) -> SpeculativeOutput:
    """prompt: (B, T), left-padded where ``padding_mask`` says so; the model needs ``[model.mtp]``.

    ``temperature=0`` is greedy (tokens equal :func:`~moeformer.decode.greedy_generate`'s);
    otherwise sampling as :func:`~moeformer.decode.sample_generate` would, drafted and verified.
    ``draft_tokens``: drafts per main pass, 1 ... the model's MTP depth (default: its depth).
    """
    check_left_padding(padding_mask)
    K = _draft_count(model, draft_tokens)
    choose = _Chooser(temperature, top_k, top_p, generator)
    B, P = prompt.shape
    out = prompt.new_full((B, max(max_new_tokens, 0) + K + 1), eos_id if eos_id is not None else 0)
    count = torch.zeros(B, dtype=torch.long, device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    result = SpeculativeOutput(out[:, :0], 0, 0, 0, [0] * K, [0] * K)
    if max_new_tokens <= 0:
        return result
    capacity = P + (K + 1) * max_new_tokens
    cache = model.new_cache(capacity)
    first = model(prompt, padding_mask=padding_mask, cache=cache, reports=False)
    last, _ = choose.pick(first.logits[:, -1])
    _append(out, count, done, last, ~done, eos_id)
    chain = _DraftChain(model, K, capacity + K, first.residual)
    pad = torch.zeros(B, P, dtype=torch.bool, device=prompt.device) if padding_mask is None else padding_mask
    ends = torch.full((B,), P - 1, device=prompt.device)
    drafts, q = chain.draft(first.residual, pad, torch.cat([prompt[:, 1:], last[:, None]], dim=1), ends, choose)
    while True:
        active = ~done & (count < max_new_tokens)
        if not bool(active.any()):
            break
        # no drafts past a row's budget: they would take positions beyond what plain decoding uses
        real = torch.where(active, (max_new_tokens - count - 1).clamp(0, K), 0)
        n = int(real.max())
        idle = torch.arange(n + 1, device=prompt.device) > torch.where(active, real, -1)[:, None]
        main = model(torch.cat([last[:, None], drafts[:, :n]], dim=1), cache=cache, reports=False,
                     padding_mask=idle if bool(idle.any()) else None)  # fmt: skip
        result.passes += 1
        kept, token = choose.verify(drafts[:, :n], q[:n], main.logits, real)
        kept = torch.where(active, kept, 0)
        _count(result, kept, real, n)
        for j in range(n + 1):  # the kept drafts, then the main model's token, each row up to EOS
            emitted = token if j == n else torch.where(kept == j, token, drafts[:, j])
            _append(out, count, done, emitted, active & (j <= kept) & ~done, eos_id)
        cache.forget_last(n + 1, torch.where(active, kept + 1, 0))
        last = torch.where(active, token, last)
        width = int(kept.max()) + 1  # slots some row kept
        follow = torch.cat([drafts[:, : width - 1], last[:, None]], dim=1).scatter(1, kept[:, None], last[:, None])
        slots = torch.arange(width, device=prompt.device)
        unkept = (slots > kept[:, None]) | ~active[:, None]
        drafts, q = chain.draft(main.residual[:, :width], unkept, follow, kept, choose)
    length = int(count.clamp(max=max_new_tokens).max())
    result.tokens = out[:, :length]
    return result


def _draft_count(model: DecoderLM, draft_tokens: int | None) -> int:
    depth = len(model.mtp)
    if not depth:
        raise ValueError("speculative decoding drafts with the model's MTP module: train it with [model.mtp]")
    if draft_tokens is None:
        return depth
    if not 1 <= draft_tokens <= depth:
        raise ValueError(f"draft_tokens={draft_tokens}: this model's MTP modules draft 1 to {depth} tokens per pass")
    return draft_tokens


def _count(result: SpeculativeOutput, kept: Tensor, real: Tensor, n: int) -> None:
    """Add one pass's drafts to the totals, per depth: draft j + 1 is checked in the rows that fed
    it and kept drafts 1 ... j."""
    if not n:
        return
    depth = torch.arange(n, device=kept.device)
    fed = real[:, None] > depth
    checked, taken = (fed & (kept[:, None] >= depth)).sum(0), (fed & (kept[:, None] > depth)).sum(0)
    for j, (c, t) in enumerate(zip(checked.tolist(), taken.tolist(), strict=True)):
        result.drafted_at[j] += c
        result.accepted_at[j] += t
        result.drafted += c
        result.accepted += t


def _append(out: Tensor, count: Tensor, done: Tensor, token: Tensor, rows: Tensor, eos_id: int | None) -> None:
    """Write ``token`` (B,) at each row's next slot where ``rows``; rows that emit EOS are done."""
    index = rows.nonzero()[:, 0]
    out[index, count[index]] = token[index]
    count += rows.long()
    if eos_id is not None:
        done |= rows & (token == eos_id)
