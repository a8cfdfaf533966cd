"""Tests for scaled dot-product and multi-head attention (moeformer.layers.attention).

Mask conventions checked here: ours (and ``F.scaled_dot_product_attention``) use bool True =
"may attend"; ``nn.MultiheadAttention`` uses bool True = "may NOT attend" for ``attn_mask``;
``key_padding_mask`` is True = padding in both.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moeformer.layers import KVCache, MultiHeadAttention, scaled_dot_product_attention

BACKENDS = ["sdpa", "reference"]
TOL = 1e-5


def assert_max_abs(actual: Tensor, expected: Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    err = (actual - expected).abs().max().item()
    assert err < tol, f"max abs err {err:.3g} >= {tol:.0e}"


def random_bool_mask(*shape: int, p: float = 0.5) -> Tensor:
    """A random 'may attend' mask (..., T, S) in which every query row may attend to at least one key."""
    mask = torch.rand(shape) < p
    T, S = shape[-2:]
    mask[..., torch.arange(T), torch.randint(S, (T,))] = True
    return mask


def torch_mha_like(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    """An nn.MultiheadAttention with exactly the weights of ``ours`` (which must have bias=True)."""
    kv_dim = ours.k_proj.in_features
    ref = nn.MultiheadAttention(
        ours.d_model, ours.n_heads, dropout=0.0, batch_first=True, bias=True, kdim=kv_dim, vdim=kv_dim
    )
    with torch.no_grad():
        if ref._qkv_same_embed_dim:
            ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        else:
            ref.q_proj_weight.copy_(ours.q_proj.weight)
            ref.k_proj_weight.copy_(ours.k_proj.weight)
            ref.v_proj_weight.copy_(ours.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref.eval()


# --------------------------------------------------------------------------------------------
# The reference scaled_dot_product_attention function
# --------------------------------------------------------------------------------------------


def _qkv(B=2, H=3, T=5, S=7, Dk=8, Dv=6, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return (
        torch.randn(B, H, T, Dk, dtype=dtype),
        torch.randn(B, H, S, Dk, dtype=dtype),
        torch.randn(B, H, S, Dv, dtype=dtype),
    )


@pytest.mark.parametrize(
    "case", ["no_mask", "bool_mask", "bool_mask_2d", "float_mask", "causal_square", "causal_rect", "scale"]
)
def test_reference_sdpa_matches_torch(case):
    """The step-by-step reference equals F.scaled_dot_product_attention for every mask kind."""
    T, S = (6, 6) if case == "causal_square" else (5, 7)
    q, k, v = _qkv(T=T, S=S)
    kwargs: dict = {}
    if case == "bool_mask":
        kwargs["attn_mask"] = random_bool_mask(2, 3, T, S)
    elif case == "bool_mask_2d":
        kwargs["attn_mask"] = random_bool_mask(T, S)
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, T, S)
    elif case.startswith("causal"):
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.37
    out, weights = scaled_dot_product_attention(q, k, v, **kwargs)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert_max_abs(out, expected)
    assert weights.shape == (2, 3, T, S)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, T), atol=1e-6, rtol=0)


def test_reference_weights_equal_softmax_by_hand():
    """Weights are softmax(Q K^T / sqrt(d_k)) and the output is weights @ V."""
    q, k, v = _qkv(dtype=torch.float64)
    out, weights = scaled_dot_product_attention(q, k, v)
    manual = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    torch.testing.assert_close(weights, manual)
    torch.testing.assert_close(out, manual @ v)


def test_reference_masked_weights_are_zero():
    """Masked keys (bool False, or the future under is_causal) get exactly zero weight."""
    q, k, v = _qkv(T=6, S=6)
    mask = random_bool_mask(6, 6)
    _, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (weights[..., ~mask] == 0).all()
    _, weights = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (weights[..., torch.ones(6, 6, dtype=torch.bool).triu(1)] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 6))


def test_reference_fully_masked_row_gives_zeros():
    """A query that may attend to no key gets zero weights and a zero output, not NaN."""
    q, k, v = _qkv()
    mask = random_bool_mask(5, 7)
    mask[2] = False
    out, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()
    assert (weights[..., 2, :] == 0).all()
    assert (out[..., 2, :] == 0).all()


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_reference_gradcheck(mask_kind):
    """Analytic gradients of the reference attention (output and weights) match finite differences."""
    q, k, v = _qkv(B=1, H=2, T=3, S=4, Dk=4, Dv=3, dtype=torch.float64, seed=3)
    if mask_kind == "causal":
        k, v = k[..., :3, :], v[..., :3, :]
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    kwargs: dict = {}
    if mask_kind == "bool":
        kwargs["attn_mask"] = random_bool_mask(3, 4)
    elif mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(3, 4, dtype=torch.float64)
    elif mask_kind == "causal":
        kwargs["is_causal"] = True
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, **kwargs), (q, k, v), eps=1e-6, atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# MultiHeadAttention against torch.nn.MultiheadAttention
# --------------------------------------------------------------------------------------------

B, T, S, D, H = 2, 5, 7, 16, 4

MHA_CASES = ["self", "cross", "cross_kv_dim", "padding", "bool_mask_2d", "bool_mask_4d", "causal", "causal_padding"]


def _mha_case(case: str):
    """Inputs for ours and the matching keyword arguments for torch's nn.MultiheadAttention."""
    torch.manual_seed(10)
    kv_dim = 12 if case == "cross_kv_dim" else D
    x = torch.randn(B, T, D)
    if case in ("self", "padding", "causal", "causal_padding", "bool_mask_2d", "bool_mask_4d"):
        query = key = value = x
        s = T
    else:
        query, s = x, S
        key = torch.randn(B, S, kv_dim)
        value = torch.randn(B, S, kv_dim)
    ours_kw: dict = {}
    torch_kw: dict = {}
    if case == "padding":
        kpm = torch.zeros(B, s, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[1, :1] = True
        ours_kw["key_padding_mask"] = torch_kw["key_padding_mask"] = kpm
    elif case == "bool_mask_2d":
        allowed = random_bool_mask(T, s)
        ours_kw["attn_mask"], torch_kw["attn_mask"] = allowed, ~allowed
    elif case == "bool_mask_4d":
        allowed = random_bool_mask(B, H, T, s)
        ours_kw["attn_mask"], torch_kw["attn_mask"] = allowed, ~allowed.reshape(B * H, T, s)
    elif case in ("causal", "causal_padding"):
        ours_kw["is_causal"] = True
        torch_kw["attn_mask"] = torch.ones(T, s, dtype=torch.bool).triu(1)
        if case == "causal_padding":  # right padding: every query still sees key 0
            kpm = torch.zeros(B, s, dtype=torch.bool)
            kpm[1, -2:] = True
            ours_kw["key_padding_mask"] = torch_kw["key_padding_mask"] = kpm
    return kv_dim, (query, key, value), ours_kw, torch_kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MHA_CASES)
def test_mha_matches_torch_multihead_attention(case, backend):
    """Outputs equal nn.MultiheadAttention's with the same weights (q/k/v packed into in_proj)."""
    kv_dim, (query, key, value), ours_kw, torch_kw = _mha_case(case)
    torch.manual_seed(11)
    ours = MultiHeadAttention(D, H, backend=backend, kv_dim=kv_dim).eval()
    ref = torch_mha_like(ours)
    with torch.no_grad():
        out = ours(query, key, value, **ours_kw)
        expected, _ = ref(query, key, value, need_weights=False, **torch_kw)
    assert out.weights is None
    assert_max_abs(out.output, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MHA_CASES)
def test_mha_weights_match_torch(case, backend):
    """need_weights=True returns per-head weights (B, H, T, S) equal to torch's average_attn_weights=False."""
    kv_dim, (query, key, value), ours_kw, torch_kw = _mha_case(case)
    torch.manual_seed(11)
    ours = MultiHeadAttention(D, H, backend=backend, kv_dim=kv_dim).eval()
    ref = torch_mha_like(ours)
    with torch.no_grad():
        out = ours(query, key, value, need_weights=True, **ours_kw)
        expected, expected_w = ref(query, key, value, need_weights=True, average_attn_weights=False, **torch_kw)
    assert_max_abs(out.output, expected)
    assert out.weights.shape == (B, H, T, key.shape[1])
    assert_max_abs(out.weights, expected_w)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(B, H, T), atol=1e-6, rtol=0)


def test_mha_float_mask_matches_torch():
    """A float additive attn_mask is added to the scores on both backends, as torch does."""
    torch.manual_seed(12)
    x = torch.randn(B, T, D)
    bias = torch.randn(T, T)
    for backend in BACKENDS:
        ours = MultiHeadAttention(D, H, backend=backend).eval()
        ref = torch_mha_like(ours)
        with torch.no_grad():
            out = ours(x, x, x, attn_mask=bias).output
            expected, _ = ref(x, x, x, attn_mask=bias, need_weights=False)
        assert_max_abs(out, expected)


def test_mha_float_mask_with_padding_matches_torch():
    """A float attn_mask combined with a key_padding_mask equals torch's combination."""
    torch.manual_seed(13)
    x = torch.randn(B, T, D)
    bias = torch.randn(T, T)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, -2:] = True
    for backend in BACKENDS:
        ours = MultiHeadAttention(D, H, backend=backend).eval()
        ref = torch_mha_like(ours)
        with torch.no_grad():
            out = ours(x, x, x, attn_mask=bias, key_padding_mask=kpm).output
            expected, _ = ref(
                x, x, x, attn_mask=bias, key_padding_mask=kpm.float().masked_fill(kpm, -math.inf), need_weights=False
            )
        assert_max_abs(out, expected)


def test_backends_agree():
    """The sdpa and reference backends give the same output for the same weights."""
    torch.manual_seed(14)
    sdpa = MultiHeadAttention(D, H, backend="sdpa").eval()
    reference = MultiHeadAttention(D, H, backend="reference").eval()
    reference.load_state_dict(sdpa.state_dict())
    x = torch.randn(B, T, D)
    mask = random_bool_mask(B, 1, T, T)
    with torch.no_grad():
        for kw in ({}, {"is_causal": True}, {"attn_mask": mask}):
            assert_max_abs(sdpa(x, x, x, **kw).output, reference(x, x, x, **kw).output)


# --------------------------------------------------------------------------------------------
# Grouped-query attention
# --------------------------------------------------------------------------------------------


def _expand_kv(gqa: MultiHeadAttention) -> MultiHeadAttention:
    """A plain multi-head layer whose k/v heads are the GQA ones, each repeated for its query group."""
    groups = gqa.n_heads // gqa.n_kv_heads
    mha = MultiHeadAttention(gqa.d_model, gqa.n_heads, backend=gqa.backend).eval()
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            w = src.weight.view(gqa.n_kv_heads, gqa.head_dim, -1).repeat_interleave(groups, dim=0)
            dst.weight.copy_(w.reshape(gqa.n_heads * gqa.head_dim, -1))
            dst.bias.copy_(src.bias.view(gqa.n_kv_heads, gqa.head_dim).repeat_interleave(groups, dim=0).flatten())
    return mha


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("kind", ["plain", "causal", "padding", "need_weights"])
def test_gqa_equals_mha_with_repeated_kv_heads(backend, n_kv_heads, kind):
    """GQA (n_kv_heads < n_heads) equals MHA whose k/v projections repeat each kv head per group."""
    torch.manual_seed(20)
    gqa = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads, backend=backend).eval()
    assert gqa.k_proj.out_features == n_kv_heads * (D // H)
    mha = _expand_kv(gqa)
    x = torch.randn(B, T, D)
    kw: dict = {}
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * (T - 2) + [True] * 2, [False] * T])
    elif kind == "need_weights":
        kw["need_weights"] = True
    with torch.no_grad():
        got, want = gqa(x, x, x, **kw), mha(x, x, x, **kw)
    assert_max_abs(got.output, want.output)
    if kind == "need_weights":
        assert_max_abs(got.weights, want.weights)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_incremental_equals_full_causal_pass(backend, n_kv_heads, chunk):
    """Feeding tokens 1 (or 3) at a time through a KVCache equals one causal pass over the sequence.

    Chunks of 3 after the first exercise T > 1 with cached keys, i.e. the bottom-right-aligned
    causal mask.
    """
    torch.manual_seed(30)
    mha = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads, backend=backend).eval()
    n = 8
    x = torch.randn(B, n, D)
    with torch.no_grad():
        full = mha(x, x, x, is_causal=True).output
        cache = KVCache()
        outs = []
        for start in range(0, n, chunk):
            xs = x[:, start : start + chunk]
            outs.append(mha(xs, xs, xs, is_causal=True, cache=cache).output)
            assert cache.length == min(start + chunk, n)
    assert_max_abs(torch.cat(outs, dim=1), full)
    assert cache.key.shape == (B, n_kv_heads or H, n, D // H)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_with_left_padding_equals_full_pass(backend):
    """Incremental decoding of a left-padded batch (key_padding_mask over all cached keys) equals the full pass."""
    torch.manual_seed(31)
    mha = MultiHeadAttention(D, H, backend=backend).eval()
    n = 6
    x = torch.randn(B, n, D)
    kpm = torch.zeros(B, n, dtype=torch.bool)
    kpm[1, :2] = True  # row 1 is left-padded by two positions
    with torch.no_grad():
        full = mha(x, x, x, is_causal=True, key_padding_mask=kpm).output
        cache = KVCache()
        outs = [
            mha(
                x[:, t : t + 1],
                x[:, t : t + 1],
                x[:, t : t + 1],
                is_causal=True,
                cache=cache,
                key_padding_mask=kpm[:, : t + 1],
            ).output
            for t in range(n)
        ]
    assert_max_abs(torch.cat(outs, dim=1), full)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 2])
def test_static_cache_projects_memory_once(backend, chunk):
    """Cross-attention with KVCache(static=True) calls k_proj/v_proj once and equals the uncached result."""
    torch.manual_seed(32)
    mha = MultiHeadAttention(D, H, backend=backend).eval()
    y = torch.randn(B, T, D)
    memory = torch.randn(B, S, D)
    calls = {"k": 0, "v": 0}
    with torch.no_grad():
        expected = mha(y, memory, memory).output
        hk = mha.k_proj.register_forward_hook(lambda *_: calls.__setitem__("k", calls["k"] + 1))
        hv = mha.v_proj.register_forward_hook(lambda *_: calls.__setitem__("v", calls["v"] + 1))
        try:
            cache = KVCache(static=True)
            outs = [mha(y[:, t : t + chunk], memory, memory, cache=cache).output for t in range(0, T, chunk)]
        finally:
            hk.remove()
            hv.remove()
    assert calls == {"k": 1, "v": 1}
    assert cache.length == S
    assert_max_abs(torch.cat(outs, dim=1), expected)


def test_kv_cache_reorder_selects_batch_rows():
    """KVCache.reorder keeps the requested batch rows (beam search), in the given order."""
    torch.manual_seed(33)
    k, v = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    cache = KVCache()
    cache.update(k, v)
    cache.reorder(torch.tensor([2, 0, 0]))
    assert torch.equal(cache.key, k[[2, 0, 0]])
    assert torch.equal(cache.value, v[[2, 0, 0]])


# --------------------------------------------------------------------------------------------
# Queries that may attend to nothing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_padded_batch_row_gives_zero_output(backend, need_weights):
    """A batch row whose keys are all padding gives zero attention output (not NaN); other rows are unaffected."""
    torch.manual_seed(40)
    mha = MultiHeadAttention(D, H, backend=backend, bias=False).eval()
    x = torch.randn(B, T, D)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1] = True
    with torch.no_grad():
        out = mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        clean = mha(x, x, x).output
    assert not torch.isnan(out.output).any()
    assert (out.output[1] == 0).all()
    assert_max_abs(out.output[0], clean[0])
    if need_weights:
        assert (out.weights[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_under_causal_mask_gives_zero_output(backend):
    """Left-pad queries under a causal mask see no key at all: their output is zero, the rest match torch."""
    torch.manual_seed(41)
    ours = MultiHeadAttention(D, H, backend=backend, bias=False).eval()
    x = torch.randn(B, T, D)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, :2] = True
    with torch.no_grad():
        out = ours(x, x, x, key_padding_mask=kpm, is_causal=True).output
        # Reference for the live rows: the reference function on explicitly built masks, by hand.
        q = ours.q_proj(x).view(B, T, H, -1).transpose(1, 2)
        k = ours.k_proj(x).view(B, T, H, -1).transpose(1, 2)
        v = ours.v_proj(x).view(B, T, H, -1).transpose(1, 2)
        allowed = torch.ones(T, T, dtype=torch.bool).tril() & ~kpm[:, None, None, :]
        scores = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).masked_fill(~allowed, -math.inf)
        live = allowed.any(-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(~live, 0.0), -1) * live
        expected = ours.out_proj((weights @ v).transpose(1, 2).reshape(B, T, D))
    assert not torch.isnan(out).any()
    assert (out[1, :2] == 0).all()
    assert_max_abs(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_attn_mask_dead_row_gives_zero_output(backend):
    """A query row of a bool attn_mask with no True entry gives zero output on both backends."""
    torch.manual_seed(42)
    mha = MultiHeadAttention(D, H, backend=backend, bias=False).eval()
    x = torch.randn(B, T, D)
    mask = random_bool_mask(T, T)
    mask[3] = False
    with torch.no_grad():
        out = mha(x, x, x, attn_mask=mask).output
    assert not torch.isnan(out).any()
    assert (out[:, 3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_with_full_padding_gives_zero_output(backend):
    """With a float attn_mask plus a key_padding_mask that pads a whole batch row, that row is zero, not NaN.

    The module docstring promises zero output for queries that may attend to nothing "on both
    backends", whatever the mask type.
    """
    torch.manual_seed(43)
    mha = MultiHeadAttention(D, H, backend=backend, bias=False).eval()
    x = torch.randn(B, T, D)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1] = True
    with torch.no_grad():
        out = mha(x, x, x, attn_mask=torch.randn(T, T), key_padding_mask=kpm).output
    assert not torch.isnan(out).any()
    assert (out[1] == 0).all()


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


@pytest.fixture
def mha() -> MultiHeadAttention:
    torch.manual_seed(50)
    return MultiHeadAttention(D, H).eval()


def test_error_wrong_query_width(mha):
    x = torch.randn(B, T, D)
    with pytest.raises(ValueError, match=r"query has 8 features; this layer expects d_model=16"):
        mha(torch.randn(B, T, 8), x, x)


def test_error_wrong_key_width(mha):
    x = torch.randn(B, T, D)
    with pytest.raises(ValueError, match=r"key/value have 8/16 features; this layer expects 16"):
        mha(x, torch.randn(B, T, 8), x)


def test_error_2d_query(mha):
    x = torch.randn(B, T, D)
    with pytest.raises(ValueError, match=r"query must be \(batch, seq, features\), got shape \(5, 16\)"):
        mha(torch.randn(T, D), x, x)


def test_error_integer_query(mha):
    x = torch.randn(B, T, D)
    with pytest.raises(TypeError, match=r"query must be a floating-point tensor, got torch.int64"):
        mha(torch.ones(B, T, D, dtype=torch.long), x, x)


def test_error_batch_mismatch(mha):
    with pytest.raises(ValueError, match=r"batch sizes differ: query 2, key 3, value 3"):
        kv = torch.randn(3, T, D)
        mha(torch.randn(B, T, D), kv, kv)


def test_error_key_value_length_mismatch(mha):
    x = torch.randn(B, T, D)
    with pytest.raises(ValueError, match=r"key has 5 positions but value has 6"):
        mha(x, x, torch.randn(B, 6, D))


@pytest.mark.parametrize(
    "kpm, shown",
    [
        (torch.zeros(B, T + 1, dtype=torch.bool), r"torch.bool \(2, 6\)"),
        (torch.zeros(T, dtype=torch.bool), r"torch.bool \(5,\)"),
        (torch.zeros(B, T), r"torch.float32 \(2, 5\)"),
    ],
    ids=["wrong_length", "1d", "float_dtype"],
)
def test_error_bad_key_padding_mask(mha, kpm, shown):
    x = torch.randn(B, T, D)
    with pytest.raises(
        ValueError,
        match=r"key_padding_mask must be a bool tensor of shape \(batch, keys\) = \(2, 5\) "
        r"with True at padding, got " + shown,
    ):
        mha(x, x, x, key_padding_mask=kpm)


@pytest.mark.parametrize(
    "shape", [(T, T + 1), (T,), (B, H + 1, T, T), (B + 1, T, T)], ids=["wrong_keys", "1d", "wrong_heads", "wrong_batch"]
)
def test_error_bad_attn_mask_shape(mha, shape):
    x = torch.randn(B, T, D)
    with pytest.raises(ValueError, match=r"attn_mask has shape .*; allowed: \(queries, keys\) = \(5, 5\)"):
        mha(x, x, x, attn_mask=torch.ones(shape, dtype=torch.bool))


def test_error_integer_attn_mask(mha):
    x = torch.randn(B, T, D)
    with pytest.raises(ValueError, match=r"attn_mask must be bool \(True = may attend\) or float, got torch.int64"):
        mha(x, x, x, attn_mask=torch.ones(T, T, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 10, "n_heads": 4}, r"d_model \(10\) must be divisible by n_heads \(4\)"),
        ({"d_model": 16, "n_heads": 4, "n_kv_heads": 3}, r"n_kv_heads \(3\) must divide n_heads \(4\)"),
        ({"d_model": 16, "n_heads": 4, "backend": "flash"}, r"backend: unknown 'flash'; allowed: 'sdpa', 'reference'"),
    ],
)
def test_error_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(**kwargs)


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_active_in_train_off_in_eval(backend):
    """Attention dropout changes the output in train mode (randomly) and is a no-op in eval mode."""
    torch.manual_seed(60)
    mha = MultiHeadAttention(D, H, dropout=0.5, backend=backend)
    plain = MultiHeadAttention(D, H, dropout=0.0, backend=backend)
    plain.load_state_dict(mha.state_dict())
    x = torch.randn(B, T, D)
    with torch.no_grad():
        no_dropout = plain(x, x, x).output
        mha.train()
        torch.manual_seed(1)
        a = mha(x, x, x).output
        torch.manual_seed(2)
        b = mha(x, x, x).output
        mha.eval()
        c = mha(x, x, x).output
        d = mha(x, x, x).output
    assert not torch.allclose(a, no_dropout, atol=1e-3)
    assert not torch.allclose(a, b, atol=1e-3)
    assert torch.equal(c, d)
    assert_max_abs(c, no_dropout)


def test_dropout_acts_on_attention_weights():
    """In train mode each returned weight is either dropped (0) or the eval weight scaled by 1 / (1 - p)."""
    torch.manual_seed(61)
    p = 0.5
    mha = MultiHeadAttention(D, H, dropout=p)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        mha.eval()
        w_eval = mha(x, x, x, need_weights=True).weights
        mha.train()
        w_train = mha(x, x, x, need_weights=True).weights
    dropped = w_train == 0
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(w_train[~dropped], w_eval[~dropped] / (1 - p))


def test_qkv_bias_apart_from_out_bias():
    """Qwen2's layout: biases on q/k/v, none on the output projection."""
    mha = MultiHeadAttention(16, 4, bias=False, qkv_bias=True)
    assert all(getattr(mha, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    assert mha.out_proj.bias is None
    plain = MultiHeadAttention(16, 4, bias=False)
    assert plain.q_proj.bias is None
