"""The configuration file of a run: ``[model]``, ``[data]`` and ``[train]`` tables, loaded from TOML.

Every table is a typed dataclass that validates itself when it is built (from Python or from a
file), so a bad value fails before any tensor is allocated, with an error that names the key and
what is allowed. Unknown keys are rejected (``kw_only`` dataclasses from Python, :func:`from_dict`
from TOML). A ``preset`` key in ``[model]`` starts from a named size in :mod:`moeformer.presets`.

Where each table lives: the model's in :mod:`moeformer.model_config` (a low floor: ``moe`` and
``models`` import it), ``[data]`` in :mod:`moeformer.data.config`, ``[train]`` in
:mod:`moeformer.train.config`. This module puts them together; it lives in ``train`` because every
part it needs is on or below that floor, so the training run (:mod:`moeformer.train.run`, the
data pipeline) reads it without going up. :mod:`moeformer.config` re-exports every name, the
public place to import them from.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from moeformer.data.config import DataConfig
from moeformer.model_config import ModelConfig
from moeformer.presets import model_config_from_dict
from moeformer.train.config import TrainConfig
from moeformer.validation import ConfigError, from_dict

__all__ = ["Config", "apply_overrides", "config_from_dict", "load_config"]


@dataclass(kw_only=True)
class Config:
    """A whole run's configuration file: ``[model]``, ``[data]`` and ``[train]`` tables."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


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
