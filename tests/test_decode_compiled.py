"""The fixed-shape decoding step: eagerly it equals decoding through the growing cache; traced by
dynamo it is one graph; compiled by inductor it gives the same greedy tokens.

The inductor test is marked slow (about 25 s for its first compile on a cold cache here); the
fast checks trace with the ``aot_eager`` backend (graph capture, no code generation).
"""

from __future__ import annotations

import pytest
import torch
from decode_models import MODELS, decode_steps, left_padded_prompt, tiny
from torch._dynamo.utils import counters

from moeformer.decode import greedy_generate
from moeformer.decode.compiled import fixed_state

pytestmark = pytest.mark.usefixtures("single_thread")


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fixed_shape_step_equals_growing_cache(name, padded):
    """Attention over the whole buffer with unwritten slots masked gives the eager logits."""
    model = tiny(name)
    ids, mask = left_padded_prompt()
    mask = mask if padded else None
    tokens, logits = decode_steps(model, ids, mask, 8, backend=None)
    assert torch.equal(tokens, greedy_generate(model, ids, max_new_tokens=8, padding_mask=mask))
    cache = model.new_cache()
    expected = [model(ids, padding_mask=mask, cache=cache).logits[:, -1:]]
    expected += [model(tokens[:, i : i + 1], cache=cache).logits for i in range(7)]
    torch.testing.assert_close(logits, torch.cat(expected, dim=1), atol=1e-5, rtol=0)


@torch.no_grad()
def test_fixed_state_needs_a_preallocated_prompt_cache():
    model = tiny("dense")
    with pytest.raises(ValueError, match="capacity"):
        fixed_state(model.new_cache())
    cache = model.new_cache(10)
    with pytest.raises(ValueError, match="filled by the prompt"):
        fixed_state(cache)


@torch.no_grad()
@pytest.mark.parametrize("name", ["dense", "deepseek", "mla"])
def test_step_traces_as_one_graph_and_equals_eager(name):
    """fullgraph=True: a graph break would raise; the traced step gives the eager logits."""
    model = tiny(name)
    ids, mask = left_padded_prompt()
    tokens, logits = decode_steps(model, ids, mask, 5, backend="aot_eager")
    eager_tokens, eager_logits = decode_steps(model, ids, mask, 5, backend=None)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "deepseek"])
def test_compiled_greedy_gives_eager_tokens(name):
    model = tiny(name)
    ids, mask = left_padded_prompt()
    for padding in (None, mask):
        expected = greedy_generate(model, ids, max_new_tokens=12, padding_mask=padding)
        assert torch.equal(greedy_generate(model, ids, max_new_tokens=12, padding_mask=padding, compile=True), expected)


@torch.no_grad()
def test_more_shapes_than_dynamos_default_limit_still_compile():
    """Ten capacities, ten graphs: none falls back to eager decoding (dynamo's default keeps 8)."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny("dense")
    ids = torch.randint(1, 37, (1, 4), generator=torch.Generator().manual_seed(0))
    for n in range(2, 12):
        decode_steps(model, ids, None, n, backend="aot_eager")
    assert counters["stats"]["unique_graphs"] == 10
    torch._dynamo.reset()
