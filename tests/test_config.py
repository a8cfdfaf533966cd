"""Config dataclasses: validation with errors that name the key, TOML loading, presets."""

from __future__ import annotations

import pytest

from moeformer import AttentionConfig, ConfigError, FeedForwardConfig, ModelConfig, load_config, preset
from moeformer.config import config_from_dict, config_to_dict, model_config_from_dict
from moeformer.presets import PRESETS


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_paper_base_model():
    """ModelConfig's defaults are the base Transformer of the paper (Table 3)."""
    c = ModelConfig(vocab_size=100)
    assert (c.d_model, c.attention.n_heads, c.n_layers, c.encoder_layers, c.ffn.d_ff, c.dropout) == (
        512,
        8,
        6,
        6,
        2048,
        0.1,
    )
    assert (c.norm, c.norm_position, c.position, c.ffn.activation) == ("layernorm", "post", "sinusoidal", "relu")


def test_base_preset_equals_paper():
    c = preset("transformer-base", vocab_size=37000)
    assert (c.d_model, c.attention.n_heads, c.n_layers, c.encoder_layers, c.ffn.d_ff, c.dropout) == (
        512,
        8,
        6,
        6,
        2048,
        0.1,
    )
    assert c.norm_position == "post" and c.tie_embeddings


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    c = preset(name, vocab_size=64)
    assert c.d_model % c.attention.n_heads == 0


def test_lm_preset_is_modern_decoder():
    c = preset("lm-tiny", vocab_size=64)
    assert (c.arch, c.norm, c.norm_position, c.position, c.ffn.activation) == (
        "decoder",
        "rmsnorm",
        "pre",
        "rope",
        "swiglu",
    )
    assert c.attention.n_kv_heads == 2


@pytest.mark.parametrize(
    ("kwargs", "key", "words"),
    [
        ({"d_model": -4}, "d_model", "positive"),
        ({"d_model": 30}, "d_model", "divisible"),
        ({"n_layers": 0}, "n_layers", "positive"),
        ({"dropout": 1.5}, "dropout", r"\[0, 1\)"),
        ({"norm": "batchnorm"}, "norm", "'layernorm', 'rmsnorm'"),
        ({"position": "alibi"}, "position", "'sinusoidal'"),
        ({"pad_id": 200}, "pad_id", "vocab_size"),
        ({"d_model": 64.0}, "d_model", "expected int"),
        ({"tie_embeddings": 1}, "tie_embeddings", "expected bool"),
        ({"position": "rope"}, "position", "decoder-only"),
        ({"src_vocab_size": 50, "share_embeddings": True}, "share_embeddings", "one vocabulary"),
    ],
)
def test_invalid_values_name_their_key(kwargs, key, words):
    """Every invalid value raises ConfigError whose message starts with the key and says why."""
    with pytest.raises(ConfigError, match=words) as info:
        ModelConfig(vocab_size=100, **kwargs)
    assert info.value.key == key


def test_nested_errors_carry_the_dotted_key():
    with pytest.raises(ConfigError) as info:
        model_config_from_dict({"vocab_size": 10, "attention": {"n_heads": 3, "n_kv_heads": 2}})
    assert info.value.key == "model.attention.n_kv_heads"
    with pytest.raises(ConfigError, match="'relu', 'gelu', 'swiglu'") as info:
        model_config_from_dict({"vocab_size": 10, "ffn": {"activation": "tanh"}})
    assert info.value.key == "model.ffn.activation"


def test_unknown_keys_are_rejected_with_the_allowed_list():
    with pytest.raises(ConfigError, match="unknown key; allowed keys: .*d_model") as info:
        model_config_from_dict({"vocab_size": 10, "dmodel": 64})
    assert info.value.key == "model.dmodel"
    with pytest.raises(TypeError):
        ModelConfig(vocab_size=10, dmodel=64)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="unknown key") as info:
        model_config_from_dict({"vocab_size": 10, "attention": {"heads": 4}})
    assert info.value.key == "model.attention.heads"


def test_decoder_only_rejects_encoder_settings():
    with pytest.raises(ConfigError, match="no encoder"):
        ModelConfig(arch="decoder", vocab_size=10, n_encoder_layers=2)
    with pytest.raises(ConfigError, match="share"):
        ModelConfig(arch="decoder", vocab_size=10, share_embeddings=True)


def test_missing_vocab_size_is_named():
    with pytest.raises(ConfigError, match="missing required key") as info:
        model_config_from_dict({"d_model": 64})
    assert info.value.key == "model.vocab_size"


def test_toml_with_preset_and_overrides(tmp_path):
    path = write(
        tmp_path,
        """
[model]
preset = "transformer-tiny"
vocab_size = 321
n_layers = 3
[model.attention]
n_heads = 2
""",
    )
    c = load_config(path).model
    assert (c.vocab_size, c.n_layers, c.attention.n_heads, c.d_model) == (321, 3, 2, 32)
    assert c.ffn.d_ff == 64  # untouched preset value survives a partial [model.attention] override


def test_toml_errors_name_file_and_key(tmp_path):
    path = write(tmp_path, "[model]\nvocab_size = 10\nd_model = -1\n")
    with pytest.raises(ConfigError, match=r"run.toml: model.d_model: must be a positive integer"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known presets"):
        load_config(write(tmp_path, '[model]\npreset = "nope"\nvocab_size = 10\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="unknown table"):
        config_from_dict({"model": {"vocab_size": 3}, "trian": {}})


def test_round_trip_through_dict():
    c = ModelConfig(
        vocab_size=99, d_model=64, attention=AttentionConfig(n_heads=4, n_kv_heads=2), ffn=FeedForwardConfig(d_ff=128)
    )
    again = model_config_from_dict(config_to_dict(c))
    assert again == c


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/*.toml")))
def test_shipped_configs_load(path):
    """Every config in configs/ is valid."""
    load_config(path)
