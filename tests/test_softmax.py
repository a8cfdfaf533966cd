"""Tests for the numerically stable softmax (moeformer.layers.softmax)."""

from __future__ import annotations

import math

import pytest
import torch

from moeformer.layers import stable_softmax


@pytest.mark.parametrize("shape, dim", [((7,), -1), ((4, 9), -1), ((3, 5, 6), 1), ((2, 3, 4, 5), 0)])
def test_matches_torch_softmax(shape, dim):
    """On ordinary random logits, stable_softmax equals torch.softmax along any dim."""
    torch.manual_seed(0)
    z = torch.randn(shape) * 3
    torch.testing.assert_close(stable_softmax(z, dim=dim), torch.softmax(z, dim=dim), atol=1e-6, rtol=1e-6)


def test_rows_sum_to_one():
    """Every row of the output is a probability distribution: entries in [0, 1] that sum to 1."""
    torch.manual_seed(1)
    p = stable_softmax(torch.randn(6, 11) * 10)
    assert (p >= 0).all() and (p <= 1).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(6), atol=1e-6, rtol=0)


def test_huge_logits_naive_fails_stable_is_exact():
    """Logits of magnitude 1e4 overflow a naive exp(z)/sum(exp(z)) to NaN; ours matches float64."""
    values = [1e4, 1e4 - 1, -1e4]
    z = torch.tensor([values], dtype=torch.float32)

    naive = torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
    assert torch.isnan(naive).any(), "the naive formula was expected to overflow (inf / inf)"

    # Closed form in float64 with python math: shift by the max by hand.
    peak = max(values)
    exps = [math.exp(v - peak) for v in values]
    expected = torch.tensor([[e / sum(exps) for e in exps]], dtype=torch.float32)

    ours = stable_softmax(z)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, atol=1e-7, rtol=1e-6)
    assert ours[0, 2] == 0.0
    torch.testing.assert_close(ours.sum(-1), torch.ones(1), atol=1e-6, rtol=0)


def test_huge_negative_logits():
    """All-very-negative logits (exp underflows to 0 everywhere naively) still give a valid softmax."""
    z = torch.tensor([[-1e4, -1e4 - 2.0, -1e4 + 1.0]])
    naive = torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
    assert torch.isnan(naive).any()  # 0 / 0
    expected = torch.softmax(torch.tensor([[0.0, -2.0, 1.0]], dtype=torch.float64), -1).float()
    torch.testing.assert_close(stable_softmax(z), expected, atol=1e-7, rtol=1e-6)


def test_all_minus_inf_row_gives_zeros():
    """A row in which every logit is -inf (nothing to attend to) gives zeros, not NaN; other rows unaffected."""
    z = torch.tensor(
        [
            [float("-inf")] * 4,
            [0.5, float("-inf"), -1.0, 2.0],
        ]
    )
    p = stable_softmax(z)
    assert not torch.isnan(p).any()
    assert torch.equal(p[0], torch.zeros(4))
    expected = torch.softmax(torch.tensor([0.5, -1.0, 2.0]), -1)
    torch.testing.assert_close(p[1, [0, 2, 3]], expected)
    assert p[1, 1] == 0.0
    torch.testing.assert_close(p[1].sum(), torch.tensor(1.0))


def test_gradient_matches_torch_softmax():
    """Detaching the max shift does not change the gradient (softmax is shift-invariant)."""
    torch.manual_seed(2)
    z1 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    g = torch.randn(3, 8, dtype=torch.float64)
    (stable_softmax(z1) * g).sum().backward()
    (torch.softmax(z2, -1) * g).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad)
