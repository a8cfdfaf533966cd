"""DecoderLM: causality, left/right padding, KV cache, position kinds, GQA, backends, greedy, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeformer import DecoderLM, preset
from moeformer.decode import greedy_generate
from moeformer.layers.feedforward import FFNOutput

ATOL = 1e-5
PAD = 0
POSITIONS = ["rope", "learned", "sinusoidal", "none"]

pytestmark = pytest.mark.usefixtures("single_thread")


def tokens(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Random non-padding ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def pad(rows: list[torch.Tensor], total: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), total), PAD, dtype=torch.long)
    mask = torch.ones(len(rows), total, dtype=torch.bool)
    for i, row in enumerate(rows):
        where = slice(total - len(row), total) if left else slice(0, len(row))
        ids[i, where] = row
        mask[i, where] = False
    return ids, mask


def run_in_chunks(model: DecoderLM, ids: torch.Tensor, chunks: list[int], mask=None) -> torch.Tensor:
    cache = model.new_cache()
    pieces, start = [], 0
    for n in chunks:
        part_mask = None if mask is None else mask[:, start : start + n]
        pieces.append(model(ids[:, start : start + n], padding_mask=part_mask, cache=cache).logits)
        start += n
    assert cache.length == ids.shape[1]
    return torch.cat(pieces, dim=1)


def test_lm_tiny_preset_is_llama_style():
    """'lm-tiny' is RoPE, RMSNorm, pre-norm, SwiGLU without biases, GQA with 2 K/V heads."""
    c = preset("lm-tiny", vocab_size=37)
    assert (c.arch, c.position, c.norm, c.norm_position) == ("decoder", "rope", "rmsnorm", "pre")
    assert (c.ffn.activation, c.ffn.bias, c.attention.bias) == ("swiglu", False, False)
    assert (c.attention.n_heads, c.attention.n_kv_heads) == (4, 2)


def test_constructing_with_a_seq2seq_config_raises():
    """DecoderLM refuses an arch='seq2seq' config."""
    with pytest.raises(ValueError, match="arch='decoder'"):
        DecoderLM(preset("transformer-tiny", vocab_size=37))


@torch.no_grad()
def test_is_causal(make_lm):
    """Changing tokens after position t never changes the logits at positions <= t."""
    model = make_lm()
    V = model.config.vocab_size
    ids = tokens(2, 9, V, 1)
    logits = model(ids).logits
    assert logits.shape == (2, 9, V)
    for t in range(ids.shape[1] - 1):
        changed = ids.clone()
        changed[:, t + 1 :] = (ids[:, t + 1 :] + 5) % (V - 1) + 1
        other = model(changed).logits
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], atol=ATOL, rtol=0)
        assert not torch.allclose(other[:, t + 1], logits[:, t + 1], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("position", POSITIONS)
def test_padding_does_not_change_real_positions(make_lm, left, position):
    """A left- or right-padded batch gives, at real positions, each unpadded sequence's logits."""
    model = make_lm(position=position)
    V = model.config.vocab_size
    rows = [tokens(1, n, V, n)[0] for n in (6, 3, 8)]
    ids, mask = pad(rows, 8, left=left)
    batched = model(ids, padding_mask=mask).logits
    assert torch.isfinite(batched).all()  # fully masked (left-pad) queries give no NaN
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(batched[i][~mask[i]], alone, atol=ATOL, rtol=0)


@torch.no_grad()
def test_padding_token_values_do_not_matter(make_lm):
    """Whatever ids sit at masked positions, the real positions' logits are unchanged."""
    model = make_lm()
    V = model.config.vocab_size
    ids, mask = pad([tokens(1, 4, V, 1)[0], tokens(1, 7, V, 2)[0]], 7, left=True)
    noisy = torch.where(mask, tokens(2, 7, V, 3), ids)
    assert not torch.equal(noisy, ids)
    a = model(ids, padding_mask=mask).logits
    b = model(noisy, padding_mask=mask).logits
    torch.testing.assert_close(b[~mask], a[~mask], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("chunks", [[1] * 8, [3, 1, 4], [8]], ids=["tokens", "chunks", "whole"])
def test_kv_cache_matches_full_forward(make_lm, position, chunks):
    """Feeding tokens through the KV cache, one at a time or in chunks, gives the full forward's logits."""
    model = make_lm(position=position)
    ids = tokens(2, 8, model.config.vocab_size, 1)
    full = model(ids).logits
    torch.testing.assert_close(run_in_chunks(model, ids, chunks), full, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("position", POSITIONS)
def test_kv_cache_after_left_padded_prompt(make_lm, position):
    """A left-padded batch prompt in the cache, then new tokens: same logits as one padded forward."""
    model = make_lm(position=position)
    V = model.config.vocab_size
    prompt, prompt_mask = pad([tokens(1, n, V, n)[0] for n in (5, 2, 3)], 5, left=True)
    new = tokens(3, 4, V, 9)
    ids = torch.cat([prompt, new], dim=1)
    mask = torch.cat([prompt_mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    full = model(ids, padding_mask=mask).logits
    cache = model.new_cache()
    pieces = [model(prompt, padding_mask=prompt_mask, cache=cache).logits]
    pieces.append(model(new[:, :1], cache=cache).logits)
    pieces.append(model(new[:, 1:3], cache=cache).logits)  # a chunk without a mask
    pieces.append(model(new[:, 3:], padding_mask=torch.zeros(3, 1, dtype=torch.bool), cache=cache).logits)
    cached = torch.cat(pieces, dim=1)
    torch.testing.assert_close(cached[~mask], full[~mask], atol=ATOL, rtol=0)
    # and the real tokens' logits equal those of each unpadded sequence alone
    for i in range(3):
        alone = model(ids[i][~mask[i]][None]).logits[0]
        torch.testing.assert_close(cached[i][~mask[i]], alone, atol=ATOL, rtol=0)


def expand_kv_heads(gqa: DecoderLM, mha: DecoderLM) -> None:
    """Load ``gqa``'s weights into ``mha``, repeating each K/V head for the query heads it serves."""
    state = gqa.state_dict()
    H, G = gqa.config.attention.n_heads, gqa.config.attention.n_kv_heads
    dh = gqa.config.head_dim
    for name, value in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = value.view(G, dh, -1).repeat_interleave(H // G, dim=0).reshape(H * dh, -1)
    mha.load_state_dict(state)


@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_heads(make_lm):
    """GQA with 2 K/V heads equals plain MHA whose K/V heads are copies of the shared ones."""
    gqa = make_lm()
    mha = make_lm(attention={"n_kv_heads": None})
    dh = gqa.config.head_dim
    assert gqa.layers[0].self_attn.k_proj.out_features == 2 * dh
    assert mha.layers[0].self_attn.k_proj.out_features == 4 * dh
    expand_kv_heads(gqa, mha)
    ids, mask = pad([tokens(1, 6, 37, 1)[0], tokens(1, 4, 37, 2)[0]], 6, left=True)
    a = gqa(ids, padding_mask=mask).logits
    b = mha(ids, padding_mask=mask).logits
    torch.testing.assert_close(b[~mask], a[~mask], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("n_kv_heads", [2, None], ids=["gqa", "mha"])
def test_reference_backend_equals_sdpa(make_lm, n_kv_heads):
    """The readable 'reference' attention gives the fused 'sdpa' logits, with padding and the cache."""
    sdpa = make_lm(attention={"n_kv_heads": n_kv_heads})
    ref = make_lm(attention={"n_kv_heads": n_kv_heads, "backend": "reference"})
    ref.load_state_dict(sdpa.state_dict())
    assert ref.layers[0].self_attn.backend == "reference"
    ids, mask = pad([tokens(1, 7, 37, 1)[0], tokens(1, 3, 37, 2)[0]], 7, left=True)
    a, b = sdpa(ids, padding_mask=mask).logits, ref(ids, padding_mask=mask).logits
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)  # left-pad rows too: zero, not NaN
    torch.testing.assert_close(run_in_chunks(ref, ids, [4, 1, 2], mask), a, atol=ATOL, rtol=0)


@torch.no_grad()
def test_tie_embeddings_shares_the_matrix(make_lm):
    """lm-tiny is untied; tie_embeddings=True makes lm_head use the embedding matrix."""
    untied, tied = make_lm(), make_lm(tie_embeddings=True)
    assert untied.lm_head.weight is not untied.embedding.embed.weight
    assert tied.lm_head.weight is tied.embedding.embed.weight
    V, d = 37, untied.config.d_model
    assert untied.num_parameters() - tied.num_parameters() == V * d


@torch.no_grad()
def test_dense_model_has_zero_aux_loss_and_no_reports(make_lm):
    """A dense LM returns aux_loss == 0 (a scalar) and empty reports."""
    model = make_lm()
    out = model(tokens(2, 5, 37, 1))
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    assert out.reports.aux_losses == {} and out.reports.stats == {}
    torch.testing.assert_close(model.lm_head(out.hidden), out.logits)


class AuxFFN(nn.Module):
    """Zero output plus a fixed auxiliary loss and a statistic, like a MoE layer would report."""

    def __init__(self, loss: float) -> None:
        super().__init__()
        self.loss = torch.tensor(loss)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> FFNOutput:
        return FFNOutput(torch.zeros_like(x), aux_losses={"balance": self.loss}, stats={"load": torch.ones(2)})


@torch.no_grad()
def test_ffn_aux_losses_reach_model_output(make_lm):
    """Auxiliary losses of FFN modules are reported per layer and summed into aux_loss."""
    model = make_lm()
    model.layers[0].ffn = AuxFFN(0.25)
    model.layers[1].ffn = AuxFFN(0.5)
    out = model(tokens(2, 5, 37, 1))
    assert set(out.reports.aux_losses) == {"layers.0.balance", "layers.1.balance"}
    assert set(out.reports.stats) == {"layers.0", "layers.1"}
    assert out.aux_loss.item() == pytest.approx(0.75)


def reference_generate(model, prompt, mask, n):
    """Greedy generation by full forwards over the whole padded sequence, no cache."""
    ids, mask = prompt, mask
    for _ in range(n):
        nxt = model(ids, padding_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.zeros_like(nxt, dtype=torch.bool)], dim=1)
    return ids[:, prompt.shape[1] :]


@torch.no_grad()
@pytest.mark.parametrize("position", POSITIONS)
def test_greedy_generate_equals_uncached_argmax(make_lm, position):
    """greedy_generate (KV cache, left-padded prompt) equals an argmax loop over full forwards."""
    model = make_lm(position=position)
    prompt, mask = pad([tokens(1, n, 37, n)[0] for n in (4, 1, 3)], 4, left=True)
    got = greedy_generate(model, prompt, max_new_tokens=6, padding_mask=mask)
    assert got.shape == (3, 6) and got.dtype == torch.long
    assert torch.equal(got, reference_generate(model, prompt, mask, 6))


@torch.no_grad()
def test_bad_inputs_raise_clear_errors(make_lm):
    """Bad ids, shapes, masks and lengths fail with messages that say what is wrong."""
    model = make_lm()
    V, L = model.config.vocab_size, model.config.max_seq_len
    ids = tokens(2, 5, V, 1)
    with pytest.raises(TypeError, match="integer token ids"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=f"id {V}, outside the vocabulary"):
        model(torch.cat([ids[:, :-1], torch.full((2, 1), V)], dim=1))
    with pytest.raises(ValueError, match="id -3, outside the vocabulary"):
        model(torch.cat([torch.full((2, 1), -3), ids[:, 1:]], dim=1))
    with pytest.raises(ValueError, match="padding_mask has shape"):
        model(ids, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor"):
        model(ids, padding_mask=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"tokens: {L + 1} positions exceed the model's max_seq_len={L}"):
        model(tokens(1, L + 1, V, 2))
    cache = model.new_cache()
    model(tokens(1, L - 1, V, 3), cache=cache)
    with pytest.raises(ValueError, match=f"tokens: {L + 2} positions exceed the model's max_seq_len={L}"):
        model(tokens(1, 3, V, 4), cache=cache)
    assert cache.length == L - 1


@torch.no_grad()
def test_qk_norm_and_free_head_width_keep_cache_and_padding_properties(make_lm):
    """Qwen3-style attention (per-head q/k RMSNorm, head_dim 12 with d_model 32 and 4 heads): the cache
    still equals a full pass, left padding changes nothing, and the norms act per head."""
    model = make_lm(attention={"n_heads": 4, "n_kv_heads": 2, "bias": False, "head_dim": 12, "qk_norm": True})
    attn = model.layers[0].self_attn
    assert attn.q_proj.out_features == 48 and attn.out_proj.in_features == 48 and attn.q_norm.weight.shape == (12,)
    ids = tokens(2, 8, model.config.vocab_size, 1)
    full = model(ids).logits
    torch.testing.assert_close(run_in_chunks(model, ids, [3, 1, 4]), full, atol=ATOL, rtol=0)
    padded, mask = pad([ids[0], ids[1, :5]], 8, left=True)
    out = model(padded, padding_mask=mask).logits
    torch.testing.assert_close(out[1][~mask[1]], model(ids[1:, :5]).logits[0], atol=ATOL, rtol=0)
    with torch.no_grad():  # the norms are applied: scaling a head's q weights changes nothing after q_norm
        before = model(ids).logits
        attn.q_proj.weight[:12] *= 3.0
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=0)
