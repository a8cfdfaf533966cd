"""Config dataclasses: validation with errors that name the key, TOML loading, presets."""

from __future__ import annotations

from pathlib import Path

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


# --------------------------------------------------------------------------------------------
# data.path: relative to the config file; --set values relative to the current directory
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
DATA_TOML = '[model]\npreset = "transformer-tiny"\nvocab_size = 10\n[data]\ncorpus = "tsv"\npath = "{}"\n'


def test_relative_data_path_resolves_against_the_config_file(tmp_path, monkeypatch):
    """From any working directory, a config's relative data.path names the file beside the config."""
    folder = tmp_path / "configs"
    folder.mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = folder / "run.toml"
    path.write_text(DATA_TOML.format("../data/pairs.tsv"), encoding="utf-8")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_config(path).data.path == str(tmp_path / "data" / "pairs.tsv")
    assert load_config(Path("..") / "configs" / "run.toml").data.path == str(tmp_path / "data" / "pairs.tsv")


def test_data_path_set_on_the_command_line_stays_relative_to_the_current_directory(tmp_path, monkeypatch):
    path = tmp_path / "run.toml"
    path.write_text(DATA_TOML.format("beside.tsv"), encoding="utf-8")
    monkeypatch.chdir(REPO)
    assert load_config(path, ['data.path="mine.tsv"']).data.path == "mine.tsv"
    assert load_config(path, ["data.path=sub/mine.tsv"]).data.path == "sub/mine.tsv"


def test_absolute_data_path_is_kept(tmp_path):
    target = tmp_path / "abs" / "pairs.tsv"
    path = tmp_path / "run.toml"
    path.write_text(DATA_TOML.format(target.as_posix()), encoding="utf-8")
    assert load_config(path).data.path == str(target)


SHIPPED = sorted((REPO / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_find_their_data_from_another_directory(path, tmp_path, monkeypatch):
    """Loaded from an unrelated working directory, each shipped config's data.path points where it
    did when run from the repository root: ../shared/data/... or the repository's runs/."""
    monkeypatch.chdir(tmp_path)
    data = load_config(path).data
    if data.path is None:
        return
    resolved = Path(data.path)
    assert resolved.is_absolute()
    shared = REPO.parent / "shared" / "data"
    assert resolved.is_relative_to(shared) or resolved.is_relative_to(REPO / "runs"), resolved
    if resolved.is_relative_to(shared) and shared.is_dir():
        assert resolved.is_file(), f"{path.name}: {resolved} is missing from {shared}"


@pytest.mark.parametrize("value", [-0.01, 1.5, float("nan")])
def test_max_rejected_fraction_is_checked(tmp_path, value):
    path = tmp_path / "run.toml"
    path.write_text(DATA_TOML.format("x.tsv") + f"max_rejected_fraction = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data\.max_rejected_fraction: must be in \[0, 1\]"):
        load_config(path)
