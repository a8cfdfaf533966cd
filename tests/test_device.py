"""The checks that matter on an accelerator, run on the device ``--device`` names (default cpu).

    pytest tests/test_device.py --device cuda

On CPU they run with the rest of the suite; ``benchmarks/gpu_check.sh`` runs them on CUDA, where
other kernels serve the same calls: the fused attention backends, ``grouped_mm`` in bf16, bf16
autocast, the latent (MLA) cache. Each test compares two computations on the same device (fast
path vs the readable reference, cached vs full forward), so no CPU result is needed.
"""

from __future__ import annotations

import pytest
import torch

from moeformer import DecoderLM, build_model, preset
from moeformer.decode import greedy_generate, prepare_for_decoding
from moeformer.layers import MultiHeadAttention
from moeformer.moe import Experts
from moeformer.train.config import TrainConfig
from moeformer.train.trainer import Batch, Trainer, TrainingTask

V = 37
MOE = {"kind": "deepseek", "n_experts": 8, "top_k": 2, "n_shared": 1, "expert_hidden": 32}
# bf16 keeps 8 bits of mantissa: two bf16 computations that sum in another order differ by ~1e-2.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal within ``TOL[dtype]`` of the expected values' scale."""
    scale = expected.float().abs().max().clamp_min(1.0)
    err = (actual.float() - expected.float()).abs().max() / scale
    assert err <= TOL[dtype], f"max error {err:.2e} (relative to {scale:.3g}) above {TOL[dtype]:.0e} in {dtype}"


def lm(device: torch.device, seed: int = 0, name: str = "lm-tiny", **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(preset(name, vocab_size=V, **overrides)).to(device).eval()


# --- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_fused_attention_equals_the_papers_equation(device, dtype):
    """Causal, left-padded, grouped-query self-attention: F.scaled_dot_product_attention on this
    device (flash / memory-efficient / math) equals eq. 1 written out, dead rows included."""
    torch.manual_seed(0)
    fused = MultiHeadAttention(64, 8, n_kv_heads=2).to(device, dtype).eval()
    reference = MultiHeadAttention(64, 8, n_kv_heads=2, backend="reference").to(device, dtype).eval()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(3, 17, 64, device=device, dtype=dtype)
    padding = torch.zeros(3, 17, dtype=torch.bool, device=device)
    padding[1, :5] = True  # a left-padded row: its pad queries may attend to nothing
    for mask in (None, padding):
        got = fused(x, x, x, key_padding_mask=mask, is_causal=True).output
        want = reference(x, x, x, key_padding_mask=mask, is_causal=True).output
        assert got.dtype == dtype and torch.isfinite(got).all()
        close(got, want, dtype)


# --- KV caches: cached decoding equals the full forward ----------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [("lm-tiny", {}), ("lm-tiny", {"moe": MOE}), ("lm-tiny-mla", {}), ("lm-tiny-mla", {"moe": MOE})],
    ids=["mha-dense", "mha-deepseek", "mla-dense", "mla-deepseek"],
)
def test_cached_decoding_equals_full_forward(device, name, overrides):
    model = lm(device, name=name, **overrides)
    tokens = torch.randint(1, V, (2, 20), device=device, generator=torch.Generator(device).manual_seed(0))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.new_cache()
        parts = [model(tokens[:, :12], cache=cache).logits]
        parts += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(12, 20)]
    close(torch.cat(parts, dim=1), full, torch.float32)


def test_greedy_generation_equals_argmax_of_full_forward(device):
    model = lm(device, moe=MOE)
    prompt = torch.randint(1, V, (2, 6), device=device, generator=torch.Generator(device).manual_seed(1))
    out = greedy_generate(model, prompt, max_new_tokens=8)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq[:, prompt.shape[1] :])


@pytest.mark.parametrize("expert_kernel", ["dense", "chosen"])
def test_prepared_decoding_equals_the_original(device, expert_kernel):
    """prepare_for_decoding on this device (its kernels timed here; on CUDA no oneDNN): the same
    greedy tokens as the model it was prepared from."""
    model = lm(device, moe=MOE)
    prompt = torch.randint(1, V, (2, 6), device=device, generator=torch.Generator(device).manual_seed(1))
    prepared, plan = prepare_for_decoding(model, batch=2, expert_kernel=expert_kernel)
    assert plan.experts == expert_kernel
    expected = greedy_generate(model, prompt, max_new_tokens=8)
    assert torch.equal(greedy_generate(prepared, prompt, max_new_tokens=8), expected)


# --- MoE dispatch on every kernel -------------------------------------------------------------


def expert_case(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, D), index (N, K) with some assignments dropped (index E), weights (N, K)."""
    g = torch.Generator().manual_seed(0)
    N, E, K, D = 70, 8, 3, 32
    x = torch.randn(N, D, generator=g)
    index = torch.rand(N, E, generator=g).argsort(-1)[:, :K]
    drop = torch.rand(N, K, generator=g) < 0.2
    index = index.masked_fill(drop, E)
    weights = (torch.rand(N, K, generator=g) + 0.1).masked_fill(drop, 0.0)
    return x.to(device, dtype).requires_grad_(), index.to(device), weights.to(device).requires_grad_()


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch has no grouped_mm kernel here, or None when it has one."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return f"torch {torch.__version__} has no F.grouped_mm"
    if device.type == "cuda" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) < (8, 0)):
        return "CUDA's grouped_mm runs bf16 on compute capability >= 8.0 only"
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("backend", ["loop", "bmm", "grouped_mm", "auto"])
def test_expert_kernels_equal_the_reference_loop(device, backend, dtype):
    """Forward and every gradient of the sorted dispatch equal the per-expert loop, on this device."""
    if backend == "grouped_mm" and (why := grouped_mm_available(device, dtype)):
        pytest.skip(why)
    torch.manual_seed(0)
    fast = Experts(8, 32, 24, backend=backend).to(device, dtype)
    slow = Experts(8, 32, 24, backend="loop").to(device, dtype)
    slow.load_state_dict(fast.state_dict())
    x, index, weights = expert_case(device, dtype)
    x2, w2 = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    got = fast(x, index, weights)
    want = slow.forward_reference(x2, index, w2)
    assert got.dtype == dtype
    close(got, want, dtype)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    close(x.grad, x2.grad, dtype)
    close(weights.grad, w2.grad, dtype)
    for name in ("gate_up_proj", "down_proj"):
        close(getattr(fast, name).grad, getattr(slow, name).grad, dtype)


def test_experts_run_in_bf16_under_autocast(device):
    """Under bf16 autocast the routed experts compute in bf16 (grouped_mm is on no autocast list)."""
    torch.manual_seed(0)
    experts = Experts(8, 32, 24).to(device)
    x, index, weights = expert_case(device, torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = experts(x, index, weights)
    assert out.dtype == torch.bfloat16
    close(out, experts.forward_reference(x, index, weights), torch.bfloat16)


# --- a training run in bf16 -------------------------------------------------------------------------


def copy_task(device: torch.device) -> TrainingTask:
    """Sequences whose second half repeats the first, made on ``device``."""

    def batches(epoch: int) -> list[Batch]:
        g = torch.Generator().manual_seed(epoch)
        out = []
        for _ in range(2):
            half = torch.randint(3, V, (4, 8), generator=g)
            seq = torch.cat([half, half], dim=1).to(device)
            out.append(Batch({"tokens": seq[:, :-1]}, seq[:, 1:], n_tokens=seq[:, 1:].numel()))
        return out

    return TrainingTask(train_batches=batches, valid_batches=batches(-1), meta={"config": {}}, pad_id=0)


@pytest.mark.parametrize("name", ["lm-tiny", "lm-tiny-mla"], ids=["mha", "mla"])
def test_two_training_steps_in_bf16(device, name, tmp_path):
    """The trainer's bf16 autocast step on this device: finite losses, every weight updated, a
    checkpoint written; the MoE's balancing bias stays float32."""
    torch.manual_seed(0)
    moe = {**MOE, "score": "sigmoid", "bias_update_rate": 1e-3, "balance_loss": 0.01}
    model = build_model(preset(name, vocab_size=V, moe=moe)).to(device)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    config = TrainConfig(steps=2, precision="bf16", warmup_steps=1, eval_every=2, save_every=2, log_every=1)
    result = Trainer(model, copy_task(device), config, tmp_path, progress=False).train()
    assert result.step == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged, f"not updated: {unchanged}"
    biases = [b for n, b in model.named_buffers() if n.endswith("expert_bias")]
    assert biases and all(b.dtype == torch.float32 and b.abs().sum() > 0 for b in biases)
    assert (tmp_path / "checkpoints").is_dir()
