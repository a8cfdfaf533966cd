"""Weight orthogonalization == directional ablation by hooks, on transformers models and our own."""

from __future__ import annotations

import pytest
import torch

from moeformer.refusal.interventions import ablate, add, edit_sites, project_out, unit
from moeformer.refusal.lm import RefusalError
from moeformer.refusal.orthogonalize import orthogonalize, residual_leak

pytest.importorskip("transformers")
from refusal_models import HARMFUL, HARMLESS, HF_FAMILIES, hf_chat_lm, native_chat_lm  # noqa: E402

PROMPTS = HARMFUL[:2] + HARMLESS[:2]


NATIVE = {
    "moeformer": {},
    "moeformer-mla-gated-shared": {
        "attention": {"kind": "mla", "n_heads": 4, "n_kv_heads": None, "bias": False, "kv_lora_rank": 8}
        | {"q_lora_rank": 12, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 6},
        "moe": {"kind": "deepseek", "n_experts": 6, "top_k": 2, "expert_hidden": 16, "n_shared": 1}
        | {"shared_hidden": 20, "shared_gate": True},
    },
}


def _lm(name: str, **extra):
    return native_chat_lm(**NATIVE[name], **extra) if name in NATIVE else hf_chat_lm(name, **extra)


@pytest.mark.parametrize("name", (*HF_FAMILIES, *NATIVE))
def test_orthogonalized_weights_equal_hook_ablation(name, single_thread):
    lm = _lm(name)
    torch.manual_seed(1)
    r = torch.randn(lm.d_model) * 3
    batch = lm.batch(PROMPTS)
    with torch.no_grad():
        plain = lm.forward_logits(batch)
        with ablate(lm, r):
            ablated = lm.forward_logits(batch)
    assert (plain - ablated).abs().max() > 1e-3  # the ablation does something
    assert residual_leak(lm, batch, r) > 1e-2  # and the stream had a component along r

    result = orthogonalize(lm, r, PROMPTS)
    with torch.no_grad():
        edited = lm.forward_logits(batch)
    torch.testing.assert_close(edited, ablated, atol=1e-4, rtol=0)
    assert result.leak < 1e-5
    assert any("embed" in n for n in result.edited)


@pytest.mark.parametrize("name", ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "moeformer"))
def test_every_expert_and_shared_expert_is_edited(name):
    lm = _lm(name)
    names = [w.name for w in lm.writer_weights()]
    assert any("experts.down_proj" in n for n in names), names
    if name not in ("mixtral", "qwen3_moe"):
        assert any("shared_expert" in n for n in names), names


def test_a_norm_after_each_sublayer_is_refused_clearly():
    lm = hf_chat_lm("gemma2")  # Gemma-2 normalises attention / MLP outputs before adding them
    with torch.no_grad():  # trained norm weights are not uniform (fresh ones are, which would keep r out)
        for name, p in lm.model.named_parameters():
            if "layernorm" in name:
                p.normal_(0, 0.5)
    with pytest.raises(RefusalError, match="still has a component"):
        orthogonalize(lm, torch.randn(lm.d_model), PROMPTS)


def test_tied_embeddings_are_untied_and_the_output_layer_kept():
    lm = hf_chat_lm("llama", tie_word_embeddings=True)
    assert lm.model.lm_head.weight.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()
    head = lm.model.lm_head.weight.detach().clone()
    r = torch.randn(lm.d_model)
    batch = lm.batch(PROMPTS)
    with torch.no_grad(), ablate(lm, r):
        ablated = lm.forward_logits(batch)
    result = orthogonalize(lm, r, PROMPTS)
    assert result.untied and lm.model.config.tie_word_embeddings is False
    torch.testing.assert_close(lm.model.lm_head.weight, head)
    torch.testing.assert_close(lm.forward_logits(batch), ablated, atol=1e-4, rtol=0)


def test_native_tied_embeddings_are_untied():
    lm = native_chat_lm(tie_embeddings=True)
    r = torch.randn(lm.d_model)
    result = orthogonalize(lm, r, PROMPTS)
    assert result.untied and lm.model.config.tie_embeddings is False
    assert lm.model.lm_head.weight is not lm.model.embedding.embed.weight


def test_zero_direction_is_refused():
    lm = hf_chat_lm("llama")
    zero = torch.zeros(lm.d_model)
    with pytest.raises(RefusalError, match="non-zero direction"):
        with ablate(lm, zero):
            pass
    before = lm.model.model.layers[0].self_attn.o_proj.weight.clone()
    with pytest.raises(RefusalError, match="non-zero direction"):
        orthogonalize(lm, zero, PROMPTS)
    torch.testing.assert_close(lm.model.model.layers[0].self_attn.o_proj.weight, before)


@pytest.mark.parametrize("shape", [(31,), (33,), (2, 32)])
def test_direction_of_the_wrong_size_is_refused(shape):
    lm = hf_chat_lm("llama")
    with pytest.raises(RefusalError, match="hidden size is 32"):
        with ablate(lm, torch.ones(shape)):
            pass
    with pytest.raises(RefusalError, match="hidden size is 32"):
        orthogonalize(lm, torch.ones(shape), PROMPTS)


def test_post_norm_and_sinusoidal_models_refuse_orthogonalization():
    lm = native_chat_lm(norm_position="post")
    with pytest.raises(RefusalError, match="pre-norm"):
        orthogonalize(lm, torch.randn(lm.d_model), PROMPTS)
    lm = native_chat_lm(position="sinusoidal")
    with pytest.raises(RefusalError, match="sinusoidal"):
        orthogonalize(lm, torch.randn(lm.d_model), PROMPTS)


def _record_layer_inputs(lm, batch) -> list:
    seen = []

    def keep(x):
        seen.append(x.clone())
        return x

    with torch.no_grad(), edit_sites(lm.layer_sites(), keep):
        lm.forward_logits(batch)
    return seen


def test_actadd_adds_the_vector_at_one_layer_only():
    lm = hf_chat_lm("qwen2")
    r = torch.randn(lm.d_model)
    batch = lm.batch(PROMPTS)
    plain = _record_layer_inputs(lm, batch)
    with add(lm, r, 1):  # registered first, so it runs before the recording hook
        added = _record_layer_inputs(lm, batch)
    torch.testing.assert_close(added[0], plain[0])  # the layer before is untouched
    torch.testing.assert_close(added[1], plain[1] + r, atol=1e-5, rtol=0)
    with pytest.raises(RefusalError, match="layer must be in 0..2"):
        with add(lm, r, 3):
            pass


def test_project_out_removes_the_component():
    r_hat = unit(torch.tensor([3.0, 4.0]))
    x = torch.tensor([[1.0, 2.0], [-4.0, 3.0]])
    out = project_out(x, r_hat)
    torch.testing.assert_close(out @ r_hat, torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], x[1])  # already orthogonal
