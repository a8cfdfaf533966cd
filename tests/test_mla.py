"""Multi-head latent attention: parity with transformers' DeepseekV3Attention, masks, the latent
KV cache (incremental decoding, size, beam reorder), backends, DecoderLM integration, config errors."""

from __future__ import annotations

import pytest
import torch

from moeformer import ConfigError, DecoderLM, ModelConfig, preset
from moeformer.config import AttentionConfig, model_config_from_dict
from moeformer.decode import greedy_generate
from moeformer.decode.beam import beam_generate
from moeformer.layers import KVCache, LatentKVCache, MultiHeadLatentAttention, RotaryEmbedding

ATOL = 1e-5
D, H, C, DN, DR, DV = 32, 4, 16, 8, 6, 10  # d_model, heads, kv_lora_rank, qk_nope, qk_rope, v

pytestmark = pytest.mark.usefixtures("single_thread")


def make_mla(seed: int = 0, *, q_lora_rank: int | None = 12, bias: bool = False, **kw) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    mla = MultiHeadLatentAttention(
        D,
        H,
        kv_lora_rank=C,
        qk_nope_head_dim=DN,
        qk_rope_head_dim=DR,
        v_head_dim=DV,
        q_lora_rank=q_lora_rank,
        bias=bias,
        **kw,
    )
    with torch.no_grad():  # non-trivial norm weights and biases, so a mix-up would show
        for p in mla.parameters():
            p.normal_(0.0, 0.3)
    return mla.eval()


def rotary(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(DR)(positions)


def positions_of(padding: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting real tokens, as DecoderLM computes them."""
    return ((~padding).long().cumsum(1) - 1).clamp_min(0)


def make_lm(seed: int = 0, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(preset("lm-tiny-mla", vocab_size=37, **overrides)).eval()


MOE = {"kind": "deepseek", "n_experts": 4, "top_k": 2, "n_shared": 1, "expert_hidden": 16, "first_dense": 1}


# --- parity with transformers ------------------------------------------------------------------


def hf_attention(q_lora_rank: int | None, bias: bool, interleave: bool = False):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    config = transformers.DeepseekV3Config(
        vocab_size=37,
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=H,
        num_key_value_heads=H,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=C,
        qk_nope_head_dim=DN,
        qk_rope_head_dim=DR,
        v_head_dim=DV,
        attention_bias=bias,
        rope_interleave=interleave,
    )
    config._attn_implementation = "eager"
    return hf.DeepseekV3Attention(config, layer_idx=0).eval(), hf.DeepseekV3RotaryEmbedding(config)


def interleaved_to_half(rows: torch.Tensor, width: int, rope: int) -> torch.Tensor:
    """Reorder the RoPE rows (the last ``rope`` of every ``width``-row group) from pairs (2i, 2i+1)
    to the rotate-half layout: what a checkpoint importer does to DeepSeek's weights."""
    groups = rows.view(-1, width, *rows.shape[1:])
    perm = torch.cat(
        [torch.arange(width - rope), width - rope + torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])]
    )
    return groups[:, perm].reshape(rows.shape)


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_matches_transformers_deepseek_v3_attention(q_lora_rank, bias, interleave):
    """Same weights (o_proj -> out_proj) give the same outputs as DeepseekV3Attention, causal and
    left-padded, float32. With rope_interleave=True, permuting the RoPE weight rows suffices."""
    theirs, rope = hf_attention(q_lora_rank, bias, interleave)
    ours = make_mla(q_lora_rank=q_lora_rank, bias=bias)
    state = {k.replace("o_proj", "out_proj"): v for k, v in theirs.state_dict().items()}
    assert set(state) == set(ours.state_dict())  # DeepSeek's names, so checkpoints map 1:1
    theirs.load_state_dict({k.replace("out_proj", "o_proj"): v for k, v in ours.state_dict().items()})
    if interleave:
        with torch.no_grad():
            q = ours.q_proj if q_lora_rank is None else ours.q_b_proj
            q.weight.copy_(interleaved_to_half(q.weight, DN + DR, DR))
            kv = ours.kv_a_proj_with_mqa
            kv.weight.copy_(interleaved_to_half(kv.weight, C + DR, DR))
            if bias:
                kv.bias.copy_(interleaved_to_half(kv.bias, C + DR, DR))
    B, T = 3, 7
    torch.manual_seed(1)
    x = torch.randn(B, T, D)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, :2] = padding[2, :4] = True  # left padding
    positions = positions_of(padding)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & ~padding[:, None, None, :]
    hf_mask = torch.zeros(B, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected, _ = theirs(x, position_embeddings=rope(x, positions), attention_mask=hf_mask)
        got = ours(x, x, x, key_padding_mask=padding, is_causal=True, rotary=rotary(positions)).output
    real = ~padding
    assert (got[real] - expected[real]).abs().max() < ATOL


def test_softmax_scale_counts_both_parts_of_the_head():
    assert make_mla().scale == pytest.approx((DN + DR) ** -0.5)


# --- masks ---------------------------------------------------------------------------------------


def test_causal_outputs_ignore_future_tokens():
    mla = make_mla()
    x = torch.randn(2, 6, D)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 2, D)
    rot = rotary(torch.arange(6).expand(2, 6))
    a = mla(x, x, x, is_causal=True, rotary=rot).output
    b = mla(y, y, y, is_causal=True, rotary=rot).output
    assert torch.allclose(a[:, :4], b[:, :4], atol=ATOL)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


def test_left_padding_changes_nothing_and_dead_rows_are_zero():
    """A left-padded row equals the unpadded one; pad queries (no allowed key) output zeros."""
    mla = make_mla()
    x = torch.randn(1, 5, D)
    padded = torch.cat([torch.randn(1, 3, D), x], dim=1)
    padding = torch.tensor([[True] * 3 + [False] * 5])
    alone = mla(x, x, x, is_causal=True, rotary=rotary(torch.arange(5)[None])).output
    for backend in ("sdpa", "reference"):
        mla.backend = backend
        out = mla(
            padded, padded, padded, key_padding_mask=padding, is_causal=True, rotary=rotary(positions_of(padding))
        )
        assert torch.allclose(out.output[:, 3:], alone, atol=ATOL)
        assert torch.equal(out.output[:, :3], torch.zeros(1, 3, D))


def test_sdpa_equals_reference_backend_and_weights_rows_sum_to_one():
    mla = make_mla()
    x = torch.randn(2, 6, D)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, :2] = True
    kw = dict(key_padding_mask=padding, is_causal=True, rotary=rotary(positions_of(padding)))
    fast = mla(x, x, x, **kw).output
    mla.backend = "reference"
    ref = mla(x, x, x, **kw).output
    assert torch.allclose(fast, ref, atol=ATOL)
    out = mla(x, x, x, need_weights=True, **kw)
    assert out.weights.shape == (2, H, 6, 6)
    sums = out.weights.sum(-1)
    assert torch.allclose(sums[0], torch.ones(H, 6), atol=ATOL)
    assert torch.allclose(sums[1, :, 2:], torch.ones(H, 4), atol=ATOL)
    assert torch.equal(out.weights.triu(1), torch.zeros_like(out.weights))  # causal
    assert torch.allclose(out.output, ref, atol=ATOL)


def test_explicit_attn_mask_is_accepted():
    mla = make_mla()
    x = torch.randn(2, 4, D)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    a = mla(x, x, x, attn_mask=causal).output
    b = mla(x, x, x, is_causal=True).output
    assert torch.allclose(a, b, atol=ATOL)


def test_rejects_cross_attention_and_wrong_rotary_width():
    mla = make_mla()
    x, memory = torch.randn(1, 3, D), torch.randn(1, 5, D)
    with pytest.raises(ValueError, match="self-attention only"):
        mla(x, memory, memory)
    with pytest.raises(ValueError, match="qk_rope_head_dim=6"):
        mla(x, x, x, rotary=RotaryEmbedding(8)(torch.arange(3)[None]))
    with pytest.raises(ValueError, match="d_model=32"):
        y = torch.randn(1, 3, 16)
        mla(y, y, y)


# --- the latent KV cache -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_decoding_equals_full_pass(chunk, backend):
    mla = make_mla(backend=backend)
    B, T = 2, 7
    x = torch.randn(B, T, D)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, :2] = True
    positions = positions_of(padding)
    full = mla(x, x, x, key_padding_mask=padding, is_causal=True, rotary=rotary(positions)).output
    cache, pieces = LatentKVCache(), []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        part = x[:, s:e]
        out = mla(
            part,
            part,
            part,
            key_padding_mask=padding[:, :e],
            is_causal=True,
            cache=cache,
            rotary=rotary(positions[:, s:e]),
        )
        pieces.append(out.output)
    assert cache.length == T
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=ATOL)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_decoding_steps_attend_in_the_latent_space(backend, monkeypatch):
    """Once more tokens are cached than fed, keys and values are never expanded, yet the outputs
    and attention weights equal the expanded computation of a full pass."""
    mla = make_mla(backend=backend)
    B, T = 2, 6
    x = torch.randn(B, T, D)
    positions = torch.arange(T).expand(B, T)
    full = mla(x, x, x, is_causal=True, rotary=rotary(positions), need_weights=True)
    cache = LatentKVCache()
    prompt = x[:, :4]
    mla(prompt, prompt, prompt, is_causal=True, cache=cache, rotary=rotary(positions[:, :4]))
    expanded = []
    monkeypatch.setattr(mla, "_expand", lambda *a: expanded.append(1) or pytest.fail("expanded while decoding"))
    for t in (4, 5):
        step = x[:, t : t + 1]
        out = mla(
            step, step, step, is_causal=True, cache=cache, rotary=rotary(positions[:, t : t + 1]), need_weights=True
        )
        assert (out.output - full.output[:, t : t + 1]).abs().max() < ATOL
        assert (out.weights - full.weights[:, :, t : t + 1, : t + 1]).abs().max() < ATOL
    assert not expanded


def test_cache_holds_the_latent_and_one_rope_key_per_token():
    """Per token and layer: C + Dr numbers, against 2 * H * Dh for multi-head attention."""
    mla = make_mla()
    B, T = 2, 5
    x = torch.randn(B, T, D)
    cache = LatentKVCache()
    assert (cache.length, cache.elements_per_token, cache.nbytes) == (0, 0, 0)
    mla(x, x, x, is_causal=True, cache=cache, rotary=rotary(torch.arange(T).expand(B, T)))
    assert cache.latent.shape == (B, T, C) and cache.rope_key.shape == (B, T, DR)
    assert cache.elements_per_token == C + DR
    assert cache.nbytes == B * T * (C + DR) * 4
    # The cached latent is the normalised one, the cached key the rotated one.
    latent, k_rope = mla._compress(x)
    assert torch.allclose(cache.latent, latent)
    assert not torch.allclose(cache.rope_key[:, 1:], k_rope[:, 1:])


def test_lm_cache_is_smaller_than_multi_head_attention():
    mla_lm = make_lm()
    mha_lm = DecoderLM(preset("lm-tiny", vocab_size=37, attention={"n_kv_heads": 4})).eval()
    ids = torch.randint(1, 37, (2, 6))
    sizes = {}
    for name, lm in (("mla", mla_lm), ("mha", mha_lm)):
        cache = lm.new_cache()
        lm(ids, cache=cache)
        sizes[name] = [layer.self_attn.elements_per_token for layer in cache.layers]
    a = mla_lm.config.attention
    assert all(isinstance(layer.self_attn, LatentKVCache) for layer in mla_lm.new_cache().layers)
    assert all(isinstance(layer.self_attn, KVCache) for layer in mha_lm.new_cache().layers)
    assert sizes["mla"] == [a.kv_lora_rank + a.qk_rope_head_dim] * 2  # 16 + 4
    assert sizes["mha"] == [2 * 4 * mha_lm.config.head_dim] * 2  # 2 * n_kv_heads * head_dim = 64


def test_reorder_keeps_the_chosen_rows():
    cache = LatentKVCache()
    latent, key = torch.randn(3, 4, C), torch.randn(3, 4, DR)
    cache.update(latent, key)
    cache.reorder(torch.tensor([2, 0, 0]))
    assert torch.equal(cache.latent, latent[[2, 0, 0]]) and torch.equal(cache.rope_key, key[[2, 0, 0]])
    LatentKVCache().reorder(torch.tensor([0]))  # empty: nothing to do


def test_decoder_cache_reorder_then_decode_equals_fresh_pass():
    """DecoderCache.reorder (beam search) on an MLA LM: continue the reordered rows as if fed anew."""
    lm = make_lm(moe=MOE)
    prompt = torch.randint(1, 37, (3, 5))
    nxt = torch.randint(1, 37, (3, 1))
    index = torch.tensor([2, 0, 0])
    cache = lm.new_cache()
    lm(prompt, cache=cache)
    cache.reorder(index)
    step = lm(nxt, cache=cache).logits[:, -1]
    fresh = lm(torch.cat([prompt[index], nxt], dim=1)).logits[:, -1]
    assert torch.allclose(step, fresh, atol=ATOL)


# --- DecoderLM with MLA --------------------------------------------------------------------------


def test_lm_preset_builds_mla_blocks_and_rope_of_the_rope_width():
    lm = make_lm()
    assert isinstance(lm.layers[0].self_attn, MultiHeadLatentAttention)
    assert lm.config.rotary_dim == 4
    assert lm.embedding.rotary.inv_freq.shape == (2,)


@pytest.mark.parametrize("chunks", [[7], [1] * 7, [3, 1, 3]])
def test_lm_with_moe_cached_equals_full(chunks):
    lm = make_lm(moe=MOE)
    ids = torch.randint(1, 37, (2, 7))
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, :3] = True
    ids[padding] = 0
    full = lm(ids, padding_mask=padding).logits
    cache, pieces, start = lm.new_cache(), [], 0
    for n in chunks:
        pieces.append(lm(ids[:, start : start + n], padding_mask=padding[:, start : start + n], cache=cache).logits)
        start += n
    real = ~padding
    assert torch.allclose(torch.cat(pieces, dim=1)[real], full[real], atol=ATOL)


def test_lm_left_padding_invariance():
    lm = make_lm(moe=MOE)
    row = torch.randint(1, 37, (1, 5))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), row], dim=1)
    padding = torch.tensor([[True, True] + [False] * 5])
    alone = lm(row).logits
    both = lm(padded, padding_mask=padding).logits
    assert torch.allclose(both[:, 2:], alone, atol=ATOL)


def test_greedy_generation_equals_argmax_of_full_passes():
    lm = make_lm(moe=MOE)
    prompt = torch.randint(1, 37, (2, 4))
    got = greedy_generate(lm, prompt, max_new_tokens=6)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, lm(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, seq[:, 4:])


def test_beam_size_one_equals_greedy():
    lm = make_lm()
    prompt = torch.randint(1, 37, (2, 4))
    greedy = greedy_generate(lm, prompt, max_new_tokens=5, eos_id=36)
    beams = beam_generate(lm, prompt, max_new_tokens=5, eos_id=36, beam_size=1)
    for row, beam in zip(greedy.tolist(), beams):
        assert [t for t in row if t != 36][: len(beam)] == beam
    assert len(beam_generate(lm, prompt, max_new_tokens=4, eos_id=36, beam_size=3)) == 2


def test_lm_trains_a_step_with_gradients_everywhere():
    lm = make_lm(moe=MOE).train()
    ids = torch.randint(1, 37, (2, 8))
    out = lm(ids)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 37), ids[:, 1:].reshape(-1)) + out.aux_loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in lm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    before = lm.layers[0].self_attn.kv_b_proj.weight.detach().clone()
    torch.optim.SGD(lm.parameters(), lr=0.1).step()
    assert not torch.equal(before, lm.layers[0].self_attn.kv_b_proj.weight)


def test_refusal_and_hooks_find_out_proj():
    """Code that edits ``self_attn.out_proj`` (weight orthogonalization) finds it on MLA too."""
    lm = make_lm()
    names = {n for n, _ in lm.named_parameters()}
    assert "layers.0.self_attn.out_proj.weight" in names
    assert "layers.0.self_attn.kv_a_proj_with_mqa.weight" in names


# --- config --------------------------------------------------------------------------------------

MLA = {"kind": "mla", "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}


@pytest.mark.parametrize(
    ("attention", "key", "words"),
    [
        ({"kind": "mla"}, "kv_lora_rank", "required with kind 'mla'"),
        ({**MLA, "v_head_dim": None}, "v_head_dim", "required"),
        ({**MLA, "qk_rope_head_dim": 5}, "qk_rope_head_dim", "even"),
        ({**MLA, "kv_lora_rank": 0}, "kv_lora_rank", "positive"),
        ({**MLA, "q_lora_rank": -1}, "q_lora_rank", "positive"),
        ({**MLA, "n_kv_heads": 2}, "n_kv_heads", "means nothing with kind 'mla'"),
        ({**MLA, "qkv_bias": True}, "qkv_bias", "attention_bias"),
        ({"kv_lora_rank": 16}, "kv_lora_rank", "belongs to kind 'mla'"),
        ({"kind": "gqa"}, "kind", "'mha', 'mla'"),
    ],
)
def test_attention_config_errors_name_the_key(attention, key, words):
    with pytest.raises(ConfigError, match=words) as info:
        AttentionConfig(**attention)
    assert info.value.key == key
    with pytest.raises(ConfigError) as info:
        model_config_from_dict({"vocab_size": 10, "arch": "decoder", "position": "rope", "attention": attention})
    assert info.value.key == f"model.attention.{key}"


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "seq2seq", "position": "sinusoidal"},
        {"arch": "decoder", "position": "learned"},
    ],
)
def test_mla_needs_a_decoder_with_rope(model):
    with pytest.raises(ConfigError, match="'mla' needs arch 'decoder' and position 'rope'") as info:
        ModelConfig(vocab_size=10, attention=AttentionConfig(**MLA), **model)
    assert info.value.key == "attention.kind"


def test_mla_head_sizes_are_free_of_d_model():
    """d_model need not divide by n_heads: MLA's head sizes are its own."""
    c = ModelConfig(
        vocab_size=10, arch="decoder", position="rope", d_model=36, attention=AttentionConfig(n_heads=5, **MLA)
    )
    lm = DecoderLM(c)
    assert lm(torch.randint(1, 10, (1, 3))).logits.shape == (1, 3, 10)


def test_mla_config_round_trips_and_loads_from_toml(tmp_path):
    from moeformer import load_config
    from moeformer.config import config_to_dict

    path = tmp_path / "mla.toml"
    path.write_text(
        '[model]\npreset = "lm-tiny-mla"\nvocab_size = 50\n[model.attention]\nq_lora_rank = 8\n', encoding="utf-8"
    )
    c = load_config(path).model
    assert (c.attention.kind, c.attention.q_lora_rank, c.attention.kv_lora_rank) == ("mla", 8, 16)
    assert model_config_from_dict(config_to_dict(c)) == c


def test_an_mha_preset_switched_to_mla_drops_its_kv_head_count():
    """preset lm-tiny has n_kv_heads = 2; asking for kind 'mla' on top of it must not inherit that."""
    config = model_config_from_dict({"preset": "lm-tiny", "vocab_size": 20, "attention": MLA})
    assert config.attention.kind == "mla" and config.attention.n_kv_heads is None
    with pytest.raises(ConfigError, match="n_kv_heads"):  # said by the user: still an error
        model_config_from_dict({"preset": "lm-tiny", "vocab_size": 20, "attention": {**MLA, "n_kv_heads": 2}})


@pytest.mark.parametrize("key", ["head_dim", "qk_norm"])
def test_multi_head_attention_options_are_refused_for_mla(key):
    with pytest.raises(ConfigError, match="belongs to kind 'mha'") as info:
        AttentionConfig(**MLA, **{key: 8 if key == "head_dim" else True})
    assert info.value.key == key
