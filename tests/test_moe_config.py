"""MoE options: every option a kind ignores is refused by name at config load; defaults are not "set";
the shipped configs, presets and the demo's model still load."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeformer.config import MoEConfig, load_config, model_config_from_dict
from moeformer.demo import MODEL
from moeformer.presets import PRESETS, preset
from moeformer.validation import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize(
    "option, value",
    [("noisy", True), ("score", "sigmoid"), ("n_group", 2), ("topk_group", 2), ("group_routing", "hierarchical"),
     ("bias_update_rate", 1e-3), ("top_k", 3)],
)  # fmt: skip
def test_soft_refuses_router_options_it_ignores(option, value):
    with pytest.raises(ConfigError, match=rf"^{option}: kind 'soft' .*ignores it.*remove it") as info:
        MoEConfig(kind="soft", n_experts=4, **{option: value})
    assert info.value.key == option


def test_a_toml_soft_layer_with_noisy_fails_at_load_naming_the_key(tmp_path):
    path = tmp_path / "soft.toml"
    path.write_text('[model]\nvocab_size = 10\n[model.moe]\nkind = "soft"\nn_experts = 4\nnoisy = true\n')
    with pytest.raises(ConfigError, match=r"model\.moe\.noisy: kind 'soft'"):
        load_config(path)


def test_defaults_and_what_soft_does_anyway_are_not_refused():
    """Options left at their defaults (top_k = 2 included) are not "set"; top_k = n_experts describes soft."""
    assert MoEConfig(kind="soft", n_experts=4).top_k == 2
    MoEConfig(kind="soft", n_experts=4, top_k=4, noisy=False, score="softmax", n_group=1, normalize=False)
    MoEConfig(kind="soft", n_experts=4, capacity_factor=1.5, balance_loss=0.01, z_loss=1e-3, routed_scaling=2.0)


def test_dense_refuses_every_moe_option_but_its_hidden_size():
    MoEConfig(kind="dense", expert_hidden=24)
    with pytest.raises(ConfigError, match=r"^n_experts: kind 'dense' builds plain FFN layers and ignores it"):
        MoEConfig(kind="dense", n_experts=4)
    with pytest.raises(ConfigError, match=r"^balance_loss: kind 'dense'"):
        MoEConfig(kind="dense", balance_loss=0.01)


def test_sparse_kinds_keep_their_router_options():
    MoEConfig(kind="topk", n_experts=4, top_k=1, noisy=True, score="sigmoid", n_group=2, topk_group=1)
    MoEConfig(kind="deepseek", n_experts=8, top_k=2, n_shared=1, score="sigmoid", n_group=2, bias_update_rate=1e-3)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    load_config(path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_and_the_demo_model_load(name):
    preset(name, vocab_size=100)
    model_config_from_dict({**MODEL, "vocab_size": 100})
