"""Optimiser groups, learning-rate schedules and the label-smoothed loss, against their formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from moeformer import build_model, preset
from moeformer.train.loss import smoothed_cross_entropy
from moeformer.train.optim import parameter_groups
from moeformer.train.schedule import lr_multiplier, noam_peak


def test_noam_peak_is_the_papers():
    """d_model 512, warmup 4000: the paper's schedule peaks at 6.99e-4."""
    assert noam_peak(512, 4000) == pytest.approx(6.988e-4, rel=1e-3)


def test_inverse_sqrt_equals_paper_formula():
    """peak * multiplier(step) == d^-0.5 * min(s^-0.5, s * w^-1.5) for every step."""
    d, w = 512, 4000
    f = lr_multiplier("noam", warmup=w, total=100_000)
    for s in (1, 10, 3999, 4000, 4001, 20_000):
        paper = d**-0.5 * min(s**-0.5, s * w**-1.5)
        assert noam_peak(d, w) * f(s - 1) == pytest.approx(paper, rel=1e-9)


def test_cosine_warms_up_then_decays_to_min_ratio():
    f = lr_multiplier("cosine", warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(59) == pytest.approx(0.55)
    assert f(109) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 200))


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown 'linear'; allowed: inverse_sqrt"):
        lr_multiplier("linear", warmup=1, total=2)


def test_no_decay_on_norms_biases_embeddings():
    """Decay only on matrices; norm gains, biases and (tied) embeddings are exempt."""
    model = build_model(preset("transformer-tiny", vocab_size=50))
    decay, keep = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert keep["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any("norm" in n for n in kept) and any(n.endswith("bias") for n in kept)
    assert "tgt_embedding.embed.weight" in kept and not any("embed" in n for n in decayed)
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))


def test_no_decay_on_router_bias_buffer_and_decay_on_experts():
    model = build_model(preset("lm-tiny", vocab_size=50, moe={"kind": "topk", "n_experts": 4, "top_k": 2}))
    decay, _ = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "layers.0.ffn.experts.gate_up_proj" in decayed
    assert not any("expert_bias" in n for n in names.values())  # a buffer, not a parameter


def test_smoothed_loss_matches_formula_and_skips_padding():
    """(1-eps) * nll + eps * mean over non-pad classes of -log p, averaged over real tokens."""
    torch.manual_seed(0)
    V, pad, eps = 7, 0, 0.1
    logits = torch.randn(2, 5, V)
    target = torch.randint(1, V, (2, 5))
    target[1, 3:] = pad
    loss, nll = smoothed_cross_entropy(logits, target, pad_id=pad, eps=eps)
    logp = F.log_softmax(logits, -1)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(5):
            y = int(target[b, t])
            if y == pad:
                continue
            others = [c for c in range(V) if c != pad]
            total += (1 - eps) * -logp[b, t, y] + eps * sum(-logp[b, t, c] for c in others) / (V - 1)
            count += 1
    assert float(loss) == pytest.approx(float(total / count), rel=1e-5)
    assert float(nll) == pytest.approx(
        float(F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=pad)), rel=1e-5
    )


def test_smoothing_zero_is_cross_entropy():
    logits, target = torch.randn(3, 4, 9), torch.randint(1, 9, (3, 4))
    loss, _ = smoothed_cross_entropy(logits, target, pad_id=0, eps=0.0)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits.view(-1, 9), target.view(-1))), rel=1e-6)
    assert math.isfinite(float(loss))
