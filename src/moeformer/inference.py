"""Using a trained checkpoint: load it, then translate sentences or generate text with it.

Loading lives below this module: a moeformer checkpoint in :mod:`moeformer.checkpoint_io`, either
format (moeformer or transformers) in :func:`moeformer.interop.checkpoints.load_model`. Decoding
text lives below it too, in :mod:`moeformer.decode.text` (``translate``, ``generate``), where
training and evaluation reach it without the loaders. This module is where the two meet, and
every name it ever exported is still importable from here. ``moeformer eval`` loads here too
(:func:`evaluate_checkpoint`) and scores on the evaluate floor.

loaded = load_model("runs/tatoeba-deepseek")          # its best checkpoint
translate(loaded.model, loaded.tokenizers, ["Are you OK?"], beam_size=4)
"""

from __future__ import annotations

from pathlib import Path

from moeformer.checkpoint_io import (  # re-exported: loading a checkpoint lives there
    LoadedModel,
    MissingTokenizerError,
    check_vocabulary,
    checkpoint_tokenizers,
    read_tokenizer,
)
from moeformer.decode.text import (  # re-exported: text in, text out lives there
    Note,
    Overlong,
    generate,
    plan_inputs,
    require_arch,
    translate,
)
from moeformer.evaluate.checkpoint import evaluate_loaded
from moeformer.interop.checkpoints import load_model  # re-exported: loads either format

__all__ = [
    "LoadedModel",
    "MissingTokenizerError",
    "Note",
    "Overlong",
    "check_vocabulary",
    "evaluate_checkpoint",
    "checkpoint_tokenizers",
    "generate",
    "load_model",
    "plan_inputs",
    "read_tokenizer",
    "require_arch",
    "translate",
]


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    which: str = "best",
    limit: int | None = None,
    beam_size: int = 1,
    tokenizer: str | Path | None = None,
    note: Note | None = None,
) -> dict[str, float | str]:
    """Scores of ``checkpoint`` (either format) on ``data``; ``tokenizer`` replaces (or supplies) the
    checkpoint's own. See :func:`moeformer.evaluate.checkpoint.evaluate_loaded` for what is scored."""
    loaded = load_model(checkpoint, which=which, tokenizer=tokenizer)
    return evaluate_loaded(loaded, data, limit=limit, beam_size=beam_size, note=note)
