"""Config validation machinery: typed fields, dotted-key errors, dicts to nested dataclasses."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from moeformer.config import AttentionConfig, MoEConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value; ``key`` is its dotted path, e.g. ``model.attention.n_heads``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}", self.message)


def check_field_types(obj: Any) -> None:
    """Check every field against its annotation (int, float, bool, str, Literal, Optional)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(f.name, f"expected {_describe(hints[f.name])}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value}")


def probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(name, f"must be in [0, 1), got {value}")


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
    elif moe.kind == "soft":
        if moe.top_k not in (defaults["top_k"], moe.n_experts):
            raise ConfigError(
                "top_k", f"kind 'soft' sends every token to all {moe.n_experts} experts and ignores it (got "
                f"{moe.top_k}); remove it, or use kind 'topk' for a sparse top-k layer",
            )  # fmt: skip
        for name in _SOFT_IGNORES:
            if getattr(moe, name) != defaults[name]:
                raise ConfigError(
                    name, f"kind 'soft' is a plain softmax gate over every expert and ignores it (got "
                    f"{getattr(moe, name)!r}); remove it, or use kind 'topk' or 'deepseek' for a router with it",
                )  # fmt: skip


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


def from_dict(cls: type[T], data: Any, prefix: str) -> T:
    """Build dataclass ``cls`` from a (TOML) mapping, recursing into nested dataclasses.

    Errors carry the dotted key under ``prefix``; unknown keys list the allowed ones.
    """
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{prefix}.{key}", f"unknown key; allowed keys: {allowed}")
        nested = _dataclass_in(hints[key])
        if nested is not None and value is not None:
            value = from_dict(nested, value, f"{prefix}.{key}")
        kwargs[key] = value
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}", "missing required key")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in ``hint`` (``X`` or ``X | None``), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
