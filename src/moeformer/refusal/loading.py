"""One entry point for any model the refusal commands take: a Hugging Face directory
(config.json + safetensors + tokenizer) or a moeformer checkpoint / run directory."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from moeformer.checkpoint_io import SIDECAR, paths_overlap, read_checkpoint
from moeformer.refusal.lm import ChatLM, RefusalError


def load_chat_lm(
    path: str | Path, *, template: str | None = None, dtype: str = "float32", device: str = "cpu"
) -> ChatLM:
    """The model at ``path`` as a ChatLM; the template is checked before any weight is read."""
    path = Path(path)
    if not path.exists():
        raise RefusalError(f"{path}: no such model directory")
    if (path / "config.json").is_file():
        from moeformer.refusal.hf import load_hf

        return load_hf(path, template=template, dtype=dtype, device=device)
    if (path / SIDECAR).is_file() or (path / "latest").is_file() or (path / "best").is_file():
        from moeformer.refusal.native import load_native

        if dtype != "float32":
            raise RefusalError("moeformer checkpoints are evaluated in float32 here; drop --dtype")
        return load_native(path, template=template, device=device)
    raise RefusalError(
        f"{path}: neither a Hugging Face model directory (config.json) nor a moeformer checkpoint "
        f"({SIDECAR}) or run directory"
    )


def check_hidden_size(path: str | Path, direction: Tensor) -> None:
    """Compare a direction with the hidden size in the model's config, before any weight is read."""
    path = Path(path)
    size = None
    try:
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            size = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
        else:
            size = read_checkpoint(path).meta["config"]["model"].get("d_model")
    except (OSError, ValueError, KeyError, AttributeError):
        return  # the loader reports unreadable configs with the full context
    if size is not None and tuple(direction.shape) != (size,):
        raise RefusalError(
            f"the direction has shape {tuple(direction.shape)}; {path} has hidden size {size}, "
            f"so it must be a vector of shape ({size},)"
        )


def check_output_path(source: str | Path, out: str | Path) -> None:
    """Refuse to write an edited model into (or over) its own source directory."""
    if paths_overlap(source, out):
        raise RefusalError(f"--out {out} overlaps the source model {source}; the source is never modified")
