"""Decoding over a preallocated cache: greedy equals decoding without any cache (dense, MoE, MLA,
left padding); caches written in place equal full forwards, also when they outgrow their capacity
or follow beams; MoE layers skip their reports only when asked."""

from __future__ import annotations

import pytest
import torch
from decode_models import MODELS, left_padded_prompt, tiny

from moeformer import DecoderLM
from moeformer.decode import greedy_generate
from moeformer.layers import KVCache
from moeformer.layers.attention import write_in_place

pytestmark = pytest.mark.usefixtures("single_thread")


def generate_without_cache(model: DecoderLM, ids: torch.Tensor, mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """Greedy decoding by a full forward over the whole sequence at every step."""
    start = ids.shape[1]
    for _ in range(n):
        nxt = model(ids, padding_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = None if mask is None else torch.cat([mask, torch.zeros_like(nxt, dtype=torch.bool)], dim=1)
    return ids[:, start:]


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_decoding_without_cache(name, padded):
    model = tiny(name)
    ids, mask = left_padded_prompt()
    mask = mask if padded else None
    expected = generate_without_cache(model, ids, mask, 10)
    assert torch.equal(greedy_generate(model, ids, max_new_tokens=10, padding_mask=mask), expected)


@torch.no_grad()
@pytest.mark.parametrize("capacity", [0, 3, 30], ids=["concatenated", "outgrown", "preallocated"])
@pytest.mark.parametrize("name", ["dense", "mla"])
def test_cache_written_in_place_equals_full_forward(name, capacity):
    """Chunks 4, 1, 1, 3 through a cache of each kind give the full forward's logits; a capacity of
    3 is outgrown twice (the buffers double and keep what they hold)."""
    model = tiny(name)
    ids, mask = left_padded_prompt()
    ids = torch.cat([ids, ids[:, :3].clamp_min(1)], dim=1)
    mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    full = model(ids, padding_mask=mask).logits
    cache = model.new_cache(capacity)
    pieces, start = [], 0
    for n in (4, 1, 1, 3):
        part = slice(start, start + n)
        pieces.append(model(ids[:, part], padding_mask=mask[:, part], cache=cache).logits)
        start += n
    real = ~mask
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=1e-5, rtol=0)
    assert cache.length == ids.shape[1] and torch.equal(cache.padding_mask, mask)
    assert (cache.layers[0].self_attn.buffers is None) == (capacity == 0)


def test_write_in_place_grows_and_keeps_what_it_holds():
    buffer, view = write_in_place(None, torch.ones(2, 3), 0, 1, capacity=4)
    assert buffer.shape == (2, 4) and torch.equal(view, torch.ones(2, 3))
    buffer, view = write_in_place(buffer, torch.full((2, 1), 2.0), 3, 1, capacity=4)
    assert view.data_ptr() == buffer.data_ptr() and torch.equal(view[:, 3], torch.full((2,), 2.0))
    grown, view = write_in_place(buffer, torch.full((2, 2), 3.0), 4, 1, capacity=4)
    assert grown.shape == (2, 8)  # doubled
    assert torch.equal(view, torch.tensor([[1.0, 1, 1, 2, 3, 3]] * 2))


def test_preallocated_kv_cache_reorders_its_buffers():
    cache = KVCache(capacity=8)
    k, v = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    cache.update(k, v)
    cache.reorder(torch.tensor([2, 0, 0, 1]))
    assert torch.equal(cache.key, k[[2, 0, 0, 1]]) and torch.equal(cache.value, v[[2, 0, 0, 1]])
    step = torch.randn(4, 2, 1, 5)
    key, _ = cache.update(step, step)
    assert key.shape == (4, 2, 5, 5) and torch.equal(key[:, :, 4:], step)


@torch.no_grad()
def test_moe_reports_are_skipped_only_when_asked():
    """reports=False: the same logits, no MoE statistics or losses; by default (also under no_grad)
    every MoE layer still reports tokens_per_expert and the rest."""
    model = tiny("deepseek")
    ids, mask = left_padded_prompt()
    full = model(ids, padding_mask=mask)
    bare = model(ids, padding_mask=mask, reports=False)
    assert torch.equal(full.logits, bare.logits)
    assert not bare.reports.stats and not bare.reports.aux_losses and bare.aux_loss.item() == 0
    assert set(full.reports.stats) == {"layers.0", "layers.1"}
    per_expert = full.reports.stats["layers.0"]["tokens_per_expert"]
    assert per_expert.sum().item() == (~mask).sum().item() * 2  # real tokens x top_k
