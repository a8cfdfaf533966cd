"""Tiny decoder LMs for the decoding tests (dense, DeepSeekMoE, MLA, both), a left-padded prompt,
and greedy decoding through the fixed-shape (compiled) step."""

from __future__ import annotations

import torch

from moeformer import DecoderLM, preset
from moeformer.decode.compiled import fixed_shape_step

VOCAB = 37
MODELS = {
    "dense": ("lm-tiny", {}),
    "deepseek": ("lm-tiny", {"moe": {"kind": "deepseek", "n_experts": 6, "top_k": 2, "n_shared": 1}}),
    "mla": ("lm-tiny-mla", {}),
    "mla-moe": ("lm-tiny-mla", {"moe": {"kind": "deepseek", "n_experts": 4, "top_k": 2, "n_shared": 1}}),
}


def tiny(name: str) -> DecoderLM:
    torch.manual_seed(0)
    name, overrides = MODELS[name]
    return DecoderLM(preset(name, vocab_size=VOCAB, **overrides)).eval()


def left_padded_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 6 ids, the first two left-padded (by 2 and 5)."""
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, :2] = mask[1, :5] = True
    return ids.masked_fill(mask, 0), mask


def decode_steps(model, ids, mask, n: int, backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ids (B, n) and their logits (B, n, V): prompt through the cache, then ``n - 1`` steps
    of the fixed-shape step (``backend`` None: eagerly)."""
    cache = model.new_cache(ids.shape[1] + n)
    logits = [model(ids, padding_mask=mask, cache=cache, reports=False).logits[:, -1:]]
    step = fixed_shape_step(model, cache, backend=backend)
    for _ in range(n - 1):
        logits.append(step(logits[-1].argmax(-1)))
    logits = torch.cat(logits, dim=1)
    return logits.argmax(-1), logits
