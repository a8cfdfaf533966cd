"""Tests for auxiliary-loss-free balancing (moeformer.moe.balancing.LoadTracker and the router's expert_bias)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from moeformer.moe import LoadTracker, MoELayer, build_moe

pytestmark = pytest.mark.usefixtures("single_thread")

D_MODEL, N_EXPERTS, TOP_K = 16, 8, 2


class Block(nn.Module):
    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn = ffn


class Stack(nn.Module):
    """The minimal model shape LoadTracker expects: layer "layers.i" holds its MoE at ".ffn"."""

    def __init__(self, *ffns: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(f) for f in ffns)


def make_layer(seed: int = 0, **options) -> MoELayer:
    torch.manual_seed(seed)
    layer = build_moe(
        kind="deepseek", d_model=D_MODEL, n_experts=N_EXPERTS, top_k=TOP_K, expert_hidden=16, score="sigmoid", **options
    )
    assert isinstance(layer, MoELayer)
    return layer


def test_load_tracker_sums_calls_and_updates_only_bias_routers():
    """add() sums tokens_per_expert per layer across calls; update_biases() steps rate > 0 routers only, then resets."""
    rate = 1e-2
    model = Stack(make_layer(0, bias_update_rate=rate), make_layer(1, bias_update_rate=0.0))
    tracker = LoadTracker()
    first = torch.tensor([4.0, 0, 0, 2, 2, 2, 2, 4])
    tracker.add(
        {
            "layers.0": {"tokens_per_expert": first, "dropped_fraction": torch.tensor(0.0)},
            "layers.1": {"tokens_per_expert": torch.ones(8)},
        }
    )
    first += 100  # add() must have copied the counts
    tracker.add(
        {
            "layers.0": {"tokens_per_expert": torch.tensor([0.0, 1, 0, 2, 2, 2, 2, 7])},
            "layers.1": {"tokens_per_expert": torch.full((8,), 3.0)},
            "layers.2": {"router_entropy": torch.tensor(1.0)},
        }
    )  # no counts: ignored
    assert set(tracker.loads) == {"layers.0", "layers.1"}
    total = torch.tensor([4.0, 1, 0, 4, 4, 4, 4, 11])  # mean 4
    assert torch.equal(tracker.loads["layers.0"], total)
    assert torch.equal(tracker.loads["layers.1"], torch.full((8,), 4.0))

    tracker.update_biases(model)
    expected = torch.tensor([0.0, 1, 1, 0, 0, 0, 0, -1]) * rate
    assert torch.equal(model.layers[0].ffn.router.expert_bias, expected)
    assert torch.equal(model.layers[1].ffn.router.expert_bias, torch.zeros(8))
    assert tracker.loads == {}
    tracker.update_biases(model)  # nothing counted since: no change
    assert torch.equal(model.layers[0].ffn.router.expert_bias, expected)


def test_load_tracker_reads_layer_stats():
    """The layer's stats["tokens_per_expert"] counts N * K assignments and feeds the tracker directly."""
    layer = make_layer(0, bias_update_rate=1e-3)
    x = torch.randn(2, 5, D_MODEL)
    with torch.no_grad():
        stats = layer(x).stats
        routing = layer.router(x.view(10, D_MODEL))
    assert stats["tokens_per_expert"].sum() == 10 * TOP_K
    assert torch.equal(stats["tokens_per_expert"], torch.bincount(routing.index.view(-1), minlength=N_EXPERTS).float())
    tracker = LoadTracker()
    tracker.add({"layers.0": stats})
    tracker.add({"layers.0": stats})
    assert torch.equal(tracker.loads["layers.0"], 2 * stats["tokens_per_expert"])


def skew_router(layer: MoELayer, direction: torch.Tensor) -> None:
    """Add logit offsets 3, 2.5, 2 along the unit vector ``direction`` to experts 0, 1, 2."""
    with torch.no_grad():
        layer.router.weight[:3] += torch.tensor([3.0, 2.5, 2.0])[:, None] * direction


def skewed_batch(direction: torch.Tensor, g: torch.Generator, B: int = 4, T: int = 32) -> torch.Tensor:
    """Tokens centred on ``direction``: the frozen router prefers experts 0-2 for most of them."""
    return direction + torch.randn(B, T, D_MODEL, generator=g)


def imbalance(layer: MoELayer, x: torch.Tensor) -> float:
    with torch.no_grad():
        load = layer(x).stats["tokens_per_expert"]
    return float(load.max() / load.mean())


def backward_with_aux_losses(layer: MoELayer, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    assert set(out.aux_losses) == {"balance", "seq_balance", "z"}
    (out.output.pow(2).mean() + sum(out.aux_losses.values())).backward()


def test_bias_balances_a_skewed_stream_without_gradients():
    """DeepSeek-V3 aux-loss-free balancing: a few hundred bias steps at least halve max/mean load on held-out data."""
    layer = make_layer(0, bias_update_rate=3e-3, balance_loss=1e-2, seq_balance_loss=1e-4, z_loss=1e-3)
    model = Stack(layer)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(D_MODEL, generator=g)
    direction = direction / direction.norm()
    skew_router(layer, direction)
    held_out = skewed_batch(direction, torch.Generator().manual_seed(123), B=8, T=64)
    bias = layer.router.expert_bias

    before = imbalance(layer, held_out)
    assert before > 2.0  # the router really is skewed
    assert not bias.requires_grad
    assert all(p is not bias for p in model.parameters())
    backward_with_aux_losses(layer, held_out)
    assert bias.grad is None
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    tracker = LoadTracker()
    with torch.no_grad():
        for _ in range(300):
            for _ in range(2):  # two micro-batches per optimiser step
                tracker.add({"layers.0": layer(skewed_batch(direction, g)).stats})
            tracker.update_biases(model)

    after = imbalance(layer, held_out)
    assert after <= before / 2, f"max/mean load {before:.2f} -> {after:.2f}"
    assert bias.abs().max() > 0
    assert (bias[:3] < 0).all()  # the favoured experts were made less attractive
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), f"balancing changed parameter {n}"
    backward_with_aux_losses(layer, held_out)
    assert bias.grad is None and not bias.requires_grad


def test_bias_saved_and_restored_with_state_dict():
    """expert_bias is in the state_dict and load_state_dict restores it (routing then matches)."""
    layer = make_layer(0, bias_update_rate=1e-2)
    for load in (torch.tensor([9.0, 0, 1, 2, 3, 4, 5, 0]), torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 9])):
        layer.router.update_bias(load)
    saved = layer.state_dict()
    assert "router.expert_bias" in saved
    assert torch.equal(saved["router.expert_bias"], layer.router.expert_bias)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)

    fresh = make_layer(0, bias_update_rate=1e-2)
    assert torch.equal(fresh.router.expert_bias, torch.zeros(N_EXPERTS))
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.router.expert_bias, layer.router.expert_bias)
    assert fresh.router.expert_bias.abs().sum() > 0
    x = torch.randn(40, D_MODEL)
    with torch.no_grad():
        assert torch.equal(fresh.router(x).index, layer.router(x).index)
