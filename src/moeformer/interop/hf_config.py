"""Hugging Face ``config.json`` <-> :class:`~moeformer.config.ModelConfig`, for eight families (``FAMILIES``).

Every family is a pre-norm RMSNorm decoder with RoPE and SwiGLU FFNs; they differ in biases,
the attention kind and the FFN:

==============  =========================  ==========================================================
model_type      attention                  FFN
==============  =========================  ==========================================================
``llama``       MHA/GQA, all biases or     dense (``mlp_bias``)
                none (``attention_bias``)
``qwen2``       MHA/GQA, q/k/v biases      dense
``mixtral``     MHA/GQA                    top-k: softmax, renormalised over the k chosen
``qwen3``       MHA/GQA + per-head q/k     dense
                RMSNorm, free ``head_dim``
``qwen2_moe``   MHA/GQA, q/k/v biases      top-k softmax (``norm_topk_prob``) + one shared expert
                (``qkv_bias``)             scaled by sigmoid(x . w) (``shared_expert_gate``)
``qwen3_moe``   as ``qwen3``               top-k softmax (``norm_topk_prob``), no shared expert
``deepseek_v2`` multi-head latent (MLA)    softmax top-k (greedy), x ``routed_scaling_factor``,
                                           shared experts; the first ``first_k_dense_replace`` dense
``deepseek_v3`` multi-head latent (MLA)    sigmoid scores + selection bias, group-limited top-k,
                                           renormalised, x ``routed_scaling_factor``, shared experts;
                                           the first ``first_k_dense_replace`` layers dense
==============  =========================  ==========================================================

What a family cannot express is refused by name (:class:`InteropError`) before any weight is read
or written; nothing is approximated silently. This module reads a ``config.json``;
:mod:`moeformer.interop.hf_family` picks the family of a moeformer model and writes one.
"""

from __future__ import annotations

from typing import Any

from moeformer.model_config import ConfigError, ModelConfig
from moeformer.presets import model_config_from_dict

FAMILIES = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


class InteropError(ValueError):
    """A checkpoint or model that has no exact counterpart on the other side; says what and why."""


def model_type(hf: dict[str, Any]) -> str:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise InteropError(f"config.json: model_type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")
    return kind


# rope_parameters keys of YaRN beyond factor / original length; RopeScaling holds their defaults
YARN_FIELDS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


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
        for key in YARN_FIELDS:
            if params.get(key) is not None:
                scaling[key] = bool(params[key]) if key == "truncate" else float(params[key])
        return theta, scaling
    raise InteropError(f"config.json: rope type {rope_type!r} is not supported; supported: default, llama3, yarn")


def _common(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"config.json: hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU) maps to our FFN")
    d = hf["hidden_size"]
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
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads) and not kind.startswith("deepseek"):
        attention["head_dim"] = hf["head_dim"]  # Qwen3, some Llamas: heads narrower or wider than d / H
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
    elif kind in ("qwen3", "qwen3_moe"):
        attention.update(qk_norm=True, bias=bool(hf.get("attention_bias", False)))
        moe = {**_qwen2_moe(hf), "kind": "topk"} if kind == "qwen3_moe" else None  # no shared expert
    else:
        attention = {"kind": "mla", "n_heads": heads, "bias": bool(hf.get("attention_bias")), **_rope_fields(attention)}
        attention.update({k: hf[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim")})
        attention.update({k: hf[k] for k in ("qk_rope_head_dim", "v_head_dim")})
        moe = _deepseek_v3(hf) if kind == "deepseek_v3" else _deepseek_v2(hf)
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
        "n_experts": hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"],  # Hub or transformers 5
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


def _check_deepseek(hf: dict[str, Any]) -> None:
    if hf.get("rms_norm_eps", 1e-6) != 1e-6:  # transformers fixes the latent norms' eps at 1e-6
        raise InteropError(f"config.json: rms_norm_eps {hf['rms_norm_eps']}; DeepSeek (MLA) import needs 1e-6")
    if hf.get("quantization_config"):
        raise InteropError("config.json: quantized (e.g. FP8) checkpoints are not supported; dequantize first")


def _deepseek_v2(hf: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2(-Lite): softmax scores, top-k over all experts, not renormalised (as transformers runs it,
    whatever ``norm_topk_prob`` says), times ``routed_scaling_factor``."""
    _check_deepseek(hf)
    if hf.get("topk_method", "greedy") != "greedy":
        raise InteropError(
            f"config.json: topk_method {hf['topk_method']!r}; DeepSeek-V2 import supports 'greedy' (V2-Lite) only: "
            "its group-limited routing scores a group by its best expert, moeformer's by its best two"
        )
    return {
        "kind": "deepseek",
        "n_experts": hf["n_routed_experts"],
        "top_k": hf["num_experts_per_tok"],
        "expert_hidden": hf["moe_intermediate_size"],
        "n_shared": hf.get("n_shared_experts") or 0,
        "normalize": False,
        "routed_scaling": float(hf.get("routed_scaling_factor", 1.0)),
        "first_dense": min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"]),
    }


def _deepseek_v3(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise InteropError("config.json: DeepSeek-V3 routing other than sigmoid + noaux_tc is not supported")
    _check_deepseek(hf)
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
        "first_dense": min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"] + _mtp_layers(hf)),
    }
    return moe


def _mtp_layers(hf: dict[str, Any]) -> int:
    return int(hf.get("num_nextn_predict_layers") or 0)
