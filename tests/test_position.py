"""Tests for positional signals (moeformer.layers.position): sinusoidal, learned and rotary."""

from __future__ import annotations

import math

import pytest
import torch

from moeformer.layers import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_table,
)


def _closed_form(pos: int, col: int, d_model: int) -> float:
    """The paper's formula, column ``col`` = 2i (sine) or 2i + 1 (cosine), in python floats."""
    two_i = col - (col % 2)
    angle = pos / 10000 ** (two_i / d_model)
    return math.sin(angle) if col % 2 == 0 else math.cos(angle)


@pytest.mark.parametrize("n_positions, d_model", [(50, 16), (50, 7), (3, 1)])
def test_sinusoidal_table_matches_closed_formula(n_positions, d_model):
    """Every entry equals sin/cos(pos / 10000^(2i/d)) computed independently with ``math``."""
    table = sinusoidal_table(n_positions, d_model)
    assert table.shape == (n_positions, d_model)
    assert table.dtype == torch.float32
    expected = torch.tensor(
        [[_closed_form(p, c, d_model) for c in range(d_model)] for p in range(n_positions)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(table.double(), expected, atol=1e-7, rtol=0)


def test_sinusoidal_table_first_row():
    """Position 0 is sin(0) = 0 in even columns and cos(0) = 1 in odd columns."""
    row = sinusoidal_table(4, 10)[0]
    assert torch.equal(row[0::2], torch.zeros(5))
    assert torch.equal(row[1::2], torch.ones(5))


def test_sinusoidal_module_looks_up_positions():
    """SinusoidalPositionalEncoding returns the table rows named by a (batch, seq) position tensor."""
    pe = SinusoidalPositionalEncoding(max_len=32, d_model=8)
    table = sinusoidal_table(32, 8)
    positions = torch.tensor([[0, 1, 2, 3], [5, 5, 31, 0]])
    out = pe(positions)
    assert out.shape == (2, 4, 8)
    for b in range(2):
        for t in range(4):
            assert torch.equal(out[b, t], table[positions[b, t]])
    assert list(pe.parameters()) == []  # fixed, not trained
    assert "table" not in pe.state_dict()  # non-persistent buffer


def test_learned_positional_embedding_shape():
    """LearnedPositionalEmbedding maps (batch, seq) positions to (batch, seq, d_model) trained rows."""
    torch.manual_seed(0)
    emb = LearnedPositionalEmbedding(max_len=20, d_model=6)
    positions = torch.tensor([[0, 1, 2], [19, 4, 4]])
    out = emb(positions)
    assert out.shape == (2, 3, 6)
    assert torch.equal(out[1, 0], emb.weight[19])
    assert torch.equal(out[1, 1], out[1, 2])
    assert emb.weight.requires_grad and emb.weight.shape == (20, 6)


def _rotate(x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    """Rotate x: (B, H, T, Dh) by the angles of positions: (B, T)."""
    cos, sin = rope(positions)
    return apply_rotary(x, cos, sin)


def test_rotary_output_shapes():
    """RotaryEmbedding returns (cos, sin), each (batch, seq, head_dim) float32."""
    rope = RotaryEmbedding(head_dim=8)
    cos, sin = rope(torch.arange(5)[None].expand(2, 5))
    assert cos.shape == sin.shape == (2, 5, 8)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos**2 + sin**2, torch.ones(2, 5, 8))


def test_rotary_odd_head_dim_raises():
    """RoPE pairs dimensions, so an odd head_dim is refused with a clear error."""
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(head_dim=7)


def test_rotary_position_zero_is_identity():
    """Rotating by position 0 leaves the vector unchanged."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16)
    x = torch.randn(2, 3, 4, 16)
    out = _rotate(x, torch.zeros(2, 4, dtype=torch.long), rope)
    torch.testing.assert_close(out, x, atol=0, rtol=0)


def test_rotary_preserves_norm():
    """A rotation keeps the Euclidean norm of every head vector (and changes the vector itself)."""
    torch.manual_seed(1)
    rope = RotaryEmbedding(head_dim=16)
    x = torch.randn(2, 3, 10, 16)
    positions = torch.randint(0, 200, (2, 10))
    out = _rotate(x, positions, rope)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x)


def test_rotary_matches_complex_rotation():
    """Rotate-half layout: dims (j, j + Dh/2) form the complex number rotated by pos * base^(-2j/Dh)."""
    torch.manual_seed(2)
    head_dim, base = 8, 10000.0
    rope = RotaryEmbedding(head_dim=head_dim, base=base)
    x = torch.randn(1, 2, 5, head_dim, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 3, 7, 12]])
    out = _rotate(x, positions, rope)
    half = head_dim // 2
    theta = torch.tensor([base ** (-2 * j / head_dim) for j in range(half)], dtype=torch.float64)
    angles = positions[0, :, None].double() * theta  # (T, half)
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_rotary_dot_product_depends_only_on_offset():
    """<R(m) q, R(n) k> is a function of m - n alone: equal for every (m, n) with the same shift."""
    torch.manual_seed(3)
    rope = RotaryEmbedding(head_dim=16)
    q = torch.randn(16)
    k = torch.randn(16)

    def score(m: int, n: int) -> float:
        rq = _rotate(q.view(1, 1, 1, 16), torch.tensor([[m]]), rope)
        rk = _rotate(k.view(1, 1, 1, 16), torch.tensor([[n]]), rope)
        return float((rq * rk).sum())

    by_shift = {}
    for shift in (-5, -1, 0, 2, 9):
        values = [score(n + shift, n) for n in (0, 3, 17, 40)]
        for v in values[1:]:
            assert v == pytest.approx(values[0], abs=1e-4)
        by_shift[shift] = values[0]
    assert by_shift[0] == pytest.approx(float(q @ k), abs=1e-5)  # no relative rotation at shift 0
    # The score really does vary with the shift (the test would be vacuous otherwise).
    assert len({round(v, 3) for v in by_shift.values()}) == len(by_shift)


def test_llama3_rope_scaling_equals_transformers_frequencies():
    """Our RopeScaling gives the inverse frequencies of transformers' own "llama3" initialiser."""
    transformers = pytest.importorskip("transformers", reason="compares with transformers' RoPE initialiser")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moeformer.layers.position import RopeScaling

    params = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **params}
    )
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config)
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
    ours = RotaryEmbedding(128, 5e5, scaling).inv_freq
    plain = RotaryEmbedding(128, 5e5).inv_freq
    assert attention_factor == 1.0
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    kept, stretched = ours == plain, torch.isclose(ours, plain / 8)
    assert kept.any() and stretched.any() and (~kept & ~stretched).any()  # all three bands are exercised


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"factor": 0.0}, "factor"), ({"low_freq_factor": 4.0, "high_freq_factor": 4.0}, "high_freq_factor")],
)
def test_rope_scaling_errors_name_the_key(kwargs, key):
    from moeformer.config import ConfigError
    from moeformer.layers.position import RopeScaling

    with pytest.raises(ConfigError) as info:
        RopeScaling(**kwargs)
    assert info.value.key == key


@pytest.mark.parametrize(
    "params",
    [
        {"factor": 4.0, "original_max_position_embeddings": 32},
        {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0},
        {"factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
        {"factor": 2.0, "original_max_position_embeddings": 128, "attention_factor": 1.3},
    ],
)
def test_yarn_rope_scaling_equals_transformers_frequencies_and_factor(params):
    """YaRN's ramped frequencies and cos/sin factor equal transformers' own "yarn" initialiser."""
    transformers = pytest.importorskip("transformers", reason="compares with transformers' RoPE initialiser")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moeformer.layers.position import RopeScaling

    config = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=2, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, **params}
    )
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    fields = {k: v for k, v in params.items() if k != "original_max_position_embeddings"}
    scaling = RopeScaling(kind="yarn", original_max_seq_len=params["original_max_position_embeddings"], **fields)
    rotary = RotaryEmbedding(64, 1e4, scaling)
    torch.testing.assert_close(rotary.inv_freq, theirs.float(), rtol=1e-5, atol=0)
    assert rotary.scale == pytest.approx(attention_factor, rel=1e-12)
    plain = RotaryEmbedding(64, 1e4).inv_freq
    assert (rotary.inv_freq < plain * 0.999).any() and torch.isclose(rotary.inv_freq[0], plain[0])
