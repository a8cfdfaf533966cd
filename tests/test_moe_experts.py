"""Tests for the stacked experts (moeformer.moe.experts): fast sorted dispatch vs the readable reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from moeformer.moe import Experts

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ["loop", "bmm", "grouped_mm", "auto"]
ACTIVATIONS = ["swiglu", "relu", "gelu"]

# name -> (seed, n_tokens, n_experts, top_k, d_model, hidden)
CASES = {
    "random": (0, 13, 6, 2, 8, 8),
    "unused_experts": (1, 9, 7, 2, 16, 8),
    "k_equals_e": (2, 5, 4, 4, 8, 16),
    "single_token": (3, 1, 5, 3, 8, 8),
    "one_expert": (4, 11, 5, 1, 8, 24),
    "dropped": (5, 10, 6, 3, 16, 8),
    "all_dropped": (6, 4, 3, 2, 8, 8),
}


def make_case(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """x (N, D), index (N, K), weights (N, K) for a named routing pattern; also E, D, H."""
    seed, N, E, K, D, H = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    weights = torch.rand(N, K, generator=g) + 0.1
    if name == "unused_experts":  # experts E-3 .. E-1 never chosen
        index = torch.rand(N, E - 3, generator=g).argsort(-1)[:, :K]
    elif name == "k_equals_e":
        index = torch.rand(N, E, generator=g).argsort(-1)
    elif name == "one_expert":
        index = torch.full((N, K), 3)
    else:
        index = torch.rand(N, E, generator=g).argsort(-1)[:, :K]
    if name == "dropped":
        drop = torch.rand(N, K, generator=g) < 0.3
        drop[0] = True  # token 0: every slot dropped
        drop[1] = False
        index = index.masked_fill(drop, E)
        weights = weights.masked_fill(drop, 0.0)
    if name == "all_dropped":
        index = torch.full((N, K), E)
        weights = torch.zeros(N, K)
    return x, index, weights, E, D, H


def make_experts(E: int, D: int, H: int, activation: str, bias: bool, backend: str, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(E, D, H, activation=activation, bias=bias, backend=backend)
    if bias:  # non-zero biases, so that a missing or misplaced bias shows
        with torch.no_grad():
            experts.up_bias.normal_()
            experts.down_bias.normal_()
    return experts


def grads_of(experts: Experts, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients by name; a tensor the output does not depend on counts as a zero gradient."""
    tensors = {"x": x, "weights": weights, **dict(experts.named_parameters())}
    return {n: torch.zeros_like(t) if t.grad is None else t.grad for n, t in tensors.items()}


def run(
    experts: Experts, method: str, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, upstream: torch.Tensor
):
    """Output and gradients of sum(out * upstream) through ``experts.<method>``."""
    experts.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    out = getattr(experts, method)(x, index, weights)
    if out.requires_grad:  # not so for the reference when every assignment is dropped
        (out * upstream).sum().backward()
    return out.detach(), grads_of(experts, x, weights)


def skip_if_grouped_mm_unusable(backend: str, call) -> None:
    if backend != "grouped_mm":
        return
    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    try:
        call()
    except RuntimeError as err:  # CPU grouped_mm has alignment/shape limits
        pytest.skip(f"F.grouped_mm fails on CPU for this case: {err}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_dispatch_matches_reference(backend, activation, bias, case):
    """Experts.forward equals forward_reference in output and in every gradient (x, gate weights, params)."""
    x, index, weights, E, D, H = make_case(case)
    experts = make_experts(E, D, H, activation, bias, backend)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(99))
    skip_if_grouped_mm_unusable(backend, lambda: run(experts, "forward", x, index, weights, upstream))
    out, grads = run(experts, "forward", x, index, weights, upstream)
    ref_out, ref_grads = run(experts, "forward_reference", x, index, weights, upstream)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=f"grad of {name}")
    dropped_everywhere = (index == E).all(-1)
    assert torch.equal(out[dropped_everywhere], torch.zeros_like(out[dropped_everywhere]))
    if case == "dropped":
        assert dropped_everywhere[0] and not dropped_everywhere[1]
        assert out[1].abs().sum() > 0
        assert torch.equal(grads["weights"][index == E], torch.zeros(int((index == E).sum())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_assignment_gets_no_gradient_and_output_is_exactly_zero(backend):
    """A token with every slot dropped outputs exactly 0 and receives no gradient, even with biases."""
    x, index, weights, E, D, H = make_case("dropped")
    experts = make_experts(E, D, H, "swiglu", True, backend)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    skip_if_grouped_mm_unusable(backend, lambda: run(experts, "forward", x, index, weights, upstream))
    out, grads = run(experts, "forward", x, index, weights, upstream)
    assert torch.equal(out[0], torch.zeros(D))
    assert torch.equal(grads["x"][0], torch.zeros(D))
    assert torch.isfinite(out).all()


def test_weight_layout_and_semantics():
    """gate_up_proj is (E, 2H, D) with gate rows then up rows, down_proj (E, D, H); up_proj (E, H, D) for relu."""
    E, D, H = 3, 8, 12
    torch.manual_seed(0)
    swiglu = Experts(E, D, H, activation="swiglu", bias=True, backend="loop")
    assert swiglu.gate_up_proj.shape == (E, 2 * H, D)
    assert swiglu.down_proj.shape == (E, D, H)
    assert swiglu.up_bias.shape == (E, 2 * H) and swiglu.down_bias.shape == (E, D)
    assert not hasattr(swiglu, "up_proj")
    with torch.no_grad():
        swiglu.up_bias.normal_()
        swiglu.down_bias.normal_()
    x = torch.randn(1, D)
    w, e = torch.tensor([[0.7]]), 2
    gate = x @ swiglu.gate_up_proj[e, :H].t() + swiglu.up_bias[e, :H]
    up = x @ swiglu.gate_up_proj[e, H:].t() + swiglu.up_bias[e, H:]
    expected = 0.7 * ((F.silu(gate) * up) @ swiglu.down_proj[e].t() + swiglu.down_bias[e])
    torch.testing.assert_close(swiglu(x, torch.tensor([[e]]), w), expected)

    relu = Experts(E, D, H, activation="relu", bias=False, backend="loop")
    assert relu.up_proj.shape == (E, H, D) and relu.down_proj.shape == (E, D, H)
    assert not hasattr(relu, "gate_up_proj")
    expected = 0.7 * (F.relu(x @ relu.up_proj[1].t()) @ relu.down_proj[1].t())
    torch.testing.assert_close(relu(x, torch.tensor([[1]]), w), expected)


def test_loop_weight_gradient_independent_of_index_order():
    """Permuting tokens and the order of each token's slots leaves the loop backend's weight gradients unchanged."""
    x, index, weights, E, D, H = make_case("random")
    N, K = index.shape
    experts = make_experts(E, D, H, "swiglu", True, "loop")
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    _, grads = run(experts, "forward", x, index, weights, upstream)
    g = torch.Generator().manual_seed(4)
    perm = torch.randperm(N, generator=g)
    slots = torch.stack([torch.randperm(K, generator=g) for _ in range(N)])
    p_index = index[perm].gather(1, slots)
    p_weights = weights[perm].gather(1, slots)
    assert not torch.equal(p_index, index)
    _, p_grads = run(experts, "forward", x[perm], p_index, p_weights, upstream[perm])
    for name, _ in experts.named_parameters():
        torch.testing.assert_close(p_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_runs_close_to_float32_reference(backend):
    """bf16 experts and input produce a bf16 output close to the float32 reference with the same weights."""
    x, index, weights, E, D, H = make_case("dropped")
    experts32 = make_experts(E, D, H, "swiglu", True, backend)
    experts16 = copy.deepcopy(experts32).to(torch.bfloat16)
    with torch.no_grad():  # the float32 reference uses the bf16-rounded weights
        for p32, p16 in zip(experts32.parameters(), experts16.parameters()):
            p32.copy_(p16.float())
    x16 = x.to(torch.bfloat16)

    def call():
        return experts16(x16, index, weights)

    skip_if_grouped_mm_unusable(backend, call)
    out16 = call()
    assert out16.dtype == torch.bfloat16
    ref = experts32.forward_reference(x16.float(), index, weights)
    torch.testing.assert_close(out16.float(), ref, atol=5e-2, rtol=5e-2)
    assert torch.equal(out16[0].float(), torch.zeros(D))
    out16.float().sum().backward()
    assert experts16.gate_up_proj.grad is not None and experts16.gate_up_proj.grad.dtype == torch.bfloat16


def auto_weight(E: int, D: int, H: int) -> torch.Tensor:
    return torch.randn(E, H, D)


def test_auto_backend_falls_back_to_loop_for_unaligned_widths():
    """grouped_mm needs 16-byte aligned rows; 'auto' takes the loop for widths like 6 floats."""
    from moeformer.moe.grouped import resolve_kernel

    assert resolve_kernel(torch.randn(5, 6), torch.randn(2, 8, 6), "auto") == "loop"
    ex = Experts(3, 6, 5, activation="relu", backend="auto")
    x = torch.randn(7, 6)
    index = torch.tensor([[0, 1]] * 7)
    weights = torch.full((7, 2), 0.5)
    torch.testing.assert_close(ex(x, index, weights), ex.forward_reference(x, index, weights))


def test_auto_backend_on_cpu_is_grouped_mm_when_torch_has_it():
    """backend 'auto' on CPU runs torch's grouped_mm kernel where it exists (it measured fastest), else the loop."""
    from moeformer.moe.grouped import resolve_kernel

    x, index, weights, E, D, H = make_case("random")
    expected = "grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "loop"
    assert resolve_kernel(x, auto_weight(E, D, H), "auto") == expected
    auto = make_experts(E, D, H, "gelu", True, "auto")
    same = make_experts(E, D, H, "gelu", True, expected)
    assert torch.equal(auto(x, index, weights), same(x, index, weights))


@pytest.mark.parametrize("backend", ["auto", "loop", "bmm"])
def test_experts_compute_in_bf16_under_autocast(backend):
    """Under CPU bf16 autocast the expert products run in bf16 (close to float32), grads stay float32."""
    torch.manual_seed(0)
    ex = Experts(4, 16, 8, activation="swiglu", backend=backend)
    x = torch.randn(10, 16, requires_grad=True)
    index = torch.randint(0, 4, (10, 2))
    weights = torch.rand(10, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ex(x, index, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ex.forward_reference(x, index, weights), atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert ex.gate_up_proj.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
