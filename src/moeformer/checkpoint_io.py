"""Checkpoint I/O: the files of a checkpoint directory, finding one, reading it, loading its model.

A run directory holds::

    checkpoints/step-00000400/model.safetensors   weights and persistent buffers (MoE balancing
                                                  biases included); tied matrices stored once
    checkpoints/step-00000400/checkpoint.json     config, tokenizer, step, metrics, versions
    checkpoints/step-00000400/trainer.pt          optimiser, schedule, RNG, data position
    latest, best                                  one line: the checkpoint directory they name

A low-level module: training writes checkpoints (:mod:`moeformer.train.checkpoint`, through the
staged publisher :mod:`moeformer.publish`), and everything that reads one (inference, interop,
refusal, inspection, results) reads it through here. It imports only ``models``, ``data``,
``presets`` and ``publish``. Loading checks every file and names what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
from torch import nn

from moeformer.data.tokenizer import TokenizerPair
from moeformer.models import build_model
from moeformer.presets import model_config_from_dict

WEIGHTS, SIDECAR, TRAINER = "model.safetensors", "checkpoint.json", "trainer.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or inconsistent; the message names the file."""


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]  # checkpoint.json: config, tokenizer, step, metrics


def paths_overlap(a: str | Path, b: str | Path) -> bool:
    """Whether one path is the other or lies inside it (writing to one would touch the other)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def pointer_target(run_dir: Path, name: str) -> Path | None:
    """The checkpoint directory that ``run_dir/name`` (``latest`` or ``best``) names; None if absent."""
    file = run_dir / name
    if not file.exists():
        return None
    return (run_dir / file.read_text(encoding="utf-8").strip()).resolve()


def resolve(path: str | Path, which: str = "best") -> Path:
    """A checkpoint directory from itself or from a run directory (its ``best``, else ``latest``)."""
    path = Path(path)
    if (path / WEIGHTS).exists() or (path / SIDECAR).exists():
        return path
    for name in (which, "latest"):
        target = pointer_target(path, name)
        if target is not None:
            return target
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    raise CheckpointError(f"{path}: neither a checkpoint ({WEIGHTS} + {SIDECAR}) nor a run directory with latest/best")


def read_checkpoint(path: str | Path, which: str = "best") -> Checkpoint:
    """The sidecar of a checkpoint, checked for presence and valid JSON."""
    ckpt = resolve(path, which)
    for name in (WEIGHTS, SIDECAR):
        if not (ckpt / name).exists():
            raise CheckpointError(f"{ckpt}: missing {name}")
    try:
        meta = json.loads((ckpt / SIDECAR).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{ckpt / SIDECAR}: not valid JSON ({err})") from None
    for key in ("config", "step"):
        if key not in meta:
            raise CheckpointError(f"{ckpt / SIDECAR}: missing key {key!r}")
    return Checkpoint(ckpt, meta)


def load_weights(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load model.safetensors into ``model`` (built from the sidecar's config); strict."""
    file = ckpt.path / WEIGHTS
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(file), strict=False)
    except (safetensors.SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({err})") from None
    except RuntimeError as err:  # shape mismatch between the JSON config and the stored tensors
        raise CheckpointError(f"{file}: weights do not match the config in {SIDECAR}: {err}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: weights do not match the config in {SIDECAR}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


class MissingTokenizerError(CheckpointError):
    """A weights-only checkpoint was asked to encode or decode text; the message says how to give one."""


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode
    tokenizer_pair: TokenizerPair | None  # None: a weights-only checkpoint and no tokenizer given
    checkpoint: Checkpoint

    @property
    def meta(self) -> dict[str, Any]:
        return self.checkpoint.meta

    @property
    def tokenizers(self) -> TokenizerPair:
        """The tokenizers, or MissingTokenizerError for a checkpoint that has none."""
        if self.tokenizer_pair is None:
            raise MissingTokenizerError(
                f"{self.checkpoint.path} holds weights but no tokenizer (e.g. converted from a transformers "
                "directory without tokenizer.json), so text cannot be encoded; give one with --tokenizer PATH "
                "(a tokenizer.json or a directory holding one)"
            )
        return self.tokenizer_pair


def load_checkpoint(path: str | Path, *, which: str = "best", device: str = "cpu") -> LoadedModel:
    """A moeformer checkpoint (or run directory's ``which``) as a model in eval mode and its tokenizers."""
    ckpt = read_checkpoint(path, which)
    try:
        config = model_config_from_dict(ckpt.meta["config"]["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt.path}/checkpoint.json: bad model config entry ({err})") from None
    model = build_model(config)
    load_weights(model, ckpt)
    return LoadedModel(model.to(device).eval(), checkpoint_tokenizers(ckpt), ckpt)


def checkpoint_tokenizers(ckpt: Checkpoint) -> TokenizerPair | None:
    """The tokenizers saved in ``checkpoint.json``; None for a weights-only checkpoint (no entry)."""
    entry = ckpt.meta.get("tokenizer")
    if entry is None:
        return None
    try:
        return TokenizerPair.from_dict(entry)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{ckpt.path}/checkpoint.json: bad tokenizer entry ({err})") from None


def read_tokenizer(path: str | Path) -> TokenizerPair:
    """A transformers tokenizer from a ``tokenizer.json`` file or a directory holding one (its
    ``tokenizer_config.json`` beside it gives the special tokens), shared by source and target."""
    from moeformer.data.hub_tokenizer import HubTokenizer

    path = Path(path)
    directory = path.parent if path.name == "tokenizer.json" else path
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: expected a tokenizer.json or a directory holding one")
    try:
        tokenizer = HubTokenizer.from_directory(directory)
    except Exception as err:  # the tokenizers library raises its own plain Exception for a bad file
        raise ValueError(f"{directory / 'tokenizer.json'}: not a readable tokenizer ({err})") from None
    return TokenizerPair(tokenizer, tokenizer)


def check_vocabulary(tokenizers: TokenizerPair, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids the model's embedding cannot look up is refused before it is used."""
    for tok in {id(t): t for t in (tokenizers.source, tokenizers.target)}.values():
        if tok.vocab_size > vocab_size:
            raise ValueError(
                f"{where}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary has "
                f"{vocab_size}; it is not this model's tokenizer"
            )
