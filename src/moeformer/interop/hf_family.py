"""Which transformers family computes exactly what a moeformer DecoderLM computes, and its ``config.json``.

:func:`family_for` refuses, naming the option, what no family can express; :func:`config_to_hf`
writes the chosen family's ``config.json`` (the inverse of :func:`~moeformer.interop.hf_config.config_from_hf`).
"""

from __future__ import annotations

from typing import Any

from moeformer.interop.hf_config import ARCHITECTURES, YARN_FIELDS, InteropError
from moeformer.model_config import AttentionConfig, ModelConfig, MoEConfig


def family_for(config: ModelConfig) -> str:
    """The transformers family that computes exactly what ``config`` does, or InteropError saying why none."""
    _check_exportable(config)
    a, moe = config.attention, config.moe
    dense = moe is None or moe.kind == "dense"
    if not dense:
        _check_moe_exportable(config, moe)
        if moe.kind == "soft":
            raise InteropError("moe.kind 'soft' (every expert, dense gate) has no transformers equivalent")
        if moe.kind == "expert_choice":
            raise InteropError("moe.kind 'expert_choice' (experts pick tokens) has no transformers equivalent")
    if a.kind == "mla":
        if config.norm_eps != 1e-6:
            raise InteropError("norm_eps: DeepSeek's latent norms use 1e-6 in transformers; set norm_eps = 1e-6")
        family = "deepseek_v3" if dense else _deepseek_family(config, moe)
        if config.mtp is not None and family != "deepseek_v3":
            raise InteropError(f"mtp: multi-token prediction modules have a place only in deepseek_v3 checkpoints, "
                               f"not {family} (needs sigmoid routing)")  # fmt: skip
        return family
    if config.mtp is not None:
        raise InteropError("mtp: multi-token prediction modules have a place only in deepseek_v3 checkpoints "
                           "(attention.kind 'mla'); no other transformers family stores them")  # fmt: skip
    if a.qk_norm:
        return _qwen3_family(config, moe, dense)
    family = _dense_family(config) if dense else _moe_family(config, moe)
    if config.head_dim != config.d_model // a.n_heads and family.startswith("qwen2"):
        raise InteropError(f"attention.head_dim: {family} derives the head size from hidden_size / heads")
    return family


def _dense_family(config: ModelConfig) -> str:
    a = config.attention
    if a.qkv_bias and not a.bias:
        if config.ffn.bias:
            raise InteropError("ffn.bias: Qwen2 (q/k/v biases only) has no FFN biases; no family has both")
        return "qwen2"
    if a.qkv_bias is not None and a.qkv_bias != a.bias:
        raise InteropError("attention: an out_proj bias without q/k/v biases has no transformers family")
    return "llama"


def _moe_family(config: ModelConfig, moe: MoEConfig) -> str:
    a = config.attention
    _check_softmax_routing(moe)
    qkv_bias = a.bias if a.qkv_bias is None else a.qkv_bias
    if a.bias or (moe.kind == "topk" and qkv_bias):
        raise InteropError(
            "attention biases: Mixtral has none, Qwen2-MoE only on q/k/v (set bias=false, qkv_bias=true)"
        )
    if moe.kind == "topk":
        if not moe.normalize or moe.placement != "all" or moe.first_dense:
            raise InteropError(
                "moe.kind 'topk' exports as Mixtral: normalize=true, placement 'all', first_dense 0 "
                "(or as Qwen3-MoE, with attention.qk_norm = true)"
            )
        return "mixtral"
    if not moe.n_shared:
        raise InteropError("moe.kind 'deepseek' without shared experts and softmax scores: use kind 'topk' (Mixtral)")
    return "qwen2_moe"


def _qwen3_family(config: ModelConfig, moe: MoEConfig | None, dense: bool) -> str:
    """Per-head q/k norms exist in Qwen3 and Qwen3-MoE: one attention bias switch, no shared experts."""
    a = config.attention
    if a.qkv_bias is not None and a.qkv_bias != a.bias:
        raise InteropError("attention.qkv_bias: Qwen3 has one attention_bias for q, k, v and o")
    if config.ffn.bias:
        raise InteropError("ffn.bias: Qwen3 has no FFN biases")
    if dense:
        return "qwen3"
    if moe.kind != "topk":
        raise InteropError(f"attention.qk_norm with moe.kind {moe.kind!r}: Qwen3-MoE is kind 'topk', no shared experts")
    _check_softmax_routing(moe)
    return "qwen3_moe"


def _check_softmax_routing(moe: MoEConfig) -> None:
    if moe.score != "softmax" or moe.n_group > 1:
        raise InteropError(
            f"moe.score={moe.score!r}, n_group={moe.n_group}: sigmoid or group-limited routing exists in "
            "transformers only in DeepSeek-V3, which uses MLA; set attention.kind = 'mla' to export it"
        )
    if moe.routed_scaling != 1.0:
        raise InteropError("moe.routed_scaling != 1 has no softmax-routed transformers family without MLA")


def _deepseek_family(config: ModelConfig, moe: MoEConfig) -> str:
    """MLA models export as DeepSeek-V3 (sigmoid routing) or DeepSeek-V2 (softmax, not renormalised)."""
    if moe.kind != "deepseek" or moe.shared_gate or moe.placement != "all":
        raise InteropError(
            "MLA exports as DeepSeek-V2/V3, whose MoE is kind 'deepseek' with ungated shared experts of the routed "
            "experts' size and placement 'all' after first_dense"
        )
    if moe.shared_hidden not in (None, moe.n_shared * _expert_hidden(config)):
        raise InteropError("moe.shared_hidden: DeepSeek's shared experts have the routed experts' size")
    if moe.score == "sigmoid":
        return "deepseek_v3"
    if moe.normalize or moe.n_group > 1:
        raise InteropError(
            "MLA with softmax routing exports as DeepSeek-V2, which neither renormalises the k weights nor limits "
            "groups in moeformer's way: set moe.normalize = false and n_group = 1, or score = 'sigmoid' (V3)"
        )
    return "deepseek_v2"


def _expert_hidden(config: ModelConfig) -> int:
    return config.moe.expert_width(config.ffn.d_ff)


def _check_exportable(config: ModelConfig) -> None:
    wrong = []
    if config.arch != "decoder":
        wrong.append(f"arch={config.arch!r} (need 'decoder')")
    if config.norm != "rmsnorm" or config.norm_position != "pre":
        wrong.append(f"norm={config.norm!r} at {config.norm_position!r} (need pre-norm 'rmsnorm')")
    if config.position != "rope":
        wrong.append(f"position={config.position!r} (need 'rope')")
    if config.scale_embeddings:
        wrong.append("scale_embeddings=true (need false)")
    if config.ffn.activation != "swiglu":
        wrong.append(f"ffn.activation={config.ffn.activation!r} (need 'swiglu')")
    if wrong:
        raise InteropError("no transformers family computes this model: " + "; ".join(wrong))


def _check_moe_exportable(config: ModelConfig, moe: MoEConfig) -> None:
    if config.ffn.bias:
        raise InteropError("ffn.bias: the transformers MoE families have no expert biases")
    if moe.capacity_factor is not None or moe.noisy or moe.group_routing == "hierarchical" and moe.n_group > 1:
        raise InteropError("moe: capacity dropping, noisy gating, hierarchical routing: no transformers equivalent")


def config_to_hf(config: ModelConfig, family: str, *, pad_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of ``family`` (from :func:`family_for`) for ``config``."""
    a, moe = config.attention, config.moe
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads or a.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": _rope_parameters(a),
        "rope_theta": a.rope_theta,  # for readers older than transformers 5
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": a.dropout,
        "pad_token_id": config.pad_id if pad_id is None else pad_id,
    }
    if family == "llama":
        hf.update(attention_bias=a.bias, mlp_bias=config.ffn.bias, head_dim=config.head_dim)
    elif family == "qwen2":
        hf.update(use_sliding_window=False)
    elif family == "mixtral":
        hf.update(num_local_experts=moe.routed_experts, num_experts_per_tok=moe.routed_top_k)
        hf.update(intermediate_size=_expert_hidden(config), router_aux_loss_coef=moe.balance_loss)
        hf.update(router_jitter_noise=0.0, sliding_window=None, head_dim=config.head_dim)
    elif family == "qwen2_moe":
        hf.update(_qwen2_moe_fields(config, moe))
    elif family.startswith("qwen3"):
        hf.update(attention_bias=a.bias, head_dim=config.head_dim, use_sliding_window=False)
        if family == "qwen3_moe":
            sparse = _qwen2_moe_fields(config, moe)
            hf.update({k: v for k, v in sparse.items() if not k.startswith(("shared_", "qkv_"))})
    else:
        hf.update(_deepseek_fields(config, family))
    return hf


def _rope_parameters(a: AttentionConfig) -> dict[str, Any]:
    s = a.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": a.rope_theta}
    params = {"rope_type": s.kind, "rope_theta": a.rope_theta, "factor": s.factor}
    params["original_max_position_embeddings"] = s.original_max_seq_len
    if s.kind == "llama3":
        return {**params, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
    return {**params, **{k: getattr(s, k) for k in YARN_FIELDS}}


def _qwen2_moe_fields(config: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    hidden = _expert_hidden(config)
    dense = list(range(min(moe.first_dense, config.n_layers)))
    return {
        "qkv_bias": bool(config.attention.qkv_bias if config.attention.qkv_bias is not None else config.attention.bias),
        "use_sliding_window": False,
        "num_experts": moe.routed_experts,
        "num_experts_per_tok": moe.routed_top_k,
        "moe_intermediate_size": hidden,
        "shared_expert_intermediate_size": moe.shared_hidden or moe.n_shared * hidden,
        "norm_topk_prob": moe.normalize,
        "decoder_sparse_step": 1 if moe.placement == "all" else 2,
        "mlp_only_layers": dense,
        "router_aux_loss_coef": moe.balance_loss,
    }


def _deepseek_fields(config: ModelConfig, family: str) -> dict[str, Any]:
    a, moe = config.attention, config.moe
    fields = {k: getattr(a, k) for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")}
    fields.update(v_head_dim=a.v_head_dim, qk_head_dim=a.qk_nope_head_dim + a.qk_rope_head_dim)
    fields.update(head_dim=a.qk_rope_head_dim, attention_bias=a.bias, rope_interleave=True)
    depth = 0 if config.mtp is None else config.mtp.depth
    if moe is None or moe.kind == "dense":  # every layer dense (MTP's too): the MoE fields are never used
        fields.update(first_k_dense_replace=config.n_layers + depth, n_routed_experts=1, num_experts_per_tok=1)
        fields.update(num_nextn_predict_layers=depth)
        fields.update(moe_intermediate_size=config.ffn.d_ff, n_shared_experts=0, n_group=1, topk_group=1)
        return fields
    fields.update(
        n_routed_experts=moe.routed_experts,
        num_experts_per_tok=moe.routed_top_k,
        moe_intermediate_size=_expert_hidden(config),
        n_shared_experts=moe.n_shared,
        norm_topk_prob=moe.normalize,
        n_group=moe.n_group,
        topk_group=moe.topk_group,
        routed_scaling_factor=moe.routed_scaling,
        first_k_dense_replace=moe.first_dense,
    )
    if family == "deepseek_v2":
        fields.update(topk_method="greedy", n_group=None, topk_group=None)
    else:
        fields.update(num_nextn_predict_layers=depth)
    return fields
