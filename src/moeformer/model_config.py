"""The model's configuration: attention, feed-forward, MoE and the model that holds them.

One typed dataclass per component, nested like the modules. Every dataclass validates itself when
it is built, so a bad value fails before any tensor is allocated, with an error that names the key
and what is allowed::

    >>> ModelConfig(vocab_size=100, d_model=30, attention=AttentionConfig(n_heads=8))
    ConfigError: model.d_model: must be divisible by attention.n_heads (8), got 30

The rules that belong to one kind of component live here beside it (multi-head latent attention's
fields, how an MoE layer's counts fit together); :mod:`moeformer.validation` keeps the generic checks.
This module sits on a low floor (below ``moe`` and ``models``): it imports only ``validation`` and
``layers.position``. Building one from a TOML table (with a ``preset``) is
:func:`moeformer.presets.model_config_from_dict`; the whole run file is :mod:`moeformer.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from moeformer.layers.position import RopeScaling
from moeformer.validation import ConfigError, check_field_types, positive, probability

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "FeedForwardConfig",
    "MTPConfig",
    "MoEConfig",
    "ModelConfig",
    "check_latent_fields",
    "check_moe_structure",
    "config_to_dict",
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

    kind: Literal["dense", "soft", "topk", "deepseek", "expert_choice"] = "topk"
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
    # (expert_choice: each expert takes capacity_factor * tokens / n_experts tokens; None: top_k)
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
class MTPConfig:
    """DeepSeek-V3's multi-token prediction (report section 2.2): ``depth`` sequential modules after
    the main model, module k predicting token t+k+1; ``weight`` is lambda in
    L = L_main + lambda * mean_k L_MTP^k. The report uses 0.3 for the first 10T of 14.8T tokens,
    then 0.1: ``late_weight = 0.1`` from ``late_from = 0.676`` of the training steps."""

    depth: int = 1
    weight: float = 0.3
    late_weight: float | None = None  # None: ``weight`` throughout
    late_from: float = 0.676  # fraction of train.steps after which ``late_weight`` applies

    def __post_init__(self) -> None:
        check_field_types(self)
        positive("depth", self.depth)
        for name in ("weight", "late_weight"):
            if (getattr(self, name) or 0.0) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.late_from <= 1.0:
            raise ConfigError("late_from", f"must be a fraction of the steps in [0, 1], got {self.late_from}")

    def weight_at(self, step: int, total_steps: int) -> float:
        """lambda for update ``step`` (0-based) of ``total_steps``."""
        late = self.late_weight is not None and step >= self.late_from * total_steps
        return self.late_weight if late else self.weight  # type: ignore[return-value]


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
    mtp: MTPConfig | None = None  # decoder-only: multi-token prediction modules (DeepSeek-V3)

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
            if self.moe is not None and self.moe.kind == "expert_choice":
                raise ConfigError(
                    "moe.kind", "'expert_choice' lets each expert pick tokens across the whole batch, so a causal "
                    "decoder would see later tokens; it is allowed in a seq2seq model's encoder only",
                )  # fmt: skip
        elif self.mtp is not None:
            raise ConfigError("mtp", "multi-token prediction is for decoder-only models (arch 'decoder')")
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


_LATENT_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def check_latent_fields(attention: AttentionConfig) -> None:
    """Multi-head latent attention's fields: required (q_lora_rank optional) with kind 'mla', refused
    otherwise; fields of multi-head attention that mean nothing to MLA are refused too."""
    mla = attention.kind == "mla"
    for name in _LATENT_FIELDS:
        value = getattr(attention, name)
        positive(name, value)
        if value is not None and not mla:
            raise ConfigError(
                name, "belongs to kind 'mla' (multi-head latent attention); set kind = \"mla\" or remove it"
            )
        if value is None and mla and name != "q_lora_rank":
            raise ConfigError(
                name,
                "required with kind 'mla' (DeepSeek-V2/V3: kv_lora_rank 512, qk_nope_head_dim 128, "
                "qk_rope_head_dim 64, v_head_dim 128)",
            )
    if not mla:
        return
    if attention.qk_rope_head_dim is not None and attention.qk_rope_head_dim % 2:
        raise ConfigError("qk_rope_head_dim", f"RoPE rotates pairs: must be even, got {attention.qk_rope_head_dim}")
    for name in ("head_dim", "qk_norm"):
        if getattr(attention, name):
            raise ConfigError(name, "belongs to kind 'mha'; MLA's head sizes are qk_nope/qk_rope/v_head_dim")
    if attention.n_kv_heads is not None:
        raise ConfigError(
            "n_kv_heads",
            "means nothing with kind 'mla': every head's keys and values come from one "
            "shared latent (kv_lora_rank); remove it",
        )
    if attention.qkv_bias is not None:
        raise ConfigError(
            "qkv_bias",
            "kind 'mla' has no q/k/v projections; `bias` sets the biases of q_a_proj, "
            "kv_a_proj_with_mqa and out_proj (DeepSeek's attention_bias)",
        )


# Options a kind never reads; setting one to anything but its default is refused by name (a soft
# layer that is "noisy" in its config but not in its router would mislead every report of it).
# Soft keeps `normalize` out of the list: with every expert chosen the weights sum to 1 either way.
_SOFT_IGNORES = ("score", "noisy", "n_group", "topk_group", "group_routing", "bias_update_rate")
_DENSE_USES = ("kind", "expert_hidden")  # the plain FFN of hidden size expert_hidden
# expert choice: a softmax affinity, experts take tokens, balanced by construction. Balance-loss
# coefficients stay allowed: a seq2seq decoder's layers route by token choice and use them.
_EXPERT_CHOICE_IGNORES = ("score", "noisy", "n_group", "topk_group", "group_routing", "bias_update_rate")


def check_kind_options(moe: MoEConfig) -> None:
    """Refuse a non-default option that ``moe.kind`` ignores, naming the option, the kind and the way out."""
    defaults = {f.name: f.default for f in dataclasses.fields(moe)}
    if moe.kind == "dense":
        for name, default in defaults.items():
            if name not in _DENSE_USES and getattr(moe, name) != default:
                raise ConfigError(
                    name, f"kind 'dense' builds plain FFN layers and ignores it (got {getattr(moe, name)!r}); "
                    "remove it, or choose kind 'soft', 'topk' or 'deepseek'",
                )  # fmt: skip
    elif moe.kind == "expert_choice":
        _refuse_set(moe, defaults, _EXPERT_CHOICE_IGNORES, "kind 'expert_choice' (experts pick tokens, balanced by "
                    "construction) ignores it", "use kind 'topk' or 'deepseek'")  # fmt: skip
    elif moe.kind == "soft":
        if moe.top_k not in (defaults["top_k"], moe.n_experts):
            raise ConfigError(
                "top_k", f"kind 'soft' sends every token to all {moe.n_experts} experts and ignores it (got "
                f"{moe.top_k}); remove it, or use kind 'topk' for a sparse top-k layer",
            )  # fmt: skip
        _refuse_set(moe, defaults, _SOFT_IGNORES, "kind 'soft' is a plain softmax gate over every expert and "
                    "ignores it", "use kind 'topk' or 'deepseek' for a router with it")  # fmt: skip


def _refuse_set(moe: MoEConfig, defaults: dict[str, object], names: tuple[str, ...], why: str, way_out: str) -> None:
    """ConfigError for the first of ``names`` set to anything but its default."""
    for name in names:
        if getattr(moe, name) != defaults[name]:
            raise ConfigError(name, f"{why} (got {getattr(moe, name)!r}); remove it, or {way_out}")


def check_moe_structure(moe: MoEConfig) -> None:
    """How an MoE layer's counts fit together: no option its kind ignores, top-k within the experts (and
    chosen groups), groups and devices dividing the experts, shared-expert options only with shared
    experts of kind 'deepseek'."""
    check_kind_options(moe)
    if moe.kind != "soft" and moe.top_k > moe.n_experts:  # soft uses every expert
        raise ConfigError("top_k", f"must be <= n_experts ({moe.n_experts}), got {moe.top_k}")
    if moe.topk_group > moe.n_group:
        raise ConfigError("topk_group", f"must be <= n_group ({moe.n_group}), got {moe.topk_group}")
    if moe.n_experts % moe.n_group:
        raise ConfigError(
            "n_group", f"must divide n_experts ({moe.n_experts}) into equal groups, got {moe.n_group}"
        )
    if moe.n_experts % moe.n_devices:
        raise ConfigError("n_devices", f"must divide n_experts ({moe.n_experts}), got {moe.n_devices}")
    if (
        moe.n_group > 1
        and moe.group_routing == "limited"
        and moe.top_k > moe.topk_group * moe.n_experts // moe.n_group
    ):
        raise ConfigError(
            "top_k",
            f"{moe.top_k} experts cannot fit in topk_group={moe.topk_group} groups "
            f"of {moe.n_experts // moe.n_group}",
        )
    if moe.group_routing == "hierarchical" and moe.n_group > 1 and moe.top_k % moe.topk_group:
        raise ConfigError(
            "top_k",
            f"hierarchical routing takes top_k / topk_group experts per chosen group; "
            f"top_k={moe.top_k} is not divisible by topk_group={moe.topk_group}",
        )
    positive("shared_hidden", moe.shared_hidden)
    if (moe.shared_hidden is not None or moe.shared_gate) and not moe.n_shared:
        raise ConfigError("shared_gate" if moe.shared_gate else "shared_hidden", "needs n_shared >= 1")
    if moe.n_shared and moe.kind != "deepseek":
        raise ConfigError("n_shared", f"shared experts belong to kind 'deepseek', not {moe.kind!r}")
    if moe.granularity > 1 and moe.kind != "deepseek":
        raise ConfigError("granularity", f"fine-grained segmentation belongs to kind 'deepseek', not {moe.kind!r}")
    if moe.expert_hidden is not None and moe.expert_hidden % moe.granularity:
        raise ConfigError(
            "granularity", f"must divide expert_hidden ({moe.expert_hidden}), got {moe.granularity}"
        )


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
