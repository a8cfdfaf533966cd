"""Sampling over the KV cache: temperature, top-k and nucleus (top-p) filtering.

    p(y_t = v) = softmax(filter(z / T))_v

with z the next-token logits and T the temperature (Ackley et al. 1985); top-k keeps the k most
likely tokens (Fan et al. 2018); top-p keeps the smallest set of most likely tokens whose
probability reaches p (Holtzman et al. 2020, "nucleus sampling"). The filters apply in that order,
as in transformers' ``generate``: top-p sees the distribution after temperature and top-k.

``temperature=0`` (or ``top_k=1``) is greedy decoding. Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from moeformer.decode.beam import check_left_padding
from moeformer.models.decoder import DecoderLM
from moeformer.models.seq2seq import Seq2SeqTransformer


def filter_logits(
    logits: Tensor, top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0
) -> Tensor:
    """logits: (..., V) -> (..., V) float: divided by ``temperature``, dropped tokens set to -inf.

    ``top_k`` keeps exactly min(k, V) tokens; among tokens tied with the k-th largest logit the
    lower ids are kept. ``top_p`` keeps the smallest set of most likely tokens whose probability
    sums to >= p (ties again favour lower ids), never fewer than one. ``temperature=0`` keeps only
    the argmax (the first one on ties), exactly as ``argmax`` would choose.
    """
    check_sampling_options(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return _keep_first(logits, 1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        logits = _keep_first(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = _nucleus(logits, top_p)
    return logits


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for a temperature < 0, top_k < 1 or top_p outside (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if math.isinf(temperature):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


@torch.no_grad()
def sample_generate(
    model: DecoderLM,
    prompt: Tensor,
    *,
    padding_mask: Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """prompt: (B, T), left-padded where padding_mask (B, T) is True -> (B, <= max_new_tokens) ids.

    Rows end at EOS, then repeat EOS; decoding stops early once every row has ended.
    """
    check_sampling_options(temperature, top_k, top_p)
    _check_steps(max_new_tokens, "max_new_tokens")
    check_left_padding(padding_mask)
    cache = model.new_cache(prompt.shape[1] + max_new_tokens)
    first = model(prompt, padding_mask=padding_mask, cache=cache, reports=False).logits[:, -1]
    pick = _picker(temperature, top_k, top_p, generator)
    step = lambda ids: model(ids, cache=cache, reports=False).logits[:, -1]  # noqa: E731
    return _decode(first, step, pick, eos_id, max_new_tokens)


@torch.no_grad()
def sample_translate(
    model: Seq2SeqTransformer,
    src: Tensor,
    *,
    src_padding_mask: Tensor | None = None,
    bos_id: int,
    eos_id: int,
    max_len: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """src: (B, S), src_padding_mask: (B, S) True at padding -> (B, <= max_len) ids without BOS.

    Rows end at EOS, then repeat EOS, as :func:`~moeformer.decode.greedy.greedy_translate`.
    """
    check_sampling_options(temperature, top_k, top_p)
    _check_steps(max_len, "max_len")
    memory = model.encode(src, src_padding_mask=src_padding_mask)
    cache = model.new_cache()
    bos = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
    first = model.decode(bos, memory, cache=cache).logits[:, -1]
    pick = _picker(temperature, top_k, top_p, generator)
    return _decode(first, lambda ids: model.decode(ids, memory, cache=cache).logits[:, -1], pick, eos_id, max_len)


def _picker(
    temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Callable[[Tensor], Tensor]:
    """A function (B, V) logits -> (B,) sampled ids."""

    def pick(logits: Tensor) -> Tensor:
        probs = filter_logits(logits, top_k, top_p, temperature).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return pick


def _decode(
    logits: Tensor,
    feed: Callable[[Tensor], Tensor],
    pick: Callable[[Tensor], Tensor],
    eos_id: int | None,
    n_steps: int,
) -> Tensor:
    """logits: (B, V) of the first new token; feed: (B, 1) ids -> (B, V) logits -> (B, <= n_steps)."""
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    out: list[Tensor] = []
    for step in range(n_steps):
        token = pick(logits)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done = done | (token == eos_id)
        out.append(token)
        if step + 1 == n_steps or bool(done.all()):
            break
        logits = feed(token[:, None])
    return torch.stack(out, dim=1)


def _keep_first(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (lower ids first on ties); -inf elsewhere."""
    order = logits.sort(dim=-1, descending=True, stable=True).indices
    dropped = torch.ones_like(logits, dtype=torch.bool).scatter(-1, order[..., :k], False)
    return logits.masked_fill(dropped, float("-inf"))


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest prefix of the sorted tokens whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    dropped = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(dropped, float("-inf"))


def _check_steps(steps: int, name: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
