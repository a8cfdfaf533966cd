"""Tests for normalisation (moeformer.layers.norm) and the dense FFN (moeformer.layers.feedforward)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moeformer.layers import FeedForward, FFNOutput, RMSNorm, build_norm

# --------------------------------------------------------------------------------------------
# RMSNorm and build_norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rmsnorm_matches_torch(eps):
    """RMSNorm equals torch.nn.RMSNorm with the same weight and eps."""
    torch.manual_seed(0)
    d = 24
    ours = RMSNorm(d, eps=eps)
    ref = nn.RMSNorm(d, eps=eps)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(d))
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 7, d) * 5
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


def test_rmsnorm_matches_float64_formula():
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g over the last dimension."""
    torch.manual_seed(1)
    d, eps = 10, 1e-6
    norm = RMSNorm(d, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d))
    x = torch.randn(4, d)
    x64, g64 = x.double(), norm.weight.detach().double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * g64
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-6, rtol=1e-5)


def test_rmsnorm_bf16_computes_in_float32():
    """For bf16 input the statistics are taken in float32: the bf16 output is within bf16 rounding of
    the float64 formula (a bf16 mean of squares over a wide, offset vector would be far off)."""
    torch.manual_seed(2)
    d, eps = 4096, 1e-6
    norm = RMSNorm(d, eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) + 0.5)
    x = (torch.randn(3, d) + 30.0).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    x64, g64 = x.double(), norm.weight.detach().double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * g64
    # Two bf16 roundings (the normalised x, then the product with g): relative error <= ~2 * 2^-8.
    rel = ((out.double() - expected).abs() / expected.abs()).max().item()
    assert rel < 2 * 2**-8, rel


def test_rmsnorm_scale_invariance():
    """RMSNorm(c * x) == RMSNorm(x) for c > 0 (up to eps), and has no bias."""
    torch.manual_seed(3)
    norm = RMSNorm(8)
    x = torch.randn(5, 8)
    torch.testing.assert_close(norm(x * 37.0), norm(x), atol=1e-6, rtol=1e-5)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]


def test_build_norm_kinds():
    """build_norm returns LayerNorm / RMSNorm with the requested width and eps."""
    ln = build_norm("layernorm", 12, 1e-5)
    assert isinstance(ln, nn.LayerNorm) and ln.normalized_shape == (12,) and ln.eps == 1e-5
    rms = build_norm("rmsnorm", 12, 1e-6)
    assert isinstance(rms, RMSNorm) and rms.weight.shape == (12,) and rms.eps == 1e-6


def test_build_norm_unknown_kind_raises():
    """An unknown norm kind raises ValueError naming the allowed kinds."""
    with pytest.raises(ValueError, match=r"norm: unknown kind 'batchnorm'; allowed: 'layernorm', 'rmsnorm'"):
        build_norm("batchnorm", 12, 1e-5)


# --------------------------------------------------------------------------------------------
# FeedForward
# --------------------------------------------------------------------------------------------


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b written out by hand (b may be None)."""
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "activation, act",
    [
        ("relu", lambda h: h.clamp_min(0)),
        ("gelu", lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))),
    ],
)
def test_feedforward_dense_formula(activation, act, bias):
    """relu/gelu FFN(x) = down(act(up(x))) with the exact (erf) GELU."""
    torch.manual_seed(10)
    ffn = FeedForward(8, 32, activation=activation, bias=bias)
    assert not hasattr(ffn, "gate_proj")
    assert (ffn.up_proj.bias is not None) == bias
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out = ffn(x)
        expected = _linear(ffn.down_proj, act(_linear(ffn.up_proj, x)))
    assert isinstance(out, FFNOutput)
    assert out.output.shape == (2, 5, 8)
    torch.testing.assert_close(out.output, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_feedforward_swiglu_formula(bias):
    """SwiGLU(x) = down(silu(gate(x)) * up(x)) with silu(z) = z * sigmoid(z)."""
    torch.manual_seed(11)
    ffn = FeedForward(8, 20, activation="swiglu", bias=bias)
    assert ffn.gate_proj.weight.shape == ffn.up_proj.weight.shape == (20, 8)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        gate = _linear(ffn.gate_proj, x)
        expected = _linear(ffn.down_proj, gate * torch.sigmoid(gate) * _linear(ffn.up_proj, x))
        out = ffn(x)
    torch.testing.assert_close(out.output, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ffn.hidden(x), F.silu(gate) * _linear(ffn.up_proj, x))


def test_feedforward_is_position_wise():
    """The FFN acts on each position independently: permuting positions permutes the output."""
    torch.manual_seed(12)
    ffn = FeedForward(8, 16, activation="gelu")
    x = torch.randn(2, 6, 8)
    perm = torch.randperm(6)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x[:, perm]).output, ffn(x).output[:, perm])


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_dense_ffn_output_has_empty_aux_and_stats(activation):
    """A dense FFN returns FFNOutput with empty aux_losses and stats dicts (fresh per call)."""
    ffn = FeedForward(4, 8, activation=activation)
    a = ffn(torch.randn(1, 2, 4))
    b = ffn(torch.randn(1, 2, 4))
    assert a.aux_losses == {} and a.stats == {}
    assert a.aux_losses is not b.aux_losses  # no shared mutable default


def test_feedforward_unknown_activation_raises():
    """An unknown activation raises ValueError naming the allowed values."""
    with pytest.raises(ValueError, match=r"activation: unknown 'tanh'; allowed: 'relu', 'gelu', 'swiglu'"):
        FeedForward(4, 8, activation="tanh")
