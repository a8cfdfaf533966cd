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
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value; ``key`` is its dotted path, e.g. ``model.attention.n_heads``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}", self.message)


def _check_field_types(obj: Any) -> None:
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


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value}")


def _probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(name, f"must be in [0, 1), got {value}")


@dataclass(kw_only=True)
class AttentionConfig:
    """Multi-head attention (paper section 3.2.2); ``n_kv_heads < n_heads`` is grouped-query attention."""

    n_heads: int = 8
    n_kv_heads: int | None = None  # None: one K/V head per query head (plain multi-head)
    bias: bool = True  # biases on q/k/v/out projections (paper: yes; Llama-style LMs: no)
    dropout: float = 0.0  # dropout on the attention weights
    backend: Literal["sdpa", "reference"] = "sdpa"  # torch's fused kernel or the readable math
    rope_theta: float = 10000.0  # RoPE base, used when the model's position is "rope"

    def __post_init__(self) -> None:
        _check_field_types(self)
        _positive("n_heads", self.n_heads)
        _positive("n_kv_heads", self.n_kv_heads)
        _probability("dropout", self.dropout)
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}"
            )
        if self.rope_theta <= 0:
            raise ConfigError("rope_theta", f"must be positive, got {self.rope_theta}")


@dataclass(kw_only=True)
class FeedForwardConfig:
    """Position-wise feed-forward sublayer (paper section 3.3): FFN(x) = act(x W1 + b1) W2 + b2."""

    activation: Literal["relu", "gelu", "swiglu"] = "relu"
    d_ff: int = 2048  # hidden size (for swiglu: of each of the gate and up projections)
    bias: bool = True

    def __post_init__(self) -> None:
        _check_field_types(self)
        _positive("d_ff", self.d_ff)


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

    def __post_init__(self) -> None:
        _check_field_types(self)
        for name in ("vocab_size", "src_vocab_size", "d_model", "n_layers", "max_seq_len"):
            _positive(name, getattr(self, name))
        if self.n_encoder_layers is not None and self.n_encoder_layers < 0:
            raise ConfigError("n_encoder_layers", f"must be >= 0, got {self.n_encoder_layers}")
        _probability("dropout", self.dropout)
        if self.norm_eps <= 0:
            raise ConfigError("norm_eps", f"must be positive, got {self.norm_eps}")
        if self.d_model % self.attention.n_heads:
            raise ConfigError(
                "d_model",
                f"must be divisible by attention.n_heads ({self.attention.n_heads}), "
                f"got {self.d_model}",
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(
                "position", f"'rope' needs an even head size (d_model / n_heads), got {self.head_dim}"
            )
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
                f"needs one vocabulary, but src_vocab_size={self.src_vocab_size} "
                f"!= vocab_size={self.vocab_size}",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention.n_heads

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
    """A whole run's configuration file; today the ``[model]`` table."""

    model: ModelConfig


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
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{prefix}.{key}")
        kwargs[key] = value
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}", "missing required key")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


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
        data = _merge(base, data)
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
    unknown = set(data) - {"model"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown table; allowed tables: model")
    if "model" not in data:
        raise ConfigError("model", "missing required table [model]")
    return Config(model=model_config_from_dict(data["model"]))


def load_config(path: str | Path) -> Config:
    """Read a TOML file; errors name the file and the key."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "no such config file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), f"not valid TOML: {err}") from None
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err.key}", err.message) from None


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
