"""Encoder/decoder blocks: parity with torch's Transformer layers, and the FFN slot contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeformer import AttentionConfig, FeedForwardConfig, ModelConfig
from moeformer.layers.attention import MultiHeadAttention
from moeformer.layers.feedforward import FeedForward, FFNOutput
from moeformer.models.blocks import BlockOutput, DecoderBlock, EncoderBlock
from moeformer.models.ffn_factory import build_ffn

D, H, D_FF = 16, 4, 32
B, T, S = 3, 7, 6
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")


def block_config(norm_position: str) -> ModelConfig:
    return ModelConfig(
        arch="seq2seq",
        vocab_size=11,
        d_model=D,
        n_layers=1,
        dropout=0.0,
        norm="layernorm",
        norm_position=norm_position,
        attention=AttentionConfig(n_heads=H, bias=True, dropout=0.0),
        ffn=FeedForwardConfig(activation="relu", d_ff=D_FF, bias=True),
    )


def randomize(module: nn.Module) -> None:
    """Give every parameter (biases and norm gains included) a non-trivial random value."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.uniform_(-0.3, 0.3)


def copy_attention(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        for proj, w, b in zip(
            (ours.q_proj, ours.k_proj, ours.v_proj),
            theirs.in_proj_weight.chunk(3, dim=0),
            theirs.in_proj_bias.chunk(3),
        ):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        ours.out_proj.bias.copy_(theirs.out_proj.bias)


def copy_linear(ours: nn.Linear, theirs: nn.Linear) -> None:
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)


def copy_norm(ours: nn.LayerNorm, theirs: nn.LayerNorm) -> None:
    copy_linear(ours, theirs)  # same attribute names: weight, bias


def copy_ffn(ours: FeedForward, theirs: nn.Module) -> None:
    copy_linear(ours.up_proj, theirs.linear1)
    copy_linear(ours.down_proj, theirs.linear2)


def right_padding(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def encoder_pair(norm_position: str) -> tuple[EncoderBlock, nn.TransformerEncoderLayer]:
    torch.manual_seed(0)
    config = block_config(norm_position)
    theirs = nn.TransformerEncoderLayer(
        D,
        H,
        dim_feedforward=D_FF,
        dropout=0.0,
        activation="relu",
        batch_first=True,
        norm_first=norm_position == "pre",
    )
    randomize(theirs)
    ours = EncoderBlock(config, build_ffn(config, 0, "encoder"))
    copy_attention(ours.self_attn, theirs.self_attn)
    copy_ffn(ours.ffn, theirs)
    copy_norm(ours.attn_norm, theirs.norm1)
    copy_norm(ours.ffn_norm, theirs.norm2)
    # torch's encoder layer has an eval-mode fast path with different numerics (and zeroed
    # padding); train mode with dropout 0 is the plain math.
    return ours.eval(), theirs.train()


def decoder_pair(norm_position: str) -> tuple[DecoderBlock, nn.TransformerDecoderLayer]:
    torch.manual_seed(0)
    config = block_config(norm_position)
    theirs = nn.TransformerDecoderLayer(
        D,
        H,
        dim_feedforward=D_FF,
        dropout=0.0,
        activation="relu",
        batch_first=True,
        norm_first=norm_position == "pre",
    )
    randomize(theirs)
    ours = DecoderBlock(config, build_ffn(config, 0, "decoder"), cross_attention=True)
    copy_attention(ours.self_attn, theirs.self_attn)
    copy_attention(ours.cross_attn, theirs.multihead_attn)
    copy_ffn(ours.ffn, theirs)
    copy_norm(ours.attn_norm, theirs.norm1)
    copy_norm(ours.cross_norm, theirs.norm2)
    copy_norm(ours.ffn_norm, theirs.norm3)
    return ours.eval(), theirs.train()


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("with_padding", [False, True])
def test_encoder_block_matches_torch_encoder_layer(norm_position, with_padding):
    """EncoderBlock equals nn.TransformerEncoderLayer (same weights), with and without padding."""
    ours, theirs = encoder_pair(norm_position)
    x = torch.randn(B, S, D)
    mask = right_padding([S, 4, 2], S) if with_padding else None
    with torch.no_grad():
        expected = theirs(x, src_key_padding_mask=mask)
        got = ours(x, padding_mask=mask)
    assert isinstance(got, BlockOutput)
    assert got.hidden.shape == (B, S, D)
    torch.testing.assert_close(got.hidden, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("with_padding", [False, True])
def test_decoder_block_matches_torch_decoder_layer(norm_position, with_padding):
    """DecoderBlock(cross_attention=True) equals nn.TransformerDecoderLayer under a causal mask."""
    ours, theirs = decoder_pair(norm_position)
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    tgt_mask = right_padding([T, 5, 3], T) if with_padding else None
    mem_mask = right_padding([S, 2, 4], S) if with_padding else None
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    if with_padding:
        causal = causal.isinf()  # bool like the padding masks (True = not allowed)
    with torch.no_grad():
        expected = theirs(
            x,
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            tgt_key_padding_mask=tgt_mask,
            memory_key_padding_mask=mem_mask,
        )
        got = ours(x, padding_mask=tgt_mask, memory=memory, memory_padding_mask=mem_mask)
    assert got.hidden.shape == (B, T, D)
    torch.testing.assert_close(got.hidden, expected, atol=ATOL, rtol=0)


def test_decoder_block_without_memory_raises():
    """A cross-attending DecoderBlock called without memory says so."""
    ours, _ = decoder_pair("post")
    with pytest.raises(ValueError, match="memory="):
        ours(torch.randn(B, T, D))


class ScaledFFN(nn.Module):
    """A non-standard FFN: multiplies by a learned scalar and reports an auxiliary loss."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.loss = torch.tensor(0.25)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> FFNOutput:
        return FFNOutput(x * self.scale, aux_losses={"x": self.loss}, stats={"load": torch.ones(3)})


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_block_uses_whatever_ffn_it_is_given(kind):
    """A block runs the FFN module it is given and returns its FFNOutput (aux losses, stats) as is."""
    torch.manual_seed(0)
    config = block_config("post")
    ffn = ScaledFFN()
    block = EncoderBlock(config, ffn) if kind == "encoder" else DecoderBlock(config, ffn, cross_attention=False)
    block.eval()
    assert block.ffn is ffn
    x = torch.randn(B, T, D)
    with torch.no_grad():
        out = block(x)
        # post-norm by hand: h = LN(x + SA(x)); out = LN(h + 2h)
        attn = block.self_attn(x, x, x, is_causal=kind == "decoder").output
        h = block.attn_norm(x + attn)
        expected = block.ffn_norm(h + 2.0 * h)
    assert out.ffn.aux_losses == {"x": ffn.loss}
    assert out.ffn.aux_losses["x"] is ffn.loss
    assert torch.equal(out.ffn.stats["load"], torch.ones(3))
    torch.testing.assert_close(out.hidden, expected, atol=ATOL, rtol=0)
