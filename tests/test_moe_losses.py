"""Tests for the MoE balance and stability losses (moeformer.moe.losses) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from moeformer.moe import losses

pytestmark = pytest.mark.usefixtures("single_thread")


def random_routing(N: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax scores (N, E) and K distinct random experts per token (N, K)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(N, E, generator=g) * 2, -1)
    index = torch.rand(N, E, generator=g).argsort(-1)[:, :K]
    return scores, index


def switch_loss_by_hand(scores: torch.Tensor, index: torch.Tensor) -> float:
    """E * sum_i f_i P_i with loops: f_i = share of the N*K assignments, P_i = mean normalised score."""
    N, E = scores.shape
    K = index.shape[1]
    total = 0.0
    for i in range(E):
        f = sum(1 for t in range(N) for k in range(K) if int(index[t, k]) == i) / (N * K)
        P = sum(float(scores[t, i]) / float(scores[t].sum()) for t in range(N)) / N
        total += f * P
    return E * total


# --------------------------------------------------------------------------------------------
# load balance (Switch / GShard / DeepSeekMoE expert-level)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2])
def test_load_balance_uniform_is_one(K):
    """Uniform scores and a perfectly even assignment give exactly 1."""
    E = 8
    N = E * 3
    scores = torch.full((N, E), 1.0 / E)
    index = torch.stack([(torch.arange(N) + k) % E for k in range(K)], -1)
    assert math.isclose(float(losses.load_balance_loss(scores, index)), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("K", [1, 2])
def test_load_balance_collapse_is_E(K):
    """One-hot scores on one expert with every assignment on it give E."""
    E, N = 6, 10
    scores = torch.zeros(N, E)
    scores[:, 2] = 1.0
    index = torch.full((N, K), 2)
    assert math.isclose(float(losses.load_balance_loss(scores, index)), float(E), rel_tol=1e-6)


@pytest.mark.parametrize(("K", "seed"), [(1, 0), (2, 1), (2, 2)])
def test_load_balance_matches_switch_formula(K, seed):
    """Random inputs: equals E * sum_i f_i P_i computed with loops (softmax and unnormalised sigmoid scores)."""
    scores, index = random_routing(17, 5, K, seed)
    assert math.isclose(
        float(losses.load_balance_loss(scores, index)), switch_loss_by_hand(scores, index), rel_tol=1e-5
    )
    sig = torch.sigmoid(torch.randn(17, 5, generator=torch.Generator().manual_seed(seed + 10)))
    assert math.isclose(float(losses.load_balance_loss(sig, index)), switch_loss_by_hand(sig, index), rel_tol=1e-5)


def test_load_balance_gradient_pushes_overloaded_expert_down():
    """d loss / d logits is positive for the overloaded expert and negative for an unused one."""
    g = torch.Generator().manual_seed(3)
    N, E = 32, 4
    logits = torch.randn(N, E, generator=g).requires_grad_(True)
    index = torch.zeros(N, 1, dtype=torch.long)
    index[: N // 4, 0] = 1  # expert 0 has 3/4 of the tokens, expert 1 a quarter, 2 and 3 none
    losses.load_balance_loss(logits.softmax(-1), index).backward()
    grad = logits.grad
    assert (grad[:, 0] > 0).all()
    assert (grad[:, 2] < 0).all() and (grad[:, 3] < 0).all()
    with torch.no_grad():  # one descent step lowers expert 0's mean probability
        before = logits.softmax(-1)[:, 0].mean()
        after = (logits - 0.5 * grad).softmax(-1)[:, 0].mean()
    assert after < before


# --------------------------------------------------------------------------------------------
# router z-loss
# --------------------------------------------------------------------------------------------


def test_z_loss_matches_hand_and_gradient_shrinks_logsumexp():
    """z-loss = mean(logsumexp^2); its gradient is 2/N * lse * softmax, and descending shrinks |lse|."""
    g = torch.Generator().manual_seed(4)
    N, E = 6, 5
    logits = torch.randn(N, E, generator=g) * 3
    logits[:3] -= 10.0  # these tokens have a negative logsumexp
    logits.requires_grad_(True)
    z = losses.router_z_loss(logits)
    lse_hand = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert math.isclose(z.item(), sum(v * v for v in lse_hand) / N, rel_tol=1e-5)
    z.backward()
    lse = torch.tensor(lse_hand)
    expected = 2.0 / N * lse[:, None] * torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, expected)
    assert (torch.sign(logits.grad) == torch.sign(lse)[:, None]).all()
    assert (lse[:3] < 0).all() and (lse[3:] > 0).all()
    stepped = torch.logsumexp(logits.detach() - 0.1 * logits.grad, -1)
    assert (stepped.abs() < lse.abs()).all()


# --------------------------------------------------------------------------------------------
# device-level balance (DeepSeekMoE eq. 14-15)
# --------------------------------------------------------------------------------------------


def device_loss_by_hand(scores: torch.Tensor, index: torch.Tensor, D: int) -> float:
    """DeepSeekMoE eq. 12-15: f_i = E/(K T) * count_i; f'_d = mean of f_i over device d; P'_d = sum of P_i."""
    N, E = scores.shape
    K = index.shape[1]
    per_device = E // D
    total = 0.0
    for d in range(D):
        experts = range(d * per_device, (d + 1) * per_device)
        f = [E / (K * N) * sum(1 for t in range(N) for k in range(K) if int(index[t, k]) == i) for i in experts]
        P = [sum(float(scores[t, i]) for t in range(N)) / N for i in experts]
        total += (sum(f) / len(f)) * sum(P)
    return total


def test_device_balance_with_one_expert_per_device_is_expert_level():
    """n_devices = E reduces the device-level loss to the expert-level loss."""
    scores, index = random_routing(23, 6, 2, 5)
    torch.testing.assert_close(losses.device_balance_loss(scores, index, 6), losses.load_balance_loss(scores, index))


@pytest.mark.parametrize(("E", "K", "D"), [(8, 2, 2), (8, 2, 4), (6, 1, 3), (12, 3, 1)])
def test_device_balance_matches_deepseekmoe_formula(E, K, D):
    """D devices: equals sum_d f'_d P'_d of DeepSeekMoE eq. 14-15 computed by hand."""
    scores, index = random_routing(19, E, K, E + K + D)
    got, want = float(losses.device_balance_loss(scores, index, D)), device_loss_by_hand(scores, index, D)
    assert math.isclose(got, want, rel_tol=1e-5), f"device_balance_loss {got:.6f} != DeepSeekMoE formula {want:.6f}"


def test_device_balance_uniform_is_one():
    """Uniform scores and an even assignment give 1 at any device count (as for the expert-level loss)."""
    E, N = 8, 16
    scores = torch.full((N, E), 1.0 / E)
    index = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], -1)
    for D in (1, 2, 4, 8):
        assert math.isclose(device_loss_by_hand(scores, index, D), 1.0, rel_tol=1e-6)
        got = float(losses.device_balance_loss(scores, index, D))
        assert math.isclose(got, 1.0, rel_tol=1e-6), f"D={D}: uniform routing gives {got:.6f}, not 1"


# --------------------------------------------------------------------------------------------
# sequence-wise balance (DeepSeek-V3 eq. 17-20)
# --------------------------------------------------------------------------------------------


def sequence_loss_by_hand(scores: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> float:
    """Per sequence over its real tokens: s' = s / sum s, f_i = E/(K T) count_i, P_i = mean s'; then the mean."""
    B, T, E = scores.shape
    K = index.shape[-1]
    values = []
    for b in range(B):
        real = [t for t in range(T) if mask[b, t]]
        n = len(real)
        total = 0.0
        for i in range(E):
            f = E / (K * n) * sum(1 for t in real for k in range(K) if int(index[b, t, k]) == i)
            P = sum(float(scores[b, t, i]) / float(scores[b, t].sum()) for t in real) / n
            total += f * P
        values.append(total)
    return sum(values) / B


def sigmoid_routing(B: int, T: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.sigmoid(torch.randn(B, T, E, generator=g) * 2)
    return scores, scores.topk(K, -1).indices


def test_sequence_balance_matches_v3_formula():
    """No mask: the per-sequence V3 formula (normalised sigmoid scores) averaged over sequences."""
    scores, index = sigmoid_routing(3, 9, 6, 2, 6)
    mask = torch.ones(3, 9, dtype=torch.bool)
    got = float(losses.sequence_balance_loss(scores, index))
    assert math.isclose(got, sequence_loss_by_hand(scores, index, mask), rel_tol=1e-5)
    # it is not the batch-level loss: per-sequence imbalance counts
    assert not math.isclose(got, float(losses.load_balance_loss(scores.view(27, 6), index.view(27, 2))), rel_tol=1e-3)


def test_sequence_balance_mask_and_sentinel():
    """padding_mask: equals the formula on the real tokens only; padding rows holding index E change nothing."""
    B, T, E, K = 3, 8, 5, 2
    scores, index = sigmoid_routing(B, T, E, K, 7)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 2:] = False
    with_sentinel = index.masked_fill(~mask[..., None], E)
    expected = sequence_loss_by_hand(scores, index, mask)
    pad = ~mask  # mask is True at real tokens, as sequence_loss_by_hand reads it
    for idx in (index, with_sentinel):
        assert math.isclose(float(losses.sequence_balance_loss(scores, idx, padding_mask=pad)), expected, rel_tol=1e-5)
    # the same as cutting each sequence to its real tokens and calling without a mask
    per_seq = [
        float(losses.sequence_balance_loss(scores[b : b + 1, mask[b]], index[b : b + 1, mask[b]])) for b in range(B)
    ]
    assert math.isclose(expected, sum(per_seq) / B, rel_tol=1e-5)


# --------------------------------------------------------------------------------------------
# router entropy
# --------------------------------------------------------------------------------------------


def test_router_entropy_extremes():
    """Entropy is log(E) for uniform scores and 0 for one-hot scores (also for unnormalised uniform sigmoids)."""
    E = 7
    assert math.isclose(float(losses.router_entropy(torch.full((4, E), 1.0 / E))), math.log(E), rel_tol=1e-6)
    assert math.isclose(float(losses.router_entropy(torch.full((4, E), 0.3))), math.log(E), rel_tol=1e-6)
    assert float(losses.router_entropy(torch.eye(E))) == 0.0
