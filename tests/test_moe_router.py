"""Tests for the MoE router (moeformer.moe.router): routing math against independent hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moeformer.config import MoEConfig
from moeformer.moe import Router, Routing, apply_capacity

pytestmark = pytest.mark.usefixtures("single_thread")


def make_router(d: int = 16, E: int = 8, K: int = 2, seed: int = 0, **options) -> Router:
    torch.manual_seed(seed)
    config = MoEConfig(n_experts=E, top_k=min(K, E), **options)
    return Router(d, E, K, config)


def as_dict(index: torch.Tensor, weights: torch.Tensor) -> dict[int, float]:
    """One token's routing as {expert: weight}, independent of slot order."""
    return dict(zip(index.tolist(), weights.detach().tolist()))


def assert_same_routing(index, weights, expected: list[dict[int, float]], tol: float = 1e-6) -> None:
    assert index.shape[0] == len(expected)
    for t, want in enumerate(expected):
        got = as_dict(index[t], weights[t])
        assert set(got) == set(want), f"token {t}: experts {sorted(got)} != {sorted(want)}"
        for e in want:
            assert math.isclose(got[e], want[e], rel_tol=tol, abs_tol=tol), f"token {t}, expert {e}"


# --------------------------------------------------------------------------------------------
# softmax / sigmoid scoring
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 3])
def test_softmax_topk_renormalised_is_mixtral(K):
    """normalize=True: weights = softmax over the chosen k logits (Mixtral), chosen = k largest logits."""
    router = make_router(K=K, seed=K)
    x = torch.randn(20, 16)
    r = router(x)
    logits = x @ router.weight.detach().t()
    torch.testing.assert_close(r.logits, logits)
    torch.testing.assert_close(r.scores, torch.softmax(logits, -1))
    expected = []
    for t in range(x.shape[0]):
        top = sorted(range(8), key=lambda e: -float(logits[t, e]))[:K]
        z = torch.stack([logits[t, e] for e in top])
        expected.append(dict(zip(top, torch.softmax(z, 0).tolist())))
    assert_same_routing(r.index, r.weights, expected)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(20))


def test_softmax_unnormalised_gives_raw_probabilities_switch():
    """normalize=False, k=1 (Switch): the weight is the softmax probability of the argmax expert."""
    router = make_router(K=1, normalize=False)
    x = torch.randn(30, 16)
    r = router(x)
    probs = torch.softmax(x @ router.weight.t(), -1)
    assert r.index.shape == (30, 1)
    assert torch.equal(r.index[:, 0], probs.argmax(-1))
    torch.testing.assert_close(r.weights[:, 0], probs.max(-1).values)
    assert (r.weights[:, 0] < 1).all()


def test_softmax_unnormalised_top2_gives_raw_probabilities():
    """normalize=False, k=2: the two weights are the two largest full-softmax probabilities."""
    router = make_router(K=2, normalize=False, seed=1)
    x = torch.randn(12, 16)
    r = router(x)
    probs = torch.softmax(x @ router.weight.t(), -1)
    top = probs.topk(2, -1)
    assert_same_routing(r.index, r.weights, [as_dict(i, w) for i, w in zip(top.indices, top.values)])


def test_sigmoid_bias_steers_choice_but_not_weights():
    """Sigmoid + expert_bias: the bias changes the chosen experts; weights are the unbiased sigmoid
    scores of the chosen, renormalised, times routed_scaling."""
    E, K, scaling = 8, 2, 2.5
    router = make_router(E=E, K=K, score="sigmoid", routed_scaling=scaling, seed=2)
    x = torch.randn(25, 16)
    before = router(x)
    bias = torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0])  # force experts 0 and 1
    router.expert_bias.copy_(bias)
    r = router(x)
    s = torch.sigmoid(x @ router.weight.detach().t())
    torch.testing.assert_close(r.scores, s)  # scores never include the bias
    torch.testing.assert_close(before.scores, r.scores)
    assert {frozenset(row.tolist()) for row in r.index} == {frozenset({0, 1})}
    assert not all(set(row.tolist()) == {0, 1} for row in before.index)
    expected = [{e: scaling * float(s[t, e] / (s[t, 0] + s[t, 1])) for e in (0, 1)} for t in range(25)]
    assert_same_routing(r.index, r.weights, expected, tol=1e-5)
    torch.testing.assert_close(r.weights.sum(-1), torch.full((25,), scaling))

    router.expert_bias.copy_(torch.randn(E) * 0.3)  # a generic bias: choose by s + b, weigh by s
    r = router(x)
    expected = []
    for t in range(25):
        top = sorted(range(E), key=lambda e: -float(s[t, e] + router.expert_bias[e]))[:K]
        total = sum(float(s[t, e]) for e in top)
        expected.append({e: scaling * float(s[t, e]) / total for e in top})
    assert_same_routing(r.index, r.weights, expected, tol=1e-5)


# --------------------------------------------------------------------------------------------
# group-limited and hierarchical routing
# --------------------------------------------------------------------------------------------


def brute_force_group_limited(choice: torch.Tensor, G: int, topk_group: int, K: int) -> set[int]:
    """For one token: best K experts inside the topk_group groups of best top-2 sum, by exhaustive search."""
    E = choice.numel()
    size = E // G
    vals = choice.tolist()
    group_score = [sum(sorted(vals[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(G)]
    best_groups = max(itertools.combinations(range(G), topk_group), key=lambda gs: sum(group_score[g] for g in gs))
    allowed = [e for g in best_groups for e in range(g * size, (g + 1) * size)]
    best = max(itertools.combinations(allowed, K), key=lambda es: sum(vals[e] for e in es))
    return set(best)


@pytest.mark.parametrize(
    ("score", "G", "topk_group", "K"), [("sigmoid", 4, 2, 4), ("softmax", 4, 1, 2), ("sigmoid", 8, 3, 3)]
)
def test_group_limited_routing_matches_brute_force(score, G, topk_group, K):
    """Chosen experts are the top-K (biased) experts within the topk_group groups scored by their top-2 sum."""
    E = 16
    router = make_router(E=E, K=K, score=score, n_group=G, topk_group=topk_group, seed=G + K)
    router.expert_bias.copy_(torch.randn(E) * 0.2)
    x = torch.randn(40, 16)
    r = router(x)
    logits = x @ router.weight.detach().t()
    s = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1)
    choice = s + router.expert_bias
    size = E // G
    for t in range(40):
        chosen = set(r.index[t].tolist())
        assert len(chosen) == K
        assert chosen == brute_force_group_limited(choice[t], G, topk_group, K)
        assert len({e // size for e in chosen}) <= topk_group
        total = sum(float(s[t, e]) for e in chosen)
        for e, w in as_dict(r.index[t], r.weights[t]).items():
            assert math.isclose(w, float(s[t, e]) / total, rel_tol=1e-5)


def test_group_limited_excludes_best_expert_in_weak_group():
    """A group's score is its top-2 sum: a group with one great expert loses to a group with two good ones."""
    E, G = 8, 4
    router = make_router(d=8, E=E, K=2, score="sigmoid", n_group=G, topk_group=1)
    with torch.no_grad():
        router.weight.zero_()
    # choice scores: group 0 = (0.9, 0.0), group 1 = (0.6, 0.6); top-2 sums 0.9 vs 1.2
    bias = torch.tensor([0.4, -0.5, 0.1, 0.1, -0.5, -0.5, -0.5, -0.5])
    router.expert_bias.copy_(bias)  # sigmoid(0) = 0.5 for every expert
    r = router(torch.zeros(1, 8))
    assert set(r.index[0].tolist()) == {2, 3}


def hierarchical_by_hand(x, router, G, a, K, normalize):
    """Per token {expert: weight}: primary softmax over groups, secondary softmax inside each chosen group."""
    E = router.n_experts
    size, b = E // G, K // a
    group_weight, weight = router.group_weight.detach(), router.weight.detach()
    out = []
    for t in range(x.shape[0]):
        gp = torch.softmax(group_weight @ x[t], 0)
        groups = sorted(range(G), key=lambda g: -float(gp[g]))[:a]
        gsum = sum(float(gp[g]) for g in groups) if normalize else 1.0
        routing = {}
        for g in groups:
            logits = weight[g * size : (g + 1) * size] @ x[t]
            ip = torch.softmax(logits, 0)
            inner = sorted(range(size), key=lambda j: -float(ip[j]))[:b]
            isum = sum(float(ip[j]) for j in inner) if normalize else 1.0
            for j in inner:
                routing[g * size + j] = float(gp[g]) / gsum * float(ip[j]) / isum
        out.append(routing)
    return out


@pytest.mark.parametrize(
    ("G", "a", "K", "normalize"), [(4, 2, 4, True), (4, 2, 2, True), (2, 1, 3, True), (4, 2, 4, False)]
)
def test_hierarchical_routing_matches_hand_computation(G, a, K, normalize):
    """Hierarchical: K/a experts in each of the a best groups, weight = primary gate * secondary gate."""
    E, d, N = 12, 16, 30
    router = make_router(
        d=d, E=E, K=K, n_group=G, topk_group=a, group_routing="hierarchical", normalize=normalize, seed=G * 10 + K
    )
    x = torch.randn(N, d)
    r = router(x)
    size = E // G
    for t in range(N):
        per_group: dict[int, int] = {}
        for e in r.index[t].tolist():
            per_group[e // size] = per_group.get(e // size, 0) + 1
        assert len(per_group) == a and set(per_group.values()) == {K // a}
    assert_same_routing(r.index, r.weights, hierarchical_by_hand(x, router, G, a, K, normalize), tol=1e-5)
    torch.testing.assert_close(r.scores.sum(-1), torch.ones(N))
    if normalize:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(N))
    else:
        assert (r.weights.sum(-1) < 1).all()


# --------------------------------------------------------------------------------------------
# noisy gating, precision
# --------------------------------------------------------------------------------------------


def test_noisy_gating_only_in_training():
    """Noisy top-k: eval is deterministic and equals the noiseless router; train adds noise; noise_weight learns."""
    noisy = make_router(noisy=True, seed=3)
    plain = make_router(noisy=False, seed=3)
    assert torch.equal(noisy.weight, plain.weight)
    x = torch.randn(50, 16)
    noisy.eval()
    a, b, ref = noisy(x), noisy(x), plain(x)
    for field in ("logits", "scores", "index", "weights"):
        assert torch.equal(getattr(a, field), getattr(b, field))
        assert torch.equal(getattr(a, field), getattr(ref, field))
    noisy.train()
    torch.manual_seed(11)
    r = noisy(x)
    assert not torch.allclose(r.logits, ref.logits)
    assert not torch.equal(r.index, ref.index)
    (r.weights * torch.randn_like(r.weights)).sum().add(r.logits.pow(2).mean()).backward()
    assert noisy.noise_weight.grad is not None
    assert noisy.noise_weight.grad.abs().sum() > 0


def test_router_runs_in_float32_for_bf16():
    """A bf16 router on a bf16 input still produces float32 logits, scores and weights; its bias stays float32."""
    for score in ("softmax", "sigmoid"):
        router = make_router(score=score).to(torch.bfloat16)
        assert router.weight.dtype == torch.bfloat16
        assert router.expert_bias.dtype == torch.float32  # gamma-sized steps would vanish in bf16
        x = torch.randn(10, 16, dtype=torch.bfloat16)
        r = router(x)
        assert r.logits.dtype == torch.float32
        assert r.scores.dtype == torch.float32
        assert r.weights.dtype == torch.float32
        assert r.index.dtype == torch.int64
        expected = x.float() @ router.weight.float().t()
        torch.testing.assert_close(r.logits, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# capacity
# --------------------------------------------------------------------------------------------


def routing_of(index: list[list[int]], E: int) -> Routing:
    index_t = torch.tensor(index)
    N, K = index_t.shape
    weights = torch.arange(1, N * K + 1, dtype=torch.float32).view(N, K) / 10
    return Routing(torch.zeros(N, E), torch.full((N, E), 1.0 / E), index_t, weights)


def test_apply_capacity_priority_by_hand():
    """Capacity 2: all first choices before second choices, earlier tokens first; drops get index E, weight 0."""
    E = 3
    routing = routing_of([[0, 1], [0, 2], [0, 1], [1, 0], [1, 2]], E)
    out, dropped = apply_capacity(routing, capacity=2)
    # first choices: expert 0 <- t0, t1 (t2 dropped); expert 1 <- t3, t4
    # second choices: t0 -> 1 dropped (t3, t4 came first), t1 -> 2 kept, t2 -> 1 dropped,
    #                 t3 -> 0 dropped, t4 -> 2 kept
    expected_dropped = torch.tensor([[False, True], [False, False], [True, True], [False, True], [False, False]])
    assert torch.equal(dropped, expected_dropped)
    assert torch.equal(out.index, routing.index.masked_fill(expected_dropped, E))
    assert torch.equal(out.weights, routing.weights.masked_fill(expected_dropped, 0.0))
    kept = out.index[out.index < E]
    assert (torch.bincount(kept, minlength=E) <= 2).all()
    assert out.scores is routing.scores and out.logits is routing.logits


def test_apply_capacity_ignores_sentinel_and_respects_capacity_randomly():
    """Pre-dropped (index E) entries take no capacity; on random routings every expert keeps <= C tokens."""
    E = 4
    routing = routing_of([[E, E], [2, 3], [2, 3]], E)
    out, dropped = apply_capacity(routing, capacity=2)
    assert not dropped.any()
    assert torch.equal(out.index, routing.index)
    g = torch.Generator().manual_seed(0)
    for C in (1, 3, 5):
        index = torch.rand(40, 8, generator=g).argsort(-1)[:, :2]
        r = Routing(torch.zeros(40, 8), torch.zeros(40, 8), index, torch.rand(40, 2, generator=g))
        out, dropped = apply_capacity(r, C)
        counts = torch.bincount(out.index[out.index < 8], minlength=8)
        assert (counts <= C).all()
        assert torch.equal(counts, torch.bincount(index.reshape(-1), minlength=8).clamp(max=C))
        assert (out.weights[dropped] == 0).all() and (out.index[dropped] == 8).all()


def test_apply_capacity_large_drops_nothing():
    """capacity >= N * K: the routing comes back unchanged."""
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, 2, (10, 3), generator=g)
    r = Routing(torch.zeros(10, 4), torch.zeros(10, 4), index, torch.rand(10, 3, generator=g))
    out, dropped = apply_capacity(r, 30)
    assert not dropped.any()
    assert torch.equal(out.index, index) and torch.equal(out.weights, r.weights)


# --------------------------------------------------------------------------------------------
# the auxiliary-loss-free balancing bias
# --------------------------------------------------------------------------------------------


def test_expert_bias_is_a_float32_buffer():
    """expert_bias is in state_dict and buffers, not in parameters(), and needs no grad."""
    router = make_router(score="sigmoid", bias_update_rate=1e-3)
    assert "expert_bias" in router.state_dict()
    assert "expert_bias" in dict(router.named_buffers())
    assert all(p is not router.expert_bias for p in router.parameters())
    assert "expert_bias" not in dict(router.named_parameters())
    assert not router.expert_bias.requires_grad
    assert router.expert_bias.dtype == torch.float32
    assert torch.equal(router.expert_bias, torch.zeros(8))


def test_update_bias_moves_by_exactly_the_rate():
    """update_bias(load): b_i += rate * sign(mean load - load_i), exactly, and 0 where load_i equals the mean."""
    rate = 1e-3
    router = make_router(E=4, score="sigmoid", bias_update_rate=rate)
    load = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3
    router.update_bias(load)
    step = torch.tensor([1.0, 1.0, 0.0, -1.0]) * rate
    assert torch.equal(router.expert_bias, step)
    router.update_bias(torch.tensor([5, 1, 3, 3]))  # integer counts work too; mean 3
    assert torch.equal(router.expert_bias, step + torch.tensor([-1.0, 1.0, 0.0, 0.0]) * rate)
    assert router.expert_bias.dtype == torch.float32
