"""The configuration file of a run: ``[model]``, ``[data]`` and ``[train]`` tables, loaded from TOML.

The public place to import the run file's names from. Every table is a typed dataclass that
validates itself when it is built, so a bad value fails before any tensor is allocated, with an
error that names the key and what is allowed. A ``preset`` key in ``[model]`` starts from a named
size in :mod:`moeformer.presets`.

Where each part lives: the model's tables in :mod:`moeformer.model_config` (a low floor: ``moe``
and ``models`` import it), ``[data]`` in :mod:`moeformer.data.config`, ``[train]`` in
:mod:`moeformer.train.config`, and the whole file (:class:`Config`, :func:`load_config`, ``--set``
overrides) in :mod:`moeformer.train.run_config`, beside the run that reads it. This module
re-exports them all, so it sits above ``train``; every name it ever exported is still importable
from here.
"""

from __future__ import annotations

from moeformer.data.config import DataConfig
from moeformer.model_config import (
    AttentionConfig,
    FeedForwardConfig,
    ModelConfig,
    MoEConfig,
    config_to_dict,
)
from moeformer.presets import model_config_from_dict
from moeformer.train.config import TrainConfig
from moeformer.train.run_config import Config, apply_overrides, config_from_dict, load_config
from moeformer.validation import ConfigError, from_dict

__all__ = [
    "AttentionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FeedForwardConfig",
    "MoEConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "from_dict",
    "load_config",
    "model_config_from_dict",
]
