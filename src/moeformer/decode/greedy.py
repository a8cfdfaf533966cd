"""Greedy decoding over the KV cache: each step feeds only the newest token.

The encoder runs once per source; cross-attention keys/values are projected once and cached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moeformer.decode.beam import check_left_padding
from moeformer.decode.compiled import fixed_shape_step
from moeformer.models.decoder import DecoderLM
from moeformer.models.seq2seq import Seq2SeqTransformer


@torch.no_grad()
def greedy_translate(
    model: Seq2SeqTransformer,
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    max_len: int,
    src_padding_mask: Tensor | None = None,
) -> Tensor:
    """src: (B, S) -> (B, <= max_len) ids without BOS; rows end at EOS, then repeat EOS."""
    memory = model.encode(src, src_padding_mask=src_padding_mask)
    cache = model.new_cache()
    step = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    return _loop(lambda ids: model.decode(ids, memory, cache=cache).logits, step, eos_id, max_len, done)


@torch.no_grad()
def greedy_generate(
    model: DecoderLM,
    prompt: Tensor,
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    padding_mask: Tensor | None = None,
    compile: bool = False,
) -> Tensor:
    """prompt: (B, T), left-padded where ``padding_mask`` says so -> (B, <= max_new_tokens).

    ``compile=True``: the steps after the prompt run as one ``torch.compile``d graph over a
    fixed-shape cache (:mod:`moeformer.decode.compiled`; compiled at the first call for this
    model, batch size and length, then reused).
    """
    check_left_padding(padding_mask)
    if max_new_tokens <= 0:
        return prompt.new_empty(prompt.shape[0], 0)
    cache = model.new_cache(prompt.shape[1] + max_new_tokens)  # preallocated: written in place
    logits = model(prompt, padding_mask=padding_mask, cache=cache, reports=False).logits
    first = logits[:, -1:].argmax(-1)
    done = first[:, 0] == eos_id if eos_id is not None else torch.zeros_like(first[:, 0], dtype=torch.bool)
    if compile and max_new_tokens > 1:
        step = fixed_shape_step(model, cache)
    else:
        step = lambda ids: model(ids, cache=cache, reports=False).logits  # noqa: E731
    rest = _loop(step, first, eos_id, max_new_tokens - 1, done)
    return torch.cat([first, rest], dim=1)


def _loop(
    step_logits: Callable[[Tensor], Tensor], step: Tensor, eos_id: int | None, n_steps: int, done: Tensor
) -> Tensor:
    """Feed ``step`` (B, 1), append the argmax, repeat; finished rows keep emitting EOS."""
    out = []
    for _ in range(n_steps):
        if eos_id is not None and bool(done.all()):
            break
        nxt = step_logits(step)[:, -1].argmax(-1, keepdim=True)
        if eos_id is not None:
            nxt = nxt.masked_fill(done[:, None], eos_id)
            done = done | (nxt[:, 0] == eos_id)
        out.append(nxt)
        step = nxt
    return torch.cat(out, dim=1) if out else step.new_empty(step.shape[0], 0)
