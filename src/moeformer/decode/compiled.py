"""A compiled one-token decoding step: ``torch.compile`` over a cache whose shapes never change.

Eager decoding feeds each new token through the cache's growing views (S keys at step S), so
every step has new shapes and a compiled graph would be rebuilt at every step. Here the cache
is turned, after the prompt, into fixed-shape state:

- each layer's key/value (or MLA latent) buffers of ``capacity`` positions, written at ``slot``
  (a 0-dim tensor) with ``index_copy_``; attention reads the whole buffer;
- a key padding mask (B, capacity), True at the prompt's padding and at every slot not yet
  written: a step first uncovers its own slot, so the masked attention over the buffer is the
  attention over the keys written so far (unwritten slots hold zeros, never NaN);
- the next positions (B, 1), advanced in place.

One step is then one graph with static shapes (``dynamic=False``): dynamo compiles it at the
first call, and again only for a new model, batch size or capacity. Inductor fuses the small
elementwise kernels around the matrix products (norms, RoPE, residuals, SwiGLU, masks), which
is where eager decoding spends its time at batch 1 on a CPU (BENCHMARKS.md, "Greedy decoding vs
transformers generate"). Hooks on the model's hook points are traced into the graph. MoE
layers compile under :func:`moeformer.compiled.dynamo_settings` (their experts are a custom op).

Shapes: B batch, C capacity (prompt + new tokens), V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moeformer.compiled import dynamo_settings
from moeformer.layers.attention import KVCache
from moeformer.layers.mla import LatentKVCache
from moeformer.models.blocks import LayerCache
from moeformer.models.cache import DecoderCache
from moeformer.models.decoder import DecoderLM


@dataclass
class FixedKV:
    """One layer's keys and values (B, G, C, Dh), written at ``slot``; attention reads all C positions."""

    key: Tensor
    value: Tensor
    slot: Tensor  # 0-dim int64, shared by every layer
    static: bool = False  # never a cross-attention cache (MultiHeadAttention reads this flag)

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.key.index_copy_(2, self.slot.view(1), key)
        self.value.index_copy_(2, self.slot.view(1), value)
        return self.key, self.value


@dataclass
class FixedLatent:
    """MLA's latent (B, C, Dc) and rotated shared key (B, C, Dr), written at ``slot``."""

    latent: Tensor
    rope_key: Tensor
    slot: Tensor

    def update(self, latent: Tensor, rope_key: Tensor) -> tuple[Tensor, Tensor]:
        self.latent.index_copy_(1, self.slot.view(1), latent)
        self.rope_key.index_copy_(1, self.slot.view(1), rope_key)
        return self.latent, self.rope_key


@dataclass
class FixedState:
    """What one decoding step reads and advances, all tensors of fixed shape."""

    layers: list[LayerCache]  # self_attn: FixedKV or FixedLatent
    keys_padding: Tensor  # (B, C) bool, True at padding and at unwritten slots
    position: Tensor  # (B, 1) int64: each row's next position
    slot: Tensor  # 0-dim int64: the next slot (prompt length + steps so far)


def fixed_state(cache: DecoderCache) -> FixedState:
    """The fixed-shape state of ``cache`` (filled by the prompt, built with a ``capacity``); shares its buffers."""
    if not cache.capacity or not cache.length:
        raise ValueError("fixed_state needs a cache built with new_cache(capacity) and filled by the prompt")
    S = cache.length
    slot = torch.tensor(S, device=cache.next_position.device)
    layers = [LayerCache(_fixed_layer(layer.self_attn, S, slot)) for layer in cache.layers]
    first = layers[0].self_attn
    C = first.key.shape[2] if isinstance(first, FixedKV) else first.latent.shape[1]
    padding = cache.padding_buffer
    if padding is None:
        padding = torch.zeros(cache.next_position.shape[0], C, dtype=torch.bool, device=slot.device)
    padding[:, S:] = True  # not written yet
    return FixedState(layers, padding, cache.next_position[:, None].clone(), slot)


def _fixed_layer(layer: KVCache | LatentKVCache, filled: int, slot: Tensor) -> FixedKV | FixedLatent:
    """The layer's full buffers, zeroed past ``filled``: masked slots are still read (0 * NaN is NaN)."""
    if layer.buffers is None:
        raise ValueError("the cache holds no preallocated buffers: build it with new_cache(capacity)")
    dim = 2 if isinstance(layer, KVCache) else 1
    for buffer in layer.buffers:
        buffer.narrow(dim, filled, buffer.shape[dim] - filled).zero_()
    return FixedKV(*layer.buffers, slot) if dim == 2 else FixedLatent(*layer.buffers, slot)


def fixed_step(model: DecoderLM, ids: Tensor, state: FixedState) -> Tensor:
    """ids: (B, 1) the newest tokens -> logits (B, 1, V); writes their keys and advances ``state``.

    The eager twin of the compiled step (the same code, uncompiled): equal to ``model(ids, cache=...)``.
    """
    state.keys_padding.index_fill_(1, state.slot.view(1), False)  # the new token's slot becomes visible
    x, rotary = model.embedding(ids, state.position)
    new_padding = torch.zeros_like(ids, dtype=torch.bool)  # decoding steps feed real tokens only
    for block, cache in zip(model.layers, state.layers, strict=True):
        out = block(
            x,
            padding_mask=state.keys_padding,
            cache=cache,
            rotary=rotary,
            report=False,
            token_padding=new_padding,
        )
        x = out.hidden
    state.slot.add_(1)
    state.position.add_(1)
    return model.lm_head(model.norm(x))


# graphs kept for the one compiled step function: one per model, batch size and capacity (dynamo's
# default of 8 would make a long-lived process, e.g. one serving several prompt lengths, fall
# back to eager decoding without a word once 8 shapes have been seen)
RECOMPILE_LIMIT = 256


@functools.cache
def _compiled(backend: str) -> Callable[[DecoderLM, Tensor, FixedState], Tensor]:
    """One compiled step per backend for the process (built at first use): dynamo keeps a graph per
    model, batch and capacity, so later generations with the same model and shapes reuse it."""
    # inductor's C++ wrapper calls the kernels from C++: ~1.5 ms less per step than its Python
    # wrapper on lm-small at batch 1 (7.6-8.0 vs 9.2-10.3 ms), for a longer first compile
    options = {"cpp_wrapper": True} if backend == "inductor" else None
    return torch.compile(fixed_step, backend=backend, fullgraph=True, dynamic=False, options=options)


def fixed_shape_step(
    model: DecoderLM, cache: DecoderCache, *, backend: str | None = "inductor"
) -> Callable[[Tensor], Tensor]:
    """A function ids (B, 1) -> logits (B, 1, V) decoding after the prompt ``cache`` holds.

    ``backend``: torch.compile's ("inductor" generates C++ kernels; "aot_eager" only traces, for
    tests), or None to run the same fixed-shape step eagerly.
    """
    state = fixed_state(cache)
    if backend is None:
        return lambda ids: fixed_step(model, ids, state)
    compiled = _compiled(backend)

    first = True

    def step(ids: Tensor) -> Tensor:
        nonlocal first
        with dynamo_settings(recompile_limit=RECOMPILE_LIMIT):
            if first:  # the first step picks (or compiles) the graph for this model and state
                first = False
                return compiled(model, ids, state)
            # later steps pass the same model and state objects and ids of the same shape, so the
            # graph the first step chose is the right one: checking its ~1,500 guards again took
            # 0.45 ms of each 8 ms step (DeepSeekMoE lm-small, batch 1); only the guards that tell
            # this process's compiled graphs apart still run
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return compiled(model, ids, state)

    return step
