"""MoE parity: our topk / deepseek layers against transformers' Mixtral and DeepSeek-V3 blocks."""

from __future__ import annotations

import pytest
import torch

from moeformer.moe import build_moe

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
HF_IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]
OUR_BACKENDS = ["loop", "bmm", "grouped_mm"]


@pytest.fixture
def hf():
    """transformers, or skip the test where it is not installed."""
    return pytest.importorskip("transformers", reason="parity tests compare against transformers' MoE blocks")


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with N(0, 0.2^2) values: HF builds experts with torch.empty, the router with zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def forward_backward(module, x: torch.Tensor, upstream: torch.Tensor, ours: bool):
    """Output and input gradient of ``sum(module(x) * upstream)``; parameter grads are left on ``module``."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    if ours:
        out = out.output
    assert isinstance(out, torch.Tensor) and out.shape == x.shape  # HF 5.x blocks return a plain tensor
    (out * upstream).sum().backward()
    return out.detach(), x.grad


def set_hf_implementation(hf, config, implementation: str) -> None:
    """Select a transformers experts kernel, or skip when this install does not register it."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if implementation != "eager" and implementation not in ALL_EXPERTS_FUNCTIONS:
        pytest.skip(f"transformers {hf.__version__} has no experts implementation {implementation!r}")
    config._experts_implementation = implementation


def run_hf(block, x, upstream, implementation):
    """HF forward/backward; an implementation without a CPU kernel is skipped with the reason."""
    try:
        return forward_backward(block, x, upstream, ours=False)
    except (NotImplementedError, RuntimeError) as err:  # pragma: no cover - depends on the install
        pytest.skip(f"transformers experts implementation {implementation!r} does not run on CPU: {err}")


@torch.no_grad()
def copy_moe_weights(ours, theirs, shared=None) -> None:
    """Router and stacked experts (transformers 5 uses our layout), and the shared expert if any."""
    ours.router.weight.copy_(theirs.gate.weight)
    ours.experts.gate_up_proj.copy_(theirs.experts.gate_up_proj)
    ours.experts.down_proj.copy_(theirs.experts.down_proj)
    for name in ("gate_proj", "up_proj", "down_proj") if shared is not None else ():
        getattr(ours.shared_experts, name).weight.copy_(getattr(shared, name).weight)


def mixtral_pair(hf, backend: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_jitter_noise=0.0,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        hidden_act="silu",
    )
    theirs = MixtralSparseMoeBlock(config).eval()
    randomise(theirs, seed=1)
    ours = build_moe(
        kind="topk",
        d_model=32,
        n_experts=8,
        top_k=2,
        expert_hidden=48,
        activation="swiglu",
        bias=False,
        score="softmax",
        normalize=True,
        backend=backend,
    ).eval()
    copy_moe_weights(ours, theirs)
    return config, ours, theirs


@pytest.mark.parametrize("backend", OUR_BACKENDS)
@pytest.mark.parametrize("implementation", HF_IMPLEMENTATIONS)
def test_topk_equals_mixtral_sparse_moe_block(hf, implementation, backend):
    """Mixtral-mode topk (softmax, top-2, renormalised, SwiGLU) gives MixtralSparseMoeBlock's output and grads."""
    config, ours, theirs = mixtral_pair(hf, backend)
    set_hf_implementation(hf, config, implementation)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 32, generator=g)
    upstream = torch.randn(3, 7, 32, generator=g)
    hf_out, hf_dx = run_hf(theirs, x, upstream, implementation)
    our_out, our_dx = forward_backward(ours, x, upstream, ours=True)
    assert hf_out.abs().max() > 0.1  # a real, non-trivial output
    assert max_err(our_out, hf_out) < ATOL
    assert max_err(our_dx, hf_dx) < ATOL
    assert max_err(ours.router.weight.grad, theirs.gate.weight.grad) < ATOL
    assert ours.router.weight.grad.abs().max() > 0  # the router is trained through the gate weights
    assert max_err(ours.experts.gate_up_proj.grad, theirs.experts.gate_up_proj.grad) < ATOL
    assert max_err(ours.experts.down_proj.grad, theirs.experts.down_proj.grad) < ATOL


def deepseek_pair(hf, backend: str):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=32,
        moe_intermediate_size=16,
        intermediate_size=64,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        hidden_act="silu",
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        first_k_dense_replace=0,
    )
    theirs = DeepseekV3MoE(config).eval()
    randomise(theirs, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a non-zero selection bias: it must steer the choice but not the weights
        theirs.gate.e_score_correction_bias.copy_(torch.rand(16, generator=g) * 0.6 - 0.3)
    ours = build_moe(
        kind="deepseek",
        d_model=32,
        n_experts=16,
        top_k=4,
        expert_hidden=16,
        n_shared=2,
        granularity=1,
        activation="swiglu",
        bias=False,
        score="sigmoid",
        normalize=True,
        n_group=4,
        topk_group=2,
        routed_scaling=2.5,
        backend=backend,
    ).eval()
    copy_moe_weights(ours, theirs, theirs.shared_experts)
    with torch.no_grad():
        ours.router.expert_bias.copy_(theirs.gate.e_score_correction_bias)
    return config, ours, theirs


@pytest.mark.parametrize("backend", OUR_BACKENDS)
@pytest.mark.parametrize("implementation", HF_IMPLEMENTATIONS)
def test_deepseek_equals_deepseek_v3_moe(hf, implementation, backend):
    """V3-mode deepseek (sigmoid, bias for selection only, group-limited, x2.5, 2 shared) equals DeepseekV3MoE."""
    config, ours, theirs = deepseek_pair(hf, backend)
    set_hf_implementation(hf, config, implementation)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 32, generator=g)
    upstream = torch.randn(3, 7, 32, generator=g)
    hf_out, hf_dx = run_hf(theirs, x, upstream, implementation)
    our_out, our_dx = forward_backward(ours, x, upstream, ours=True)
    assert hf_out.abs().max() > 0.1
    assert max_err(our_out, hf_out) < ATOL
    assert max_err(our_dx, hf_dx) < ATOL
    assert max_err(ours.router.weight.grad, theirs.gate.weight.grad) < ATOL
    assert ours.router.weight.grad.abs().max() > 0
    assert max_err(ours.experts.gate_up_proj.grad, theirs.experts.gate_up_proj.grad) < ATOL
    assert max_err(ours.experts.down_proj.grad, theirs.experts.down_proj.grad) < ATOL
    for name in ("gate_proj", "up_proj", "down_proj"):
        ours_grad = getattr(ours.shared_experts, name).weight.grad
        assert max_err(ours_grad, getattr(theirs.shared_experts, name).weight.grad) < ATOL
    assert ours.router.expert_bias.grad is None and not ours.router.expert_bias.requires_grad


def test_deepseek_selection_bias_matters_for_parity(hf):
    """Guard for the parity test: the V3 bias changes which experts are chosen for these inputs."""
    config, ours, _ = deepseek_pair(hf, "loop")
    x = torch.randn(21, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        biased = ours.router(x)
        ours.router.expert_bias.zero_()
        unbiased = ours.router(x)
    assert not torch.equal(biased.index.sort(-1).values, unbiased.index.sort(-1).values)
    torch.testing.assert_close(biased.scores, unbiased.scores)  # weights come from unbiased scores


ROUTING_OPTIONS = [
    dict(score="softmax", normalize=True),
    dict(score="softmax", normalize=False),
    dict(score="sigmoid", normalize=True, n_group=4, topk_group=2, routed_scaling=2.5),
]


@pytest.mark.parametrize("options", ROUTING_OPTIONS, ids=["mixtral", "switch-like", "v3"])
def test_deepseek_without_segmentation_or_shared_equals_topk(options):
    """A deepseek layer with m=1 and no shared experts is exactly a topk layer with the same routing options."""
    torch.manual_seed(0)
    common = dict(d_model=32, n_experts=8, top_k=3, expert_hidden=24, activation="swiglu", **options)
    topk = build_moe(kind="topk", **common, balance_loss=0.01, z_loss=1e-3, seq_balance_loss=1e-4)
    deep = build_moe(
        kind="deepseek", granularity=1, n_shared=0, **common, balance_loss=0.01, z_loss=1e-3, seq_balance_loss=1e-4
    )
    with torch.no_grad():
        topk.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    assert set(deep.state_dict()) == set(topk.state_dict())
    deep.load_state_dict(topk.state_dict())
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    a, b = topk(x), deep(x)
    torch.testing.assert_close(b.output, a.output, atol=1e-6, rtol=0)
    assert b.aux_losses.keys() == a.aux_losses.keys() == {"balance", "z", "seq_balance"}
    for key in a.aux_losses:
        torch.testing.assert_close(b.aux_losses[key], a.aux_losses[key])
    assert b.stats.keys() == a.stats.keys()
    for key in a.stats:
        torch.testing.assert_close(b.stats[key], a.stats[key])


def qwen2_moe_pair(hf, backend: str):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(
        hidden_size=32,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=40,
        norm_topk_prob=False,
        num_attention_heads=4,
        num_hidden_layers=1,
    )
    theirs = Qwen2MoeSparseMoeBlock(config).eval()
    randomise(theirs, seed=4)
    ours = build_moe(
        kind="deepseek",
        d_model=32,
        n_experts=8,
        top_k=3,
        expert_hidden=16,
        n_shared=1,
        shared_hidden=40,
        shared_gate=True,
        normalize=False,
        backend=backend,
    ).eval()
    copy_moe_weights(ours, theirs, theirs.shared_expert)
    with torch.no_grad():
        ours.shared_expert_gate.weight.copy_(theirs.shared_expert_gate.weight)
    return config, ours, theirs


@pytest.mark.parametrize("backend", OUR_BACKENDS)
def test_gated_shared_expert_equals_qwen2_moe_block(hf, backend):
    """deepseek kind with shared_gate and shared_hidden equals Qwen2MoeSparseMoeBlock, forward and backward."""
    config, ours, theirs = qwen2_moe_pair(hf, backend)
    set_hf_implementation(hf, config, "eager")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 32, generator=g)
    upstream = torch.randn(2, 9, 32, generator=g)
    hf_out, hf_dx = run_hf(theirs, x, upstream, "eager")
    our_out, our_dx = forward_backward(ours, x, upstream, ours=True)
    assert hf_out.abs().max() > 0.1
    assert max_err(our_out, hf_out) < ATOL
    assert max_err(our_dx, hf_dx) < ATOL
    assert max_err(ours.shared_expert_gate.weight.grad, theirs.shared_expert_gate.weight.grad) < ATOL
    assert max_err(ours.router.weight.grad, theirs.gate.weight.grad) < ATOL
    with torch.no_grad():  # the gate scales exactly the shared expert's part: sigmoid(0) halves it
        gate = torch.sigmoid(x @ ours.shared_expert_gate.weight.t())
        ungated = ours.shared_experts(x.reshape(-1, 32)).output.view_as(x)
        ours.shared_expert_gate.weight.zero_()
        half = ours(x).output
        assert max_err(our_out - half, (gate - 0.5) * ungated) < ATOL
        assert ((gate - 0.5).abs() * ungated.abs()).max() > 0.01
