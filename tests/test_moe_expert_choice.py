"""Expert-choice routing (Zhou et al. 2022): equal to a loop over experts that each take their top-c
tokens, padding never taken, balanced by construction, trained by gradients; allowed in a seq2seq
encoder only (refused in causal decoders, with the reason)."""

from __future__ import annotations

import math

import pytest
import torch

from moeformer import ConfigError, Seq2SeqTransformer
from moeformer.config import MoEConfig, model_config_from_dict
from moeformer.moe import MoELayer, build_moe

pytestmark = pytest.mark.usefixtures("single_thread")


def layer(n_experts=4, top_k=2, capacity_factor=None, seed=0, **extra):
    torch.manual_seed(seed)
    return build_moe(kind="expert_choice", d_model=16, n_experts=n_experts, top_k=top_k, expert_hidden=24,
                     capacity_factor=capacity_factor, **extra)  # fmt: skip


def loop_reference(moe: MoELayer, x: torch.Tensor, padding: torch.Tensor | None, factor: float) -> torch.Tensor:
    """The paper's algorithm, one expert at a time: S = softmax(X W^T); expert e takes TopK(S[:, e], c)."""
    flat = x.reshape(-1, x.shape[-1])
    real = torch.ones(flat.shape[0], dtype=torch.bool) if padding is None else ~padding.reshape(-1)
    scores = (flat @ moe.router.weight.T).softmax(-1)
    E = scores.shape[1]
    c = min(flat.shape[0], math.ceil(factor * int(real.sum()) / E))
    out = torch.zeros_like(flat)
    ex = moe.experts
    for e in range(E):
        candidates = torch.where(real, scores[:, e], torch.tensor(-1.0))
        tokens = candidates.topk(c).indices
        tokens = tokens[real[tokens]]
        h = flat[tokens] @ ex.gate_up_proj[e].T
        gate, up = h.chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ ex.down_proj[e].T
        out.index_add_(0, tokens, scores[tokens, e, None] * y)
    return out.view_as(x)


@pytest.mark.parametrize("factor", [None, 1.0, 3.0])
def test_equals_the_loop_reference(factor):
    moe = layer(capacity_factor=factor).eval()
    x = torch.randn(3, 7, 16)
    got = moe(x).output
    torch.testing.assert_close(got, loop_reference(moe, x, None, factor or 2), atol=1e-5, rtol=1e-5)


def test_padding_is_never_taken_and_changes_nothing_for_real_tokens():
    moe = layer().eval()
    x = torch.randn(2, 6, 16)
    padding = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    out = moe(x, padding)
    torch.testing.assert_close(out.output, loop_reference(moe, x, padding, 2), atol=1e-5, rtol=1e-5)
    assert out.output[1, 3:].abs().max() == 0  # padding rows get nothing from the experts
    # c counts real tokens: 9 real, 4 experts, factor 2 -> 5 each
    assert out.stats["tokens_per_expert"].tolist() == [5.0] * 4


def test_balanced_by_construction_and_reports_unrouted_tokens():
    moe = layer(n_experts=8, top_k=1).eval()
    out = moe(torch.randn(4, 10, 16))
    assert out.stats["tokens_per_expert"].tolist() == [5.0] * 8
    assert out.aux_losses == {}
    assert 0.0 <= float(out.stats["dropped_fraction"]) < 1.0
    assert float(out.stats["experts_per_token"]) == pytest.approx(1.0)  # 40 picks over 40 tokens


def test_gradients_reach_router_and_experts():
    moe = layer().train()
    x = torch.randn(2, 8, 16, requires_grad=True)
    moe(x).output.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0 and moe.experts.down_proj.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_options_it_ignores_and_causal_models_are_refused():
    with pytest.raises(ConfigError, match="score.*expert_choice"):
        MoEConfig(kind="expert_choice", score="sigmoid")
    with pytest.raises(ConfigError, match="n_shared"):
        MoEConfig(kind="expert_choice", n_shared=1)
    with pytest.raises(ConfigError, match="causal decoder would see later tokens"):
        model_config_from_dict({"preset": "lm-tiny", "vocab_size": 30, "moe": {"kind": "expert_choice"}})


def test_seq2seq_routes_the_encoder_by_expert_choice_and_the_decoder_by_top_k():
    moe = {"kind": "expert_choice", "n_experts": 4, "top_k": 2, "balance_loss": 0.01}
    config = model_config_from_dict({"preset": "transformer-tiny", "vocab_size": 30, "dropout": 0.0, "moe": moe})
    model = Seq2SeqTransformer(config).eval()
    kinds = {name: m.config.kind for name, m in model.named_modules() if isinstance(m, MoELayer)}
    assert kinds and all(k == ("expert_choice" if n.startswith("encoder") else "topk") for n, k in kinds.items())
    src, tgt = torch.randint(1, 30, (2, 9)), torch.randint(1, 30, (2, 5))
    out = model(src, tgt)
    assert out.logits.shape == (2, 5, 30) and torch.isfinite(out.logits).all()
    assert any(k.startswith("encoder") for k in out.reports.stats)
    # the balance loss is the decoder's (token choice); expert choice needs none
    assert out.reports.aux_losses and all(k.startswith("decoder") for k in out.reports.aux_losses)
