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
    "llama-rope-llama3": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0}
        | {"high_freq_factor": 4.0, "original_max_position_embeddings": 4},
    ),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3-wide-heads": lambda: transformers.Qwen3Config(**COMMON, head_dim=12, tie_word_embeddings=True),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        head_dim=6,
    ),
    "llama-narrow-heads": lambda: transformers.LlamaConfig(**COMMON, head_dim=4),
    "qwen2-yarn": lambda: transformers.Qwen2Config(
        **COMMON,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
        | {"original_max_position_embeddings": 4},
    ),
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
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4},  # MLA: every head reads the shared latent
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=16,
        n_shared_experts=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=12,
    ),
    "deepseek_v3-full-q-biases": lambda: transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4},  # MLA: every head reads the shared latent
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=0,
        q_lora_rank=None,
        kv_lora_rank=12,
        qk_nope_head_dim=6,
        qk_rope_head_dim=6,
        v_head_dim=8,
        attention_bias=True,
        norm_topk_prob=False,
    ),
    "deepseek_v3-yarn": lambda: transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4},
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=2,
        topk_group=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 16.0, "mscale": 1.0}
        | {"mscale_all_dim": 0.8, "original_max_position_embeddings": 4, "beta_fast": 32.0, "beta_slow": 1.0},
    ),
    "deepseek_v2-lite-style": lambda: transformers.DeepseekV2Config(
        **{**COMMON, "num_key_value_heads": 4},
        n_routed_experts=6,
        num_experts_per_tok=2,
        n_shared_experts=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        head_dim=4,
        v_head_dim=8,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 16.0, "mscale": 0.707}
        | {"mscale_all_dim": 0.707, "original_max_position_embeddings": 4},
    ),
    "deepseek_v3-not-interleaved": lambda: transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4},  # MLA: every head reads the shared latent
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        moe_intermediate_size=16,
        first_k_dense_replace=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=4,
        qk_rope_head_dim=8,
        v_head_dim=8,
        rope_interleave=False,
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
    """Random weights; with sigmoid routing also a random balancing bias (DeepSeek-V3 keeps it)."""
    model = DecoderLM(config).eval()
    randomise(model, seed)
    if config.moe is not None and config.moe.score == "sigmoid":
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name.endswith("expert_bias"):
                    b.copy_(torch.rand(b.shape, generator=g) * 0.2)
    return model
