"""The edit as a PEFT LoRA adapter: loaded on the unmodified model it gives the edited model's logits;
what LoRA cannot express is refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from refusal_models import HARMFUL, HARMLESS, hf_chat_lm, hf_model, native_chat_lm  # noqa: E402

from moeformer.refusal.edits import StrengthKernel  # noqa: E402
from moeformer.refusal.lm import RefusalError  # noqa: E402
from moeformer.refusal.lora import ADAPTER_WEIGHTS, save_lora  # noqa: E402
from moeformer.refusal.orthogonalize import orthogonalize_weights  # noqa: E402

PROMPTS = HARMFUL[:2] + HARMLESS[:2]


def _logits(model, lm, batch):
    real = (~batch.padding_mask).long()
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=batch.ids, attention_mask=real, position_ids=positions).logits.float()


@pytest.mark.parametrize(
    "family, extra, edit",
    [
        ("llama", {"tie_word_embeddings": True}, {}),
        ("llama", {}, {"kernel": StrengthKernel(peak_layer=1, width=1.5, minimum=0.2)}),
        ("qwen2", {}, {"method": "projected"}),
        ("mistral", {}, {}),
        ("gemma", {}, {}),
    ],
    ids=["llama-tied", "llama-kernel", "qwen2-projected", "mistral", "gemma"],
)
def test_the_adapter_on_the_base_model_is_the_edited_model(family, extra, edit, tmp_path, single_thread):
    lm = hf_chat_lm(family, **extra)
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5))
    mean = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(6)) if edit.get("method") else None
    save_lora(lm, direction, tmp_path / "adapter", harmless_mean=mean, **edit)
    batch = lm.batch(PROMPTS)
    base, _ = hf_model(family, **extra)  # the same seed: the same weights, never edited
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    got = _logits(adapted, lm, batch)
    orthogonalize_weights(lm, direction, harmless_mean=mean, **edit)
    expected = _logits(lm.model, lm, batch)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 1 and config["peft_type"] == "LORA"
    size = (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert size < 0.1 * sum(p.numel() * p.element_size() for p in base.parameters())  # vectors, not a model copy


@pytest.mark.parametrize(
    "lm, edit, match",
    [
        (lambda: hf_chat_lm("llama"), {"method": "norm-preserving"}, "not a rank-one update"),
        (lambda: hf_chat_lm("llama", mlp_bias=True), {}, "bias on a module that writes to the residual stream"),
        (lambda: hf_chat_lm("mixtral"), {}, "fused 3-D expert tensors"),
        (lambda: native_chat_lm(), {}, "PEFT adapters for Hugging Face models"),
    ],
    ids=["norm-preserving", "biases", "fused-experts", "native"],
)
def test_what_lora_cannot_express_is_refused_before_writing(lm, edit, match, tmp_path):
    model = lm()
    with pytest.raises(RefusalError, match=match):
        save_lora(model, torch.ones(model.d_model), tmp_path / "adapter", **edit)
    assert not (tmp_path / "adapter").exists()


def test_an_architecture_the_edit_cannot_reach_gets_no_adapter(tmp_path):
    """Gemma-2 normalises each sublayer's output before adding it: the residual check refuses it."""
    lm = hf_chat_lm("gemma2")
    with torch.no_grad():  # trained norm weights are not uniform (fresh ones are, which would keep r out)
        for name, p in lm.model.named_parameters():
            if "layernorm" in name:
                p.normal_(0, 0.5)
    with pytest.raises(RefusalError, match="still has a component along the direction"):
        save_lora(lm, torch.randn(lm.d_model), tmp_path / "adapter", check_prompts=PROMPTS)
    assert not (tmp_path / "adapter").exists()
