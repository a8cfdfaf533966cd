"""``moeformer convert``'s two directions, between a transformers directory and a moeformer checkpoint.

A converted moeformer checkpoint is an ordinary one (``model.safetensors`` + ``checkpoint.json``,
step 0, no trainer state): ``moeformer generate``, ``inspect`` and the refusal tools read it, and
it keeps the model's own tokenizer (``tokenizer.json``) when the source has one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch

from moeformer.config import config_to_dict
from moeformer.data.hub_tokenizer import HubTokenizer
from moeformer.interop.convert import export_hf, import_hf, read_hf_config
from moeformer.interop.hf_config import InteropError
from moeformer.train.checkpoint import SIDECAR, WEIGHTS, paths_overlap


@dataclass
class Converted:
    out: Path
    family: str  # the transformers model_type on the Hugging Face side
    tokenizer: bool  # whether a tokenizer came along
    parameters: int


def check_paths(source: str | Path, out: str | Path, force: bool) -> None:
    """Refuse to write into (or over) the source, or over an existing path without ``force``."""
    if paths_overlap(source, out):
        raise InteropError(f"output {out} overlaps the source {source}; the source is never modified")
    if Path(out).exists() and not force:
        raise InteropError(f"{out} exists; pass --force to replace it")


def hf_to_checkpoint(source: str | Path, out: str | Path, *, force: bool = False) -> Converted:
    """A transformers checkpoint directory -> a moeformer checkpoint directory."""
    check_paths(source, out, force)
    hf = read_hf_config(source)
    model = import_hf(source)
    tokenizer = HubTokenizer.from_directory(source) if (Path(source) / "tokenizer.json").exists() else None
    meta: dict = {
        "config": {"model": config_to_dict(model.config)},
        "step": 0,
        "converted_from": {"path": str(source), "model_type": hf["model_type"]},
    }
    if tokenizer is not None:
        meta["tokenizer"] = {"shared": True, "tokenizer": tokenizer.to_dict()}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.torch.save_model(model, str(tmp / WEIGHTS))
    (tmp / SIDECAR).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return Converted(out, hf["model_type"], tokenizer is not None, model.num_parameters())


def checkpoint_to_hf(source: str | Path, out: str | Path, *, which: str = "best", force: bool = False) -> Converted:
    """A moeformer checkpoint (or run directory) of a DecoderLM -> a transformers checkpoint directory."""
    from moeformer.inference import load_model

    check_paths(source, out, force)
    loaded = load_model(source, which=which)
    if loaded.model.config.arch != "decoder":
        raise InteropError(f"{source} holds a {loaded.model.config.arch} model; only decoder-only LMs export")
    tokenizer = loaded.tokenizers.target
    with_tokenizer = getattr(tokenizer, "backend", None) is not None
    family = export_hf(loaded.model, out, tokenizer=tokenizer if with_tokenizer else None, force=force)
    return Converted(Path(out), family, with_tokenizer, loaded.model.num_parameters())
