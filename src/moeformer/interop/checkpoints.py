"""``moeformer convert``'s two directions, between a transformers directory and a moeformer checkpoint.

A converted moeformer checkpoint is an ordinary one (``model.safetensors`` + ``checkpoint.json``,
step 0, no trainer state): ``moeformer generate``, ``inspect`` and the refusal tools read it, and
it keeps the model's own tokenizer (``tokenizer.json``) when the source has one, or the one given
with ``tokenizer=``. Without either it is a weights-only checkpoint: it loads and converts back,
and the commands that need text take ``--tokenizer``.

Every check (overlap, an existing output, the tokenizer) runs before the model is read, and the
output is built in a temporary sibling published only when complete (:mod:`moeformer.publish`).

:func:`load_model` opens either kind of directory (re-exported by :mod:`moeformer.inference`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch

from moeformer.checkpoint_io import (
    SIDECAR,
    WEIGHTS,
    Checkpoint,
    LoadedModel,
    check_vocabulary,
    load_checkpoint,
    paths_overlap,
    read_tokenizer,
)
from moeformer.data.tokenizer import TokenizerPair
from moeformer.interop.convert import export_hf, import_hf, read_hf_config
from moeformer.interop.hf_config import InteropError
from moeformer.model_config import config_to_dict
from moeformer.publish import check_replaceable, staged_dir


@dataclass
class Converted:
    out: Path
    family: str  # the transformers model_type on the Hugging Face side
    tokenizer: bool  # whether a tokenizer came along
    parameters: int


def check_paths(source: str | Path, out: str | Path, force: bool) -> None:
    """Refuse to write into (or over) the source, or over an existing path that ``force`` may not replace."""
    if paths_overlap(source, out):
        raise InteropError(f"output {out} overlaps the source {source}; the source is never modified")
    check_replaceable(out, force=force)


def hf_to_checkpoint(
    source: str | Path, out: str | Path, *, force: bool = False, tokenizer: str | Path | None = None
) -> Converted:
    """A transformers checkpoint directory -> a moeformer checkpoint directory.

    tokenizer: a tokenizer.json (or a directory holding one) to store instead of the source's own.
    """
    check_paths(source, out, force)
    hf = read_hf_config(source)
    pair: TokenizerPair | None = None
    if tokenizer is not None or (Path(source) / "tokenizer.json").exists():
        pair = read_tokenizer(tokenizer if tokenizer is not None else source)
    model = import_hf(source)
    if pair is not None:
        check_vocabulary(pair, model.config.vocab_size, str(tokenizer or source))
    meta: dict = {
        "config": {"model": config_to_dict(model.config)},
        "step": 0,
        "converted_from": {"path": str(source), "model_type": hf["model_type"]},
    }
    if pair is not None:
        meta["tokenizer"] = pair.to_dict()
    with staged_dir(out, force=force) as tmp:
        safetensors.torch.save_model(model, str(tmp / WEIGHTS))
        (tmp / SIDECAR).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    return Converted(Path(out), hf["model_type"], pair is not None, model.num_parameters())


def checkpoint_to_hf(
    source: str | Path,
    out: str | Path,
    *,
    which: str = "best",
    force: bool = False,
    tokenizer: str | Path | None = None,
) -> Converted:
    """A moeformer checkpoint (or run directory) of a DecoderLM -> a transformers checkpoint directory.

    The tokenizer (the checkpoint's, or ``tokenizer``) is written when it has a tokenizer.json form;
    a weights-only checkpoint exports weights only.
    """
    check_paths(source, out, force)
    loaded = load_model(source, which=which, tokenizer=tokenizer)
    if loaded.model.config.arch != "decoder":
        raise InteropError(f"{source} holds a {loaded.model.config.arch} model; only decoder-only LMs export")
    pair = loaded.tokenizer_pair
    target = pair.target if pair is not None else None
    with_tokenizer = getattr(target, "backend", None) is not None
    family = export_hf(loaded.model, out, tokenizer=target if with_tokenizer else None, force=force)
    return Converted(Path(out), family, with_tokenizer, loaded.model.num_parameters())


def load_model(
    path: str | Path, *, which: str = "best", device: str = "cpu", tokenizer: str | Path | None = None
) -> LoadedModel:
    """A model and its tokenizers from a checkpoint or run directory, or from a Hugging Face checkpoint
    directory of a family :mod:`moeformer.interop` imports (config.json + safetensors [+ tokenizer.json]);
    errors name the bad file.

    tokenizer: a tokenizer.json (or a directory holding one) used instead of the checkpoint's own;
    without it a weights-only checkpoint loads with ``tokenizer_pair`` None.
    """
    given = read_tokenizer(tokenizer) if tokenizer is not None else None
    if _is_hf_directory(Path(path)):
        loaded = _load_hf(Path(path), device)
    else:
        loaded = load_checkpoint(path, which=which, device=device)
    if given is not None:
        check_vocabulary(given, loaded.model.config.vocab_size, str(tokenizer))
        loaded.tokenizer_pair = given
    return loaded


def _is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "checkpoint.json").exists()


def _load_hf(path: Path, device: str) -> LoadedModel:
    """A transformers checkpoint imported as it is, with its own tokenizer if it has one (nothing is written)."""
    tokenizers = read_tokenizer(path) if (path / "tokenizer.json").exists() else None
    model = import_hf(path)
    meta = {"config": {"model": config_to_dict(model.config)}, "step": 0, "converted_from": {"path": str(path)}}
    return LoadedModel(model.to(device).eval(), tokenizers, Checkpoint(path, meta))
