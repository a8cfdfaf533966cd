"""Disabling each token's top routed experts (DeepSeekMoE sec. 4.5): the right experts go, the rest
of the routing is the normal top-K of what remains, and bad counts fail before any hook is set."""

from __future__ import annotations

import pytest
import torch

from moeformer.hooks import hook_points
from moeformer.inspect.expert_ablation import disable_top_experts
from moeformer.inspect.routing import capture_routing
from moeformer.models import build_model
from moeformer.presets import model_config_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")


def _lm(moe: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"preset": "lm-tiny", "vocab_size": 50, "dropout": 0.0, "moe": moe}
    return build_model(model_config_from_dict(config)).eval()


DEEPSEEK = {"kind": "deepseek", "n_experts": 7, "top_k": 3, "expert_hidden": 16, "n_shared": 1, "normalize": False}
GSHARD = {"kind": "topk", "n_experts": 8, "top_k": 2, "expert_hidden": 16}


@pytest.mark.parametrize(
    "moe", [DEEPSEEK, GSHARD, {**DEEPSEEK, "score": "sigmoid"}], ids=["deepseek", "gshard", "sigmoid"]
)
@pytest.mark.parametrize("n", [1, 3])
def test_each_token_gets_the_top_k_of_the_experts_left(moe, n):
    model, tokens = _lm(moe), torch.randint(0, 50, (2, 9))
    with torch.no_grad(), capture_routing(model) as normal:
        model(tokens)
        normal = {name: {k: v.clone() for k, v in d.items()} for name, d in normal.items()}
    with torch.no_grad(), disable_top_experts(model, n), capture_routing(model) as ablated:
        model(tokens)
    assert normal and set(ablated) == set(normal)
    for name, seen in normal.items():
        index, scores = ablated[name]["index"], ablated[name]["scores"]
        # every layer: exactly n experts per token were masked (affinity 0), none of them chosen
        assert torch.equal((scores == 0).sum(-1), torch.full_like(index[:, 0], n))
        assert (scores.gather(1, index) > 0).all()
        assert index.shape == seen["index"].shape
    first = next(iter(normal))  # the first MoE layer reads the same input in both runs
    top = normal[first]["scores"].topk(n, dim=-1).indices
    expected = normal[first]["scores"].scatter(-1, top, float("-inf")).topk(index.shape[1], dim=-1).indices
    assert torch.equal(ablated[first]["index"].sort(-1).values, expected.sort(-1).values)


def test_disabling_none_changes_nothing_and_hooks_are_removed():
    model, tokens = _lm(DEEPSEEK), torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = model(tokens).logits
        with disable_top_experts(model, 0):
            same = model(tokens).logits
        with disable_top_experts(model, 2):
            changed = model(tokens).logits
        after = model(tokens).logits
    torch.testing.assert_close(same, before, rtol=0, atol=0)
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(not p._forward_hooks for p in hook_points(model).values())


def test_the_loss_rises_when_the_best_experts_go():
    """A sanity property on a model whose router has been trained to use its experts."""
    torch.manual_seed(0)
    model = _lm(GSHARD).train()
    tokens = torch.randint(0, 50, (8, 17))
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(60):
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(), loss.backward(), opt.step()
    model.eval()

    def nll(n):
        with torch.no_grad(), disable_top_experts(model, n):
            logits = model(tokens[:, :-1]).logits
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))

    assert nll(0) < nll(2) < nll(6)


@pytest.mark.parametrize("n", [-1, 7])
def test_impossible_counts_are_refused_with_the_limits(n):
    model = _lm(GSHARD)
    with pytest.raises(ValueError, match=r"0 to 6 top experts \(E = 8 routed experts, top-K = 2\), not"):
        with disable_top_experts(model, n):
            pass
    assert all(not p._forward_hooks for p in hook_points(model).values())
