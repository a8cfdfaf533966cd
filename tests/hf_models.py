"""Tiny random transformers models of each interop family, and matching moeformer DecoderLMs, for tests."""

from __future__ import annotations

import pytest
import torch

from moeformer import DecoderLM
from moeformer.config import model_config_from_dict

transformers = pytest.importorskip("transformers", reason="interop tests compare logits with transformers' models")

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "llama-biases": lambda: transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=40,
        norm_topk_prob=False,
        mlp_only_layers=[0],
    ),
    "qwen2_moe-every-other": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=2,
        norm_topk_prob=True,
    ),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """N(0, 0.1^2) everywhere (HF zero-initialises routers and biases), norms around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.2)


def hf_model(config, seed: int = 0):
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomise(model, seed)
    return model


def token_batch(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def lm_config(**overrides):
    base = {
        "arch": "decoder",
        "vocab_size": 61,
        "d_model": 32,
        "n_layers": 3,
        "dropout": 0.0,
        "norm": "rmsnorm",
        "norm_position": "pre",
        "position": "rope",
        "max_seq_len": 64,
        "scale_embeddings": False,
        "tie_embeddings": False,
        "attention": {"n_heads": 4, "n_kv_heads": 2, "bias": False, "rope_theta": 5000.0},
        "ffn": {"activation": "swiglu", "d_ff": 48, "bias": False},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return model_config_from_dict(base)


def our_model(config, seed: int = 3) -> DecoderLM:
    model = DecoderLM(config).eval()
    randomise(model, seed)
    return model
