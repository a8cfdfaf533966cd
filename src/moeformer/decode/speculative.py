"""Self-speculative decoding with the model's own multi-token prediction module.

DeepSeek-V3's report (section 5.4.3) keeps its MTP module at inference to draft the token after
next; the main model then checks the draft and the next token in one pass over two positions:

    draft  d ~ q = MTP_1(h_t, Emb(x_{t+1}))          (cheap: one block)
    verify main([x_{t+1}, d]) -> p_1 (for x_{t+2}), p_2 (for x_{t+3})
    greedy: keep d if d = argmax p_1, then also take argmax p_2; else take argmax p_1.
    sampling (Leviathan et al. 2023, Chen et al. 2023): keep d with probability min(1, p_1(d) / q(d));
        on a rejection draw x_{t+2} from normalise(max(0, p_1 - q)); after a keep draw x_{t+3} ~ p_2.

So each main-model pass yields one or two tokens, and the output is exactly what plain decoding
gives: greedy tokens are identical, and sampled tokens have exactly the target distribution
(p after temperature, top-k and top-p). Rows of a batch accept independently: a rejected draft's
cache slot is turned into padding (never attended, its position given to the next token), so no
cache is ever cut back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moeformer.decode.beam import check_left_padding
from moeformer.decode.sampling import check_sampling_options, filter_logits
from moeformer.models.decoder import DecoderLM


@dataclass
class SpeculativeOutput:
    tokens: Tensor  # (B, <= max_new_tokens), rows end at EOS, then repeat EOS (as greedy_generate)
    drafted: int  # drafts checked by the main model (rows still generating, summed over passes)
    accepted: int  # drafts kept
    passes: int  # main-model forward passes after the prompt

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


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

    def verify(self, draft: Tensor, q: Tensor | None, logits: Tensor) -> tuple[Tensor, Tensor]:
        """draft (B,), its distribution q (B, V), main logits (B, V) -> (kept (B,) bool, token (B,)):
        the draft where kept, else a replacement from the residual distribution."""
        if self.greedy:
            best = logits.argmax(-1)
            return best == draft, best
        assert q is not None
        p = self.probs(logits)
        rows = torch.arange(draft.shape[0], device=draft.device)
        ratio = (p[rows, draft] / q[rows, draft].clamp_min(1e-30)).clamp(max=1.0)
        u = torch.rand(ratio.shape, generator=self.generator, device=ratio.device)
        kept = u < ratio
        residual = (p - q).clamp_min(0)
        empty = residual.sum(-1, keepdim=True) <= 0  # p == q: a rejection cannot happen; any row will do
        residual = torch.where(empty, p, residual)
        fixed = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=self.generator)[:, 0]
        return kept, torch.where(kept, draft, fixed)


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
) -> SpeculativeOutput:
    """prompt: (B, T), left-padded where ``padding_mask`` says so; the model needs ``[model.mtp]``.

    ``temperature=0`` is greedy (tokens equal :func:`~moeformer.decode.greedy_generate`'s);
    otherwise sampling as :func:`~moeformer.decode.sample_generate` would, drafted and verified.
    """
    check_left_padding(padding_mask)
    if not len(model.mtp):
        raise ValueError("speculative decoding drafts with the model's MTP module: train it with [model.mtp]")
    choose = _Chooser(temperature, top_k, top_p, generator)
    B, P = prompt.shape
    out = prompt.new_full((B, max(max_new_tokens, 0) + 2), eos_id if eos_id is not None else 0)
    count = torch.zeros(B, dtype=torch.long, device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    result = SpeculativeOutput(out[:, :0], 0, 0, 0)
    if max_new_tokens <= 0:
        return result
    capacity = P + 2 * max_new_tokens
    cache, drafts = model.new_cache(capacity), model.new_mtp_cache(capacity)
    first = model(prompt, padding_mask=padding_mask, cache=cache, reports=False)
    last, _ = choose.pick(first.logits[:, -1])
    _append(out, count, done, last, ~done, eos_id)
    follow = torch.cat([prompt[:, 1:], last[:, None]], dim=1)
    mtp = model.mtp_step(first.residual, follow, cache=drafts, padding_mask=padding_mask)
    draft, q = choose.pick(mtp.logits[:, -1])
    while True:
        active = ~done & (count < max_new_tokens)
        if not bool(active.any()):
            break
        everyone = bool(active.all())  # masks only where rows differ: none at batch 1
        idle = None if everyone else (~active)[:, None].expand(B, 2)  # finished rows feed padding
        main = model(torch.stack([last, draft], dim=1), padding_mask=idle, cache=cache, reports=False)
        result.passes += 1
        kept, token = choose.verify(draft, q, main.logits[:, 0])
        kept &= active
        bonus, _ = choose.pick(main.logits[:, 1])
        n_kept, n_active = int(kept.sum()), int(active.sum())
        result.drafted += n_active
        result.accepted += n_kept
        _append(out, count, done, token, active, eos_id)
        _append(out, count, done, bonus, kept & ~done, eos_id)
        last = torch.where(kept, bonus, token)
        if n_kept == 0:  # every draft rejected: cut the slot off both caches' ends, no padding to carry
            cache.drop_last(active)
            idle_one = None if everyone else ~active[:, None]
            mtp = model.mtp_step(main.residual[:, :1], token[:, None], cache=drafts, padding_mask=idle_one)
            draft, q = choose.pick(mtp.logits[:, 0])
            continue
        if n_kept < n_active:  # some rows rejected: their draft slots become padding
            cache.discard_last(active & ~kept)
        both = None if everyone and n_kept == B else torch.stack([~active, ~kept], dim=1)
        mtp = model.mtp_step(main.residual, torch.stack([token, bonus], dim=1), cache=drafts, padding_mask=both)
        draft, q = choose.pick(torch.where(kept[:, None], mtp.logits[:, 1], mtp.logits[:, 0]))
    length = int(count.clamp(max=max_new_tokens).max())
    result.tokens = out[:, :length]
    return result


def _append(out: Tensor, count: Tensor, done: Tensor, token: Tensor, rows: Tensor, eos_id: int | None) -> None:
    """Write ``token`` (B,) at each row's next slot where ``rows``; rows that emit EOS are done."""
    index = rows.nonzero()[:, 0]
    out[index, count[index]] = token[index]
    count += rows.long()
    if eos_id is not None:
        done |= rows & (token == eos_id)
