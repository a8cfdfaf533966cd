"""Named model sizes: the paper's base and big Transformers, decoder-only LMs, and debug sizes.

A preset is a plain dict of :class:`~moeformer.model_config.ModelConfig` keys (without ``vocab_size``,
which comes from the tokenizer); TOML files select one with ``preset = "..."`` and override any
key. ``*-tiny`` sizes are for tests and run in milliseconds on a CPU.

:func:`model_config_from_dict` (a ``[model]`` table, with or without a ``preset``, to a validated
:class:`~moeformer.model_config.ModelConfig`) lives here, above ``model_config``, so that neither
module imports the other's importer.
"""

from __future__ import annotations

import copy
from typing import Any

from moeformer.model_config import ModelConfig
from moeformer.validation import ConfigError, from_dict

# "Attention Is All You Need", Table 3: base (65M) and big (213M) models.
_PAPER = {
    "arch": "seq2seq",
    "norm": "layernorm",
    "norm_position": "post",
    "position": "sinusoidal",
    "scale_embeddings": True,
    "tie_embeddings": True,
    "max_seq_len": 512,
    "ffn": {"activation": "relu", "bias": True},
    "attention": {"bias": True},
}

# Llama-style decoder-only LM: pre-norm RMSNorm, RoPE, SwiGLU, no biases, untied by default.
_LM = {
    "arch": "decoder",
    "norm": "rmsnorm",
    "norm_position": "pre",
    "norm_eps": 1e-6,
    "position": "rope",
    "scale_embeddings": False,
    "tie_embeddings": False,
    "dropout": 0.0,
    "ffn": {"activation": "swiglu", "bias": False},
    "attention": {"bias": False},
}


def _with(base: dict[str, Any], **sizes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in sizes.items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    return out


PRESETS: dict[str, dict[str, Any]] = {
    "transformer-tiny": _with(
        _PAPER,
        d_model=32,
        n_layers=2,
        dropout=0.0,
        max_seq_len=64,
        attention={"n_heads": 4},
        ffn={"d_ff": 64},
    ),
    "transformer-small": _with(
        _PAPER,
        d_model=256,
        n_layers=3,
        dropout=0.1,
        max_seq_len=256,
        attention={"n_heads": 4},
        ffn={"d_ff": 1024},
    ),
    "transformer-base": _with(
        _PAPER, d_model=512, n_layers=6, dropout=0.1, attention={"n_heads": 8}, ffn={"d_ff": 2048}
    ),
    "transformer-big": _with(
        _PAPER, d_model=1024, n_layers=6, dropout=0.3, attention={"n_heads": 16}, ffn={"d_ff": 4096}
    ),
    "lm-tiny": _with(
        _LM,
        d_model=32,
        n_layers=2,
        max_seq_len=64,
        attention={"n_heads": 4, "n_kv_heads": 2},
        ffn={"d_ff": 64},
    ),
    "lm-tiny-mla": _with(  # DeepSeek-V2/V3 proportions: Dr = Dn / 2, C = 2 * Dn (V3: 4 * Dn)
        _LM,
        d_model=32,
        n_layers=2,
        max_seq_len=64,
        attention={
            "kind": "mla",
            "n_heads": 4,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
        },
        ffn={"d_ff": 64},
    ),
    "lm-small": _with(
        _LM,
        d_model=384,
        n_layers=6,
        max_seq_len=512,
        attention={"n_heads": 6, "n_kv_heads": 2},
        ffn={"d_ff": 1024},
    ),
    "lm-medium": _with(
        _LM,
        d_model=768,
        n_layers=12,
        max_seq_len=1024,
        attention={"n_heads": 12, "n_kv_heads": 4},
        ffn={"d_ff": 2048},
    ),
}


def preset_dict(name: str) -> dict[str, Any]:
    """A copy of preset ``name`` as a dict; KeyError names the known presets."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset(name: str, *, vocab_size: int, **overrides: Any) -> ModelConfig:
    """Build a validated config from a preset, e.g. ``preset("transformer-base", vocab_size=37000)``."""
    return model_config_from_dict({"preset": name, "vocab_size": vocab_size, **overrides})


def model_config_from_dict(data: dict[str, Any], prefix: str = "model") -> ModelConfig:
    """Build a :class:`ModelConfig`; a ``preset`` key starts from that named preset."""
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None:
        try:
            base = preset_dict(preset)
        except KeyError as err:
            raise ConfigError(f"{prefix}.preset", str(err.args[0])) from None
        own_attention = data.get("attention") or {}
        data = _merge(base, data)
        if own_attention.get("kind") == "mla":  # an MHA preset's K/V head count means nothing for MLA
            for key in ("n_kv_heads", "qkv_bias"):
                if key not in own_attention:
                    data["attention"].pop(key, None)
    return from_dict(ModelConfig, data, prefix)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
