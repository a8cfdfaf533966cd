"""Seq2SeqTransformer: size, causality, padding, KV cache, tying, outputs, input errors, greedy."""

from __future__ import annotations

import pytest
import torch

from moeformer import Seq2SeqTransformer, preset
from moeformer.decode import greedy_translate

ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")
PAD = 0  # pad_id of the presets


def tokens(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Random non-padding ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def pad_right(rows: list[torch.Tensor], total: int, fill: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), total), fill, dtype=torch.long)
    mask = torch.ones(len(rows), total, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = False
    return ids, mask


def paper_parameter_count(vocab: int, d: int, d_ff: int, n_enc: int, n_dec: int, embeddings: int) -> int:
    """Parameters of the paper's model by formula: biased projections, LayerNorm gain + bias."""
    attention = 4 * (d * d + d)  # W^Q, W^K, W^V, W^O with biases
    ffn = (d * d_ff + d_ff) + (d_ff * d + d)
    layer_norm = 2 * d
    encoder_layer = attention + ffn + 2 * layer_norm
    decoder_layer = 2 * attention + ffn + 3 * layer_norm
    # sinusoidal positions have no parameters; the output projection is tied to the target embedding
    return n_enc * encoder_layer + n_dec * decoder_layer + embeddings * vocab * d


def test_base_preset_is_the_paper_base_model():
    """'transformer-base' is Table 3's base model and its parameter count matches the formula."""
    vocab = 1000
    config = preset("transformer-base", vocab_size=vocab)
    assert (config.d_model, config.attention.n_heads, config.n_layers, config.encoder_layers) == (512, 8, 6, 6)
    assert (config.ffn.d_ff, config.dropout, config.norm_position) == (2048, 0.1, "post")
    assert config.tie_embeddings and config.position == "sinusoidal"
    torch.manual_seed(0)
    model = Seq2SeqTransformer(config)
    expected = paper_parameter_count(vocab, 512, 2048, 6, 6, embeddings=2)  # source + target
    assert model.num_parameters() == expected
    assert sum(p.numel() for p in model.parameters()) == expected


def test_tiny_parameter_count_with_shared_and_untied_embeddings(make_seq2seq):
    """Sharing removes one V x d matrix, untying adds one; the rest matches the formula."""
    V, d = 37, 32
    base = paper_parameter_count(V, d, 64, 2, 2, embeddings=0)
    assert make_seq2seq().num_parameters() == base + 2 * V * d
    assert make_seq2seq(share_embeddings=True).num_parameters() == base + V * d
    assert make_seq2seq(tie_embeddings=False).num_parameters() == base + 3 * V * d


def test_constructing_with_a_decoder_config_raises():
    """Seq2SeqTransformer refuses an arch='decoder' config."""
    with pytest.raises(ValueError, match="arch='seq2seq'"):
        Seq2SeqTransformer(preset("lm-tiny", vocab_size=37))


@torch.no_grad()
def test_decoder_is_causal(make_seq2seq):
    """Changing target tokens after position t never changes the logits at positions <= t."""
    model = make_seq2seq()
    V = model.config.vocab_size
    src, tgt = tokens(2, 6, V, 1), tokens(2, 8, V, 2)
    logits = model(src, tgt).logits
    for t in range(tgt.shape[1] - 1):
        changed = tgt.clone()
        changed[:, t + 1 :] = (tgt[:, t + 1 :] + 5) % (V - 1) + 1
        other = model(src, changed).logits
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], atol=ATOL, rtol=0)
        assert not torch.allclose(other[:, t + 1], logits[:, t + 1], atol=1e-3)  # the change is seen


@torch.no_grad()
def test_padding_does_not_change_real_positions(make_seq2seq):
    """A right-padded batch gives, at real positions, the logits of each unpadded sentence alone."""
    model = make_seq2seq()
    V = model.config.vocab_size
    src_rows = [tokens(1, n, V, 10 + n)[0] for n in (5, 3, 7)]
    tgt_rows = [tokens(1, n, V, 20 + n)[0] for n in (4, 6, 2)]
    src, src_mask = pad_right(src_rows, 9)
    tgt, tgt_mask = pad_right(tgt_rows, 8)
    batched = model(src, tgt, src_padding_mask=src_mask, tgt_padding_mask=tgt_mask).logits
    assert batched.shape == (3, 8, V)
    for i, (s, t) in enumerate(zip(src_rows, tgt_rows)):
        alone = model(s[None], t[None]).logits[0]
        torch.testing.assert_close(batched[i, : len(t)], alone, atol=ATOL, rtol=0)


@torch.no_grad()
def test_padding_token_values_do_not_matter(make_seq2seq):
    """Whatever ids sit at masked source/target positions, real target positions are unchanged."""
    model = make_seq2seq()
    V = model.config.vocab_size
    src, src_mask = pad_right([tokens(1, 4, V, 1)[0], tokens(1, 6, V, 2)[0]], 6)
    tgt, tgt_mask = pad_right([tokens(1, 5, V, 3)[0], tokens(1, 3, V, 4)[0]], 5)
    logits = model(src, tgt, src_padding_mask=src_mask, tgt_padding_mask=tgt_mask).logits
    noise_src = torch.where(src_mask, tokens(2, 6, V, 5), src)
    noise_tgt = torch.where(tgt_mask, tokens(2, 5, V, 6), tgt)
    assert not torch.equal(noise_src, src)
    other = model(noise_src, noise_tgt, src_padding_mask=src_mask, tgt_padding_mask=tgt_mask).logits
    real = ~tgt_mask
    torch.testing.assert_close(other[real], logits[real], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 3], [7]])
def test_kv_cache_matches_full_forward(make_seq2seq, chunks):
    """Decoding with the KV cache, token by token or in chunks, gives the full forward's logits."""
    model = make_seq2seq()
    V = model.config.vocab_size
    src, src_mask = pad_right([tokens(1, 6, V, 1)[0], tokens(1, 3, V, 2)[0]], 6)
    tgt = tokens(2, sum(chunks), V, 3)
    memory = model.encode(src, src_padding_mask=src_mask)
    full = model.decode(tgt, memory).logits
    cache = model.new_cache()
    pieces, start = [], 0
    for n in chunks:
        out = model.decode(tgt[:, start : start + n], memory, cache=cache)
        assert out.cache is cache
        pieces.append(out.logits)
        start += n
    assert cache.length == tgt.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_source_is_encoded_and_projected_once(make_seq2seq):
    """Greedy decoding runs the encoder once and projects cross-attention K/V once per layer."""
    model = make_seq2seq()
    calls = {"encoder": 0, "cross_k": 0, "cross_v": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1

        return hook

    handles = [model.encoder[0].register_forward_hook(counter("encoder"))]
    for block in model.decoder:
        handles.append(block.cross_attn.k_proj.register_forward_hook(counter("cross_k")))
        handles.append(block.cross_attn.v_proj.register_forward_hook(counter("cross_v")))
    try:
        out = greedy_translate(model, tokens(2, 5, model.config.vocab_size, 1), bos_id=1, eos_id=2, max_len=6)
    finally:
        for h in handles:
            h.remove()
    assert out.shape[1] >= 2  # several decoder steps ran
    assert calls == {"encoder": 1, "cross_k": len(model.decoder), "cross_v": len(model.decoder)}


def test_embeddings_are_tied_and_shared_as_configured(make_seq2seq):
    """lm_head uses the target embedding; share_embeddings joins source and target; untying separates."""
    model = make_seq2seq()
    tgt_w, src_w = model.tgt_embedding.embed.weight, model.src_embedding.embed.weight
    assert model.lm_head.weight is tgt_w
    assert src_w is not tgt_w
    shared = make_seq2seq(share_embeddings=True)
    assert shared.src_embedding.embed.weight is shared.tgt_embedding.embed.weight
    assert shared.lm_head.weight is shared.tgt_embedding.embed.weight
    untied = make_seq2seq(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tgt_embedding.embed.weight
    assert untied.lm_head.weight.data_ptr() != untied.tgt_embedding.embed.weight.data_ptr()


def test_tied_output_projection_gets_gradient_through_embedding(make_seq2seq):
    """With tying, one parameter receives gradient from both the embedding and the output projection."""
    model = make_seq2seq().train()
    V = model.config.vocab_size
    src, tgt = tokens(2, 4, V, 1), tokens(2, 3, V, 2)
    model(src, tgt).logits.sum().backward()
    weight = model.tgt_embedding.embed.weight
    unused = sorted(set(range(V)) - set(tgt.flatten().tolist()))
    # rows of target ids never fed still get gradient, from the output projection
    assert weight.grad[unused].abs().sum() > 0


@torch.no_grad()
def test_dense_model_has_zero_aux_loss_and_no_reports(make_seq2seq):
    """A dense model returns aux_loss == 0 (a scalar) and empty reports."""
    model = make_seq2seq()
    out = model(tokens(2, 5, 37, 1), tokens(2, 4, 37, 2))
    assert out.aux_loss.shape == ()
    assert out.aux_loss.item() == 0.0
    assert out.reports.aux_losses == {} and out.reports.stats == {}
    assert out.hidden.shape == (2, 4, model.config.d_model)
    torch.testing.assert_close(model.lm_head(out.hidden), out.logits)


@torch.no_grad()
def test_bad_inputs_raise_clear_errors(make_seq2seq):
    """Bad ids, shapes, masks, lengths and batch sizes fail with messages that say what is wrong."""
    model = make_seq2seq()
    V, L = model.config.vocab_size, model.config.max_seq_len
    src, tgt = tokens(2, 5, V, 1), tokens(2, 4, V, 2)
    with pytest.raises(TypeError, match="integer token ids"):
        model(src.float(), tgt)
    with pytest.raises(TypeError, match="integer token ids"):
        model(src, tgt.float())
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(src[0], tgt)
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(src, tgt[0])
    with pytest.raises(ValueError, match=f"id {V}, outside the vocabulary"):
        model(src, torch.cat([tgt[:, :-1], torch.full((2, 1), V)], dim=1))
    with pytest.raises(ValueError, match="id -1, outside the vocabulary"):
        model(torch.cat([src[:, :-1], torch.full((2, 1), -1)], dim=1), tgt)
    with pytest.raises(ValueError, match="src_padding_mask has shape"):
        model(src, tgt, src_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="src_padding_mask must be a bool tensor"):
        model(src, tgt, src_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="tgt_padding_mask has shape"):
        model(src, tgt, tgt_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="tgt_padding_mask must be a bool tensor"):
        model(src, tgt, tgt_padding_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=f"src: {L + 1} positions exceed the model's max_seq_len={L}"):
        model(tokens(1, L + 1, V, 3), tgt[:1])
    with pytest.raises(ValueError, match=f"tgt: {L + 1} positions exceed the model's max_seq_len={L}"):
        model(src[:1], tokens(1, L + 1, V, 3))
    memory = model.encode(src)
    with pytest.raises(ValueError, match="memory has batch 2 but tgt has batch 3"):
        model.decode(tokens(3, 4, V, 4), memory)


@torch.no_grad()
def test_cached_target_longer_than_max_seq_len_raises(make_seq2seq):
    """The length check counts cached tokens; a refused step leaves the cache as it was."""
    model = make_seq2seq()
    V, L = model.config.vocab_size, model.config.max_seq_len
    memory = model.encode(tokens(1, 5, V, 1))
    cache = model.new_cache()
    model.decode(tokens(1, L - 2, V, 2), memory, cache=cache)
    with pytest.raises(ValueError, match=f"tgt: {L + 1} positions exceed the model's max_seq_len={L}"):
        model.decode(tokens(1, 3, V, 3), memory, cache=cache)
    assert cache.length == L - 2
    model.decode(tokens(1, 2, V, 4), memory, cache=cache)  # exactly max_seq_len is fine
    assert cache.length == L


def reference_greedy(model, src, src_mask, bos_id, eos_id, max_len):
    """Greedy decoding by full forwards, no cache: argmax of the last position, EOS then EOS."""
    ids = torch.full((src.shape[0], 1), bos_id, dtype=torch.long)
    done = torch.zeros(src.shape[0], dtype=torch.bool)
    for _ in range(max_len):
        if done.all():
            break
        nxt = model(src, ids, src_padding_mask=src_mask).logits[:, -1].argmax(-1)
        nxt = nxt.masked_fill(done, eos_id)
        done = done | (nxt == eos_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[:, 1:]


@torch.no_grad()
@pytest.mark.parametrize("eos_id", [2, 36])
def test_greedy_translate_equals_full_forward_argmax(make_seq2seq, eos_id):
    """greedy_translate (KV cache) returns (B, <= max_len) ids equal to an uncached argmax loop."""
    model = make_seq2seq()
    V = model.config.vocab_size
    src, src_mask = pad_right([tokens(1, 6, V, 1)[0], tokens(1, 4, V, 2)[0], tokens(1, 2, V, 3)[0]], 6)
    max_len = 7
    got = greedy_translate(model, src, bos_id=1, eos_id=eos_id, max_len=max_len, src_padding_mask=src_mask)
    assert got.dtype == torch.long and got.shape[0] == 3 and 1 <= got.shape[1] <= max_len
    expected = reference_greedy(model, src, src_mask, 1, eos_id, max_len)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_greedy_translate_stops_when_every_row_ends():
    """Once every row has produced EOS, greedy_translate stops early and pads finished rows with EOS."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(preset("transformer-tiny", vocab_size=37)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: zeroes the target embedding too, harmless here
    # all logits equal -> argmax is id 0 everywhere; make 0 the EOS
    out = greedy_translate(model, tokens(2, 4, 37, 1), bos_id=1, eos_id=0, max_len=9)
    assert torch.equal(out, torch.zeros(2, 1, dtype=torch.long))
