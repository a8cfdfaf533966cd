"""Hugging Face ``config.json`` <-> :class:`~moeformer.config.ModelConfig`, for five families.

Every family is a pre-norm RMSNorm decoder with RoPE and SwiGLU FFNs; they differ in biases,
the attention kind and the FFN:

==============  =========================  ==========================================================
model_type      attention                  FFN
==============  =========================  ==========================================================
``llama``       MHA/GQA, all biases or     dense (``mlp_bias``)
                none (``attention_bias``)
``qwen2``       MHA/GQA, q/k/v biases      dense
``mixtral``     MHA/GQA                    top-k: softmax, renormalised over the k chosen
``qwen2_moe``   MHA/GQA, q/k/v biases      top-k softmax (``norm_topk_prob``) + one shared expert
                (``qkv_bias``)             scaled by sigmoid(x . w) (``shared_expert_gate``)
``deepseek_v3`` multi-head latent (MLA)    sigmoid scores + selection bias, group-limited top-k,
                                           renormalised, x ``routed_scaling_factor``, shared experts;
                                           the first ``first_k_dense_replace`` layers dense
==============  =========================  ==========================================================

What a family cannot express is refused by name (:class:`InteropError`) before any weight is read
or written; nothing is approximated silently.
"""

from __future__ import annotations

from typing import Any

from moeformer.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, model_config_from_dict

FAMILIES = ("llama", "qwen2", "mixtral", "qwen2_moe", "deepseek_v3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


class InteropError(ValueError):
    """A checkpoint or model that has no exact counterpart on the other side; says what and why."""


def model_type(hf: dict[str, Any]) -> str:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise InteropError(f"config.json: model_type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")
    return kind


YARN_DEFAULTS: dict[str, Any] = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.0,
    "mscale_all_dim": 0.0,
    "attention_factor": None,
    "truncate": True,
}


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling from transformers 5's ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    original = int(params.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048))
    if rope_type == "llama3":
        scaling = {k: float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")}
        return theta, {"kind": "llama3", **scaling, "original_max_seq_len": original}
    if rope_type == "yarn":
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        scaling = {"kind": "yarn", "factor": float(factor), "original_max_seq_len": original}
        for key, default in YARN_DEFAULTS.items():
            if params.get(key) is not None:
                scaling[key] = type(default)(params[key]) if default is not None else float(params[key])
        return theta, scaling
    raise InteropError(f"config.json: rope type {rope_type!r} is not supported; supported: default, llama3, yarn")


def _common(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"config.json: hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU) maps to our FFN")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("model_type") != "deepseek_v3" and hf.get("head_dim") not in (None, d // heads):
        raise InteropError(
            f"config.json: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads = {d // heads}; "
            "moeformer's attention derives the head size from d_model"
        )
    if hf.get("use_sliding_window") or (hf.get("model_type") == "mixtral" and hf.get("sliding_window")):
        raise InteropError("config.json: sliding-window attention is not supported; full attention only")
    pad = hf.get("pad_token_id")
    return {
        "arch": "decoder",
        "vocab_size": hf["vocab_size"],
        "d_model": d,
        "n_layers": hf["num_hidden_layers"],
        "dropout": 0.0,
        "norm": "rmsnorm",
        "norm_position": "pre",
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "position": "rope",
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "pad_id": pad if isinstance(pad, int) and 0 <= pad < hf["vocab_size"] else 0,
        "scale_embeddings": False,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a transformers ``config.json`` dict; :class:`InteropError` if it has none."""
    kind = model_type(hf)
    base = _common(hf)
    theta, scaling = _rope(hf)
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    attention = {"n_heads": heads, "n_kv_heads": kv_heads, "rope_theta": theta, "bias": False}
    if scaling is not None:
        attention["rope_scaling"] = scaling
    ffn = {"activation": "swiglu", "d_ff": hf["intermediate_size"], "bias": False}
    moe: dict[str, Any] | None = None
    if kind == "llama":
        attention["bias"] = bool(hf.get("attention_bias", False))
        ffn["bias"] = bool(hf.get("mlp_bias", False))
    elif kind == "qwen2":
        attention["qkv_bias"] = True
    elif kind == "mixtral":
        moe = {"kind": "topk", "n_experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"]}
        moe["balance_loss"] = float(hf.get("router_aux_loss_coef", 0.0))
    elif kind == "qwen2_moe":
        attention["qkv_bias"] = bool(hf.get("qkv_bias", True))
        moe = _qwen2_moe(hf)
    else:
        attention = {"kind": "mla", "n_heads": heads, "bias": bool(hf.get("attention_bias")), **_rope_fields(attention)}
        attention.update({k: hf[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim")})
        attention.update({k: hf[k] for k in ("qk_rope_head_dim", "v_head_dim")})
        moe = _deepseek_v3(hf)
    data = {**base, "attention": attention, "ffn": ffn}
    if moe is not None:
        data["moe"] = moe
    try:
        return model_config_from_dict(data)
    except ConfigError as err:
        raise InteropError(f"config.json ({kind}) gives an invalid moeformer config: {err}") from None


def _rope_fields(attention: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attention.items() if k.startswith("rope_")}


def _qwen2_moe(hf: dict[str, Any]) -> dict[str, Any]:
    step = hf.get("decoder_sparse_step", 1)
    if step not in (1, 2):
        raise InteropError(f"config.json: decoder_sparse_step {step}; supported: 1 (every layer) or 2 (every other)")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise InteropError(f"config.json: mlp_only_layers {dense}; only a leading run of dense layers is supported")
    moe = {
        "kind": "deepseek",
        "n_experts": hf["num_experts"],
        "top_k": hf["num_experts_per_tok"],
        "expert_hidden": hf["moe_intermediate_size"],
        "normalize": bool(hf.get("norm_topk_prob", False)),
        "placement": "all" if step == 1 else "every_other",
        "first_dense": len(dense),
        "balance_loss": float(hf.get("router_aux_loss_coef", 0.0)),
    }
    if hf.get("shared_expert_intermediate_size", 0):
        moe.update(n_shared=1, shared_hidden=hf["shared_expert_intermediate_size"], shared_gate=True)
    return moe


def _deepseek_v3(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise InteropError("config.json: DeepSeek-V3 routing other than sigmoid + noaux_tc is not supported")
    if hf.get("rms_norm_eps", 1e-6) != 1e-6:  # transformers fixes the latent norms' eps at 1e-6
        raise InteropError(f"config.json: rms_norm_eps {hf['rms_norm_eps']}; DeepSeek-V3 import needs 1e-6")
    if hf.get("quantization_config"):
        raise InteropError("config.json: quantized (e.g. FP8) checkpoints are not supported; dequantize first")
    moe = {
        "kind": "deepseek",
        "n_experts": hf["n_routed_experts"],
        "top_k": hf["num_experts_per_tok"],
        "expert_hidden": hf["moe_intermediate_size"],
        "n_shared": hf.get("n_shared_experts") or 0,
        "score": "sigmoid",
        "normalize": bool(hf.get("norm_topk_prob", True)),
        "n_group": hf.get("n_group") or 1,
        "topk_group": hf.get("topk_group") or 1,
        "routed_scaling": float(hf.get("routed_scaling_factor", 1.0)),
        "first_dense": min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"]),
    }
    return moe


def family_for(config: ModelConfig) -> str:
    """The transformers family that computes exactly what ``config`` does, or InteropError saying why none."""
    _check_exportable(config)
    a, moe = config.attention, config.moe
    mla = a.kind == "mla"
    if mla and config.norm_eps != 1e-6:
        raise InteropError("norm_eps: DeepSeek-V3's latent norms use 1e-6 in transformers; set norm_eps = 1e-6")
    if moe is None or moe.kind == "dense":
        if mla:
            return "deepseek_v3"
        if a.qkv_bias and not a.bias:
            if config.ffn.bias:
                raise InteropError("ffn.bias: Qwen2 (q/k/v biases only) has no FFN biases; no family has both")
            return "qwen2"
        if a.qkv_bias is not None and a.qkv_bias != a.bias:
            raise InteropError("attention: an out_proj bias without q/k/v biases has no transformers family")
        return "llama"
    _check_moe_exportable(config, moe)
    if moe.kind == "soft":
        raise InteropError("moe.kind 'soft' (every expert, dense gate) has no transformers equivalent")
    if mla:
        if moe.kind != "deepseek" or moe.score != "sigmoid" or moe.shared_gate or moe.placement != "all":
            raise InteropError(
                "MLA exports as DeepSeek-V3, whose MoE is kind 'deepseek' with score 'sigmoid', ungated shared experts "
                "of the routed experts' size, and placement 'all' after first_dense"
            )
        if moe.shared_hidden not in (None, moe.n_shared * _expert_hidden(config)):
            raise InteropError("moe.shared_hidden: DeepSeek-V3's shared experts have the routed experts' size")
        return "deepseek_v3"
    if moe.score != "softmax" or moe.n_group > 1:
        raise InteropError(
            f"moe.score={moe.score!r}, n_group={moe.n_group}: sigmoid or group-limited routing exists in "
            "transformers only in DeepSeek-V3, which uses MLA; set attention.kind = 'mla' to export it"
        )
    if moe.routed_scaling != 1.0:
        raise InteropError("moe.routed_scaling != 1 has no softmax-routed transformers family")
    qkv_bias = a.bias if a.qkv_bias is None else a.qkv_bias
    if a.bias or (moe.kind == "topk" and qkv_bias):
        raise InteropError(
            "attention biases: Mixtral has none, Qwen2-MoE only on q/k/v (set bias=false, qkv_bias=true)"
        )
    if moe.kind == "topk":
        if not moe.normalize or moe.placement != "all" or moe.first_dense:
            raise InteropError("moe.kind 'topk' exports as Mixtral: normalize=true, placement 'all', first_dense 0")
        return "mixtral"
    if not moe.n_shared:
        raise InteropError("moe.kind 'deepseek' without shared experts and softmax scores: use kind 'topk' (Mixtral)")
    return "qwen2_moe"


def _expert_hidden(config: ModelConfig) -> int:
    moe = config.moe
    hidden = moe.expert_hidden if moe.expert_hidden is not None else config.ffn.d_ff
    return hidden // moe.granularity


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
    else:
        hf.update(_deepseek_v3_fields(config))
    return hf


def _rope_parameters(a: AttentionConfig) -> dict[str, Any]:
    s = a.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": a.rope_theta}
    params = {"rope_type": s.kind, "rope_theta": a.rope_theta, "factor": s.factor}
    params["original_max_position_embeddings"] = s.original_max_seq_len
    if s.kind == "llama3":
        return {**params, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
    return {**params, **{k: getattr(s, k) for k in YARN_DEFAULTS}}


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


def _deepseek_v3_fields(config: ModelConfig) -> dict[str, Any]:
    a, moe = config.attention, config.moe
    fields = {k: getattr(a, k) for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")}
    fields.update(v_head_dim=a.v_head_dim, qk_head_dim=a.qk_nope_head_dim + a.qk_rope_head_dim)
    fields.update(head_dim=a.qk_rope_head_dim, attention_bias=a.bias, rope_interleave=True)
    if moe is None or moe.kind == "dense":  # every layer dense: the MoE fields are never used
        fields.update(first_k_dense_replace=config.n_layers, n_routed_experts=1, num_experts_per_tok=1)
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
        num_nextn_predict_layers=0,
    )
    return fields
