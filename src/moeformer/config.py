"""Configuration: one typed dataclass per component, nested like the modules, loaded from TOML.

Every dataclass validates itself when it is built (from Python or from a file), so a bad value
fails before any tensor is allocated, with an error that names the key and what is allowed::

    >>> ModelConfig(vocab_size=100, d_model=30, attention=AttentionConfig(n_heads=8))
    ConfigError: model.d_model: must be divisible by attention.n_heads (8), got 30

Unknown keys are rejected (``kw_only`` dataclasses from Python, :func:`from_dict` from TOML).
A ``preset`` key in ``[model]`` starts from a named size in :mod:`moeformer.presets`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from moeformer.data.config import DataConfig
from moeformer.layers.position import RopeScaling
from moeformer.train.config import TrainConfig
from moeformer.validation import (
    ConfigError,
    check_field_types,
    check_latent_fields,
    check_moe_structure,
    from_dict,
    positive,
    probability,
)

__all__ = [
    "AttentionConfig",
    "Config",
    "ConfigError",
    "FeedForwardConfig",
    "MoEConfig",
    "ModelConfig",
    "config_from_dict",
    "config_to_dict",
    "from_dict",
    "load_config",
    "model_config_from_dict",
]


@dataclass(kw_only=True)
class AttentionConfig:
    """Multi-head attention (paper section 3.2.2); ``n_kv_heads < n_heads`` is grouped-query attention.

    ``kind = "mla"`` is DeepSeek-V2/V3 multi-head latent attention (:mod:`moeformer.layers.mla`):
    decoder-only with RoPE, its head sizes set by the fields below (DeepSeek-V2/V3: q_lora_rank
    1536, kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128).
    """

    kind: Literal["mha", "mla"] = "mha"
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: one K/V head per query head (plain multi-head)
    bias: bool = True  # biases on q/k/v/out projections (paper: yes; Llama-style LMs: no)
    qkv_bias: bool | None = None  # q/k/v biases alone; None: same as bias (Qwen2: True with bias=False)
    head_dim: int | None = None  # per-head width; None: d_model / n_heads (Qwen3 sets its own)
    qk_norm: bool = False  # RMSNorm on each head's query and key before RoPE (Qwen3)
    dropout: float = 0.0  # dropout on the attention weights
    backend: Literal["sdpa", "reference"] = "sdpa"  # torch's fused kernel or the readable math
    rope_theta: float = 10000.0  # RoPE base, used when the model's position is "rope"
    rope_scaling: RopeScaling | None = None  # Llama 3.1's long-context frequency scaling
    # kind "mla" only; all but q_lora_rank required there. C + Dr numbers per token are cached.
    q_lora_rank: int | None = None  # query latent width; None: one full q_proj (V2-Lite)
    kv_lora_rank: int | None = None  # C: the key/value latent width
    qk_nope_head_dim: int | None = None  # Dn: per-head query/key width without RoPE
    qk_rope_head_dim: int | None = None  # Dr: RoPE part of each query and of the one shared key (even)
    v_head_dim: int | None = None  # Dv: per-head value width

    def __post_init__(self) -> None:
        check_field_types(self)
        check_latent_fields(self)
        positive("n_heads", self.n_heads)
        positive("n_kv_heads", self.n_kv_heads)
        positive("head_dim", self.head_dim)
        probability("dropout", self.dropout)
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.rope_theta <= 0:
            raise ConfigError("rope_theta", f"must be positive, got {self.rope_theta}")


@dataclass(kw_only=True)
class FeedForwardConfig:
    """Position-wise feed-forward sublayer (paper section 3.3): FFN(x) = act(x W1 + b1) W2 + b2."""

    activation: Literal["relu", "gelu", "swiglu"] = "relu"
    d_ff: int = 2048  # hidden size (for swiglu: of each of the gate and up projections)
    bias: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        positive("d_ff", self.d_ff)


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture-of-Experts FFN layers (see :mod:`moeformer.moe` for the papers behind each option).

    Counts are the routed ones: ``n_experts`` experts of ``expert_hidden`` each, ``top_k`` per
    token, plus ``n_shared`` always-active experts of the same size. ``granularity`` m splits
    each expert m ways: m * n_experts experts of expert_hidden / m, m * top_k per token (and
    shared experts of expert_hidden / m). For DeepSeekMoE's equal-compute accounting, where the
    K_s shared experts take K_s of the m*K slots, use :func:`moeformer.moe.segment_experts`.
    """

    kind: Literal["dense", "soft", "topk", "deepseek"] = "topk"
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None  # None: the model's ffn.d_ff
    granularity: int = 1  # DeepSeekMoE fine-grained segmentation factor m
    n_shared: int = 0  # DeepSeekMoE shared experts (deepseek kind only)
    shared_hidden: int | None = None  # hidden size of all shared experts together; None: n_shared * expert's
    shared_gate: bool = False  # Qwen2-MoE: the shared output is scaled by sigmoid(x . w), w: (D,)
    score: Literal["softmax", "sigmoid"] = "softmax"  # router affinity; DeepSeek-V3: sigmoid
    normalize: bool = True  # renormalise the k selected weights to sum 1 (Mixtral, GShard, V3)
    noisy: bool = False  # Shazeer et al. 2017 noisy top-k gating (trainable noise scale)
    n_group: int = 1  # expert groups for group-limited (V3) or hierarchical (Shazeer) routing
    topk_group: int = 1  # groups each token may use
    group_routing: Literal["limited", "hierarchical"] = "limited"
    routed_scaling: float = 1.0  # multiplies the routed weights (DeepSeek-V3: 2.5)
    capacity_factor: float | None = None  # None: dropless; else GShard/Switch capacity with dropping
    balance_loss: float = 0.0  # Switch/GShard aux loss = DeepSeekMoE expert-level balance (alpha)
    device_loss: float = 0.0  # DeepSeekMoE device-level balance loss
    n_devices: int = 1  # expert groups treated as devices by device_loss
    seq_balance_loss: float = 0.0  # DeepSeek-V3 sequence-wise balance loss
    z_loss: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # DeepSeek-V3 auxiliary-loss-free balancing gamma; 0: off
    placement: Literal["all", "every_other"] = "all"  # every_other: MoE on layers 1, 3, 5, ...
    first_dense: int = 0  # keep the first k layers dense (DeepSeek-V3: 3)
    backend: Literal["auto", "grouped_mm", "loop", "bmm"] = "auto"  # expert dispatch kernel

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("n_experts", "top_k", "expert_hidden", "granularity", "n_group", "topk_group", "n_devices"):
            positive(name, getattr(self, name))
        for name in ("n_shared", "first_dense"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("balance_loss", "device_loss", "seq_balance_loss", "z_loss", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"coefficients must be >= 0, got {getattr(self, name)}")
        if self.routed_scaling <= 0:
            raise ConfigError("routed_scaling", f"must be positive, got {self.routed_scaling}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError("capacity_factor", f"must be > 0 (or absent for dropless), got {self.capacity_factor}")
        check_moe_structure(self)

    def expert_width(self, d_ff: int) -> int:
        """Hidden size of one routed expert: ``expert_hidden`` (else the model's d_ff) / granularity."""
        return (self.expert_hidden if self.expert_hidden is not None else d_ff) // self.granularity

    @property
    def routed_experts(self) -> int:
        return self.n_experts * self.granularity

    @property
    def routed_top_k(self) -> int:
        return self.top_k * self.granularity

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` of a stack holds an MoE (else a dense FFN)."""
        if self.kind == "dense" or layer_index < self.first_dense:
            return False
        return self.placement == "all" or layer_index % 2 == 1


@dataclass(kw_only=True)
class ModelConfig:
    """One config for both model families: ``arch = "seq2seq"`` or ``"decoder"``.

    Defaults are the paper's base Transformer; :mod:`moeformer.presets` holds the decoder-only
    defaults (pre-norm, RMSNorm, RoPE, SwiGLU, no biases).
    """

    arch: Literal["seq2seq", "decoder"] = "seq2seq"
    vocab_size: int  # target vocabulary (the only one for a decoder-only model)
    src_vocab_size: int | None = None  # seq2seq source vocabulary; None: same as vocab_size
    d_model: int = 512
    n_layers: int = 6  # decoder layers (the whole stack of a decoder-only model)
    n_encoder_layers: int | None = None  # seq2seq only; None: same as n_layers
    dropout: float = 0.1  # on embeddings + positions and on every sublayer output (paper 5.4)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["post", "pre"] = "post"  # paper: post; modern LMs: pre
    norm_eps: float = 1e-5
    position: Literal["sinusoidal", "learned", "rope", "none"] = "sinusoidal"
    max_seq_len: int = 512  # longest sequence (prompt + generated) the model accepts
    pad_id: int = 0  # token id that marks padding; its positions are masked as keys
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (paper 3.4)
    tie_embeddings: bool = True  # output projection shares the target embedding matrix
    share_embeddings: bool = False  # seq2seq: source and target share one embedding matrix
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FeedForwardConfig = field(default_factory=FeedForwardConfig)
    moe: MoEConfig | None = None  # None: every FFN is dense

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.moe is not None and self.moe.expert_hidden is None and self.ffn.d_ff % self.moe.granularity:
            raise ConfigError("moe.granularity", f"must divide ffn.d_ff ({self.ffn.d_ff}), got {self.moe.granularity}")
        for name in ("vocab_size", "src_vocab_size", "d_model", "n_layers", "max_seq_len"):
            positive(name, getattr(self, name))
        if self.n_encoder_layers is not None and self.n_encoder_layers < 0:
            raise ConfigError("n_encoder_layers", f"must be >= 0, got {self.n_encoder_layers}")
        probability("dropout", self.dropout)
        if self.norm_eps <= 0:
            raise ConfigError("norm_eps", f"must be positive, got {self.norm_eps}")
        if self.attention.kind == "mla" and (self.arch != "decoder" or self.position != "rope"):
            raise ConfigError(
                "attention.kind",
                f"'mla' needs arch 'decoder' and position 'rope', got {self.arch!r} and {self.position!r}",
            )
        if self.d_model % self.attention.n_heads and self.attention.kind == "mha" and not self.attention.head_dim:
            raise ConfigError(
                "d_model",
                f"must be divisible by attention.n_heads ({self.attention.n_heads}), got {self.d_model}",
            )
        if self.attention.rope_scaling is not None and self.position != "rope":
            raise ConfigError("attention.rope_scaling", f"scales RoPE, but position is {self.position!r}")
        if self.position == "rope" and self.rotary_dim % 2:
            raise ConfigError("position", f"'rope' needs an even head size (d_model / n_heads), got {self.head_dim}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError("pad_id", f"must be in [0, vocab_size={self.vocab_size}), got {self.pad_id}")
        if self.arch == "seq2seq" and self.position == "rope":
            raise ConfigError("position", "'rope' is for decoder-only models; seq2seq allows 'sinusoidal', 'learned'")
        if self.arch == "decoder":
            if self.n_encoder_layers:
                raise ConfigError("n_encoder_layers", "a decoder-only model has no encoder; remove it")
            if self.src_vocab_size is not None:
                raise ConfigError("src_vocab_size", "a decoder-only model has one vocabulary; remove it")
            if self.share_embeddings:
                raise ConfigError("share_embeddings", "only a seq2seq model has two embeddings to share")
        if self.share_embeddings and self.source_vocab_size != self.vocab_size:
            raise ConfigError(
                "share_embeddings",
                f"needs one vocabulary, but src_vocab_size={self.src_vocab_size} != vocab_size={self.vocab_size}",
            )

    @property
    def head_dim(self) -> int:
        """attention.head_dim, else d_model / n_heads: the head size of kind 'mha' (MLA's are its own fields)."""
        return self.attention.head_dim or self.d_model // self.attention.n_heads

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each query/key RoPE rotates: the head size, or MLA's Dr."""
        a = self.attention
        return a.qk_rope_head_dim if a.kind == "mla" and a.qk_rope_head_dim else self.head_dim

    @property
    def source_vocab_size(self) -> int:
        return self.vocab_size if self.src_vocab_size is None else self.src_vocab_size

    @property
    def encoder_layers(self) -> int:
        if self.arch == "decoder":
            return 0
        return self.n_layers if self.n_encoder_layers is None else self.n_encoder_layers


@dataclass(kw_only=True)
class Config:
    """A whole run's configuration file: ``[model]``, ``[data]`` and ``[train]`` tables."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def model_config_from_dict(data: dict[str, Any], prefix: str = "model") -> ModelConfig:
    """Build a :class:`ModelConfig`; a ``preset`` key starts from that named preset."""
    from moeformer.presets import preset_dict

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


def config_from_dict(data: dict[str, Any]) -> Config:
    unknown = set(data) - {"model", "data", "train"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown table; allowed tables: model, data, train")
    if "model" not in data:
        raise ConfigError("model", "missing required table [model]")
    return Config(
        model=model_config_from_dict(data["model"]),
        data=from_dict(DataConfig, data.get("data", {}), "data"),
        train=from_dict(TrainConfig, data.get("train", {}), "train"),
    )


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["model.moe.top_k=2", 'data.path="x.tsv"']`` set into a copy of a TOML table; values parse as
    TOML, falling back to a plain string."""
    table = json.loads(json.dumps(table))  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, "an override is KEY=VALUE, e.g. model.moe.top_k=2")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = table
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"{part} is a value, not a table")
        node[parts[-1]] = value
    return table


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML file, apply ``KEY=VALUE`` overrides; errors name the file and the key.

    A relative ``data.path`` in the file is read from the file's own directory (symlinks
    followed), so a config finds its data from wherever it is run; the resolved path is
    absolute. One given as an override (``--set data.path=...``) stays relative to the current
    directory, as a path typed on a command line is.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "no such config file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), f"not valid TOML: {err}") from None
    _resolve_data_path(data, path.resolve().parent)
    try:
        return config_from_dict(apply_overrides(data, overrides or []))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err.key}", err.message) from None


def _resolve_data_path(table: dict[str, Any], base: Path) -> None:
    """Make a relative ``data.path`` of ``table`` absolute against ``base`` (in place)."""
    data = table.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("path"), str) or not data["path"]:
        return  # absent or of the wrong type: DataConfig's own validation names the problem
    if not Path(data["path"]).is_absolute():
        # normpath drops the "configs/.." detour, so errors and run.json show a readable path
        data["path"] = os.path.normpath(base / data["path"])


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (for JSON sidecars and TOML round trips); ``None`` fields are dropped."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        if value is None:
            continue
        out[key] = _drop_none(value)
    return out


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value
