"""The edit variants: each equals its hook-based intervention where one exists (projected, strength
kernel), norm-preserving keeps every written vector's norm, and all of them stream bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from refusal_models import HARMFUL, HARMLESS, hf_chat_lm, native_chat_lm  # noqa: E402
from test_refusal_streaming import _save, _tensors  # noqa: E402

from moeformer.refusal.edits import StrengthKernel, edit_vectors, projected_direction, writer_layer  # noqa: E402
from moeformer.refusal.interventions import ablate, ablate_partially, unit  # noqa: E402
from moeformer.refusal.lm import RefusalError  # noqa: E402
from moeformer.refusal.orthogonalize import orthogonalize, orthogonalize_weights, save_model  # noqa: E402
from moeformer.refusal.streaming import stream_orthogonalize  # noqa: E402

PROMPTS = HARMFUL[:2] + HARMLESS[:2]
FAMILIES = ("llama", "qwen2_moe", "deepseek_v3", "native")


def _lm(name: str):
    return native_chat_lm() if name == "native" else hf_chat_lm(name)


def _vectors(seed: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g), torch.randn(d, generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_strength_kernel_edit_equals_partial_ablation_by_hooks(family, single_thread):
    lm = _lm(family)
    direction, _ = _vectors(1, lm.d_model)
    kernel = StrengthKernel(peak_layer=1, width=1.5, peak=0.9, minimum=0.3)
    alphas = kernel.alphas(lm.n_layers)
    assert alphas[:3] == pytest.approx([0.5, 0.9, 0.5])  # 0.9 + (0.3 - 0.9) * 1 / 1.5
    batch = lm.batch(PROMPTS)
    with torch.no_grad(), ablate_partially(lm, direction, alphas):
        expected = lm.forward_logits(batch)
    with torch.no_grad():
        baseline = lm.forward_logits(batch)
    result = orthogonalize(lm, direction, PROMPTS, kernel=kernel)
    assert result.leak is None  # a partial edit is not checked for leaks
    with torch.no_grad():
        got = lm.forward_logits(batch)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(got, baseline, atol=1e-3)


def test_full_strength_everywhere_is_the_papers_edit(single_thread):
    lm = hf_chat_lm("qwen2_moe")
    direction, _ = _vectors(1, lm.d_model)
    batch = lm.batch(PROMPTS)
    with torch.no_grad(), ablate(lm, direction):
        full = lm.forward_logits(batch)
    with torch.no_grad(), ablate_partially(lm, direction, [1.0] * lm.n_layers):
        partial = lm.forward_logits(batch)
    torch.testing.assert_close(partial, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_projected_equals_ablating_the_projected_direction_and_spares_the_harmless_mean(family, single_thread):
    lm = _lm(family)
    direction, mean = _vectors(2, lm.d_model)
    removed = projected_direction(direction, mean)
    assert abs(float(unit(removed) @ unit(mean))) < 1e-6
    batch = lm.batch(PROMPTS)
    with torch.no_grad(), ablate(lm, removed):
        expected = lm.forward_logits(batch)
    result = orthogonalize(lm, direction, PROMPTS, method="projected", harmless_mean=mean)
    assert result.method == "projected" and result.leak < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(lm.forward_logits(batch), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ("llama", "deepseek_v3", "native"))
def test_norm_preserving_keeps_every_written_vector_and_removes_the_direction(family, single_thread):
    lm = _lm(family)
    direction, _ = _vectors(3, lm.d_model)
    r_hat = unit(direction)
    before = {w.name: w.param.detach().movedim(w.axis, -1).float().clone() for w in lm.writer_weights()}
    result = orthogonalize(lm, direction, PROMPTS, method="norm-preserving")
    assert result.leak < 1e-4
    for w in lm.writer_weights():
        after = w.param.detach().movedim(w.axis, -1).float()
        old, new = before[w.name].norm(dim=-1), after.norm(dim=-1)
        torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-7, msg=w.name)
        assert (after @ r_hat).abs().max() < 1e-5 * max(float(old.max()), 1.0), w.name


def test_norm_preserving_on_known_vectors():
    r_hat = torch.tensor([1.0, 0.0, 0.0])
    v = torch.tensor([[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]])
    out = edit_vectors(v, r_hat, preserve_norm=True)
    torch.testing.assert_close(out, torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]))  # all along r: left at 0
    torch.testing.assert_close(edit_vectors(v, r_hat, alpha=0.5), torch.tensor([[1.5, 4.0, 0.0], [2.5, 0.0, 0.0]]))


@pytest.mark.parametrize(
    "kwargs", [{"method": "norm-preserving"}, {"method": "projected"}, {"kernel": StrengthKernel(1, 1.0, 0.8, 0.2)}],
    ids=["norm-preserving", "projected", "kernel"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_every_variant_streams_bit_for_bit(kwargs, dtype, tmp_path):
    lm = hf_chat_lm("deepseek_v3")
    lm.model.to(dtype)
    source = _save(lm, tmp_path / "source")
    direction, mean = _vectors(4, lm.d_model)
    mean = mean if kwargs.get("method") == "projected" else None
    stream_orthogonalize(source, tmp_path / "streamed", direction, harmless_mean=mean, **kwargs)
    orthogonalize_weights(lm, direction, harmless_mean=mean, **kwargs)
    save_model(lm, tmp_path / "in-memory")
    expected, got = _tensors(tmp_path / "in-memory"), _tensors(tmp_path / "streamed")
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], t) for n, t in expected.items())


def test_writer_layers_and_bad_settings():
    assert writer_layer("model.layers.12.mlp.experts.3.down_proj.weight") == 12
    assert writer_layer("layers.2.ffn.experts.down_proj") == 2
    assert writer_layer("model.embed_tokens.weight") == 0
    with pytest.raises(RefusalError, match="width must be > 0"):
        StrengthKernel(peak_layer=3, width=0)
    with pytest.raises(RefusalError, match=r"peak strength must be in \[0, 1\]"):
        StrengthKernel(peak_layer=3, width=2, peak=1.5)
    lm = hf_chat_lm("llama")
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    with pytest.raises(RefusalError, match="method must be one of orthogonal, projected, norm-preserving"):
        orthogonalize_weights(lm, torch.ones(lm.d_model), method="sideways")
    with pytest.raises(RefusalError, match="projected method needs the harmless mean"):
        orthogonalize_weights(lm, torch.ones(lm.d_model), method="projected")
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
