"""Using a trained checkpoint: load it, then translate sentences or generate text with it.

Loading lives below this module: a moeformer checkpoint in :mod:`moeformer.checkpoint_io`, either
format (moeformer or transformers) in :func:`moeformer.interop.checkpoints.load_model`. Decoding
text lives below it too, in :mod:`moeformer.decode.text` (``translate``, ``generate``), where
training and evaluation reach it without the loaders. This module is where the two meet, and
every name it ever exported is still importable from here.

loaded = load_model("runs/tatoeba-deepseek")          # its best checkpoint
translate(loaded.model, loaded.tokenizers, ["Are you OK?"], beam_size=4)
"""

from __future__ import annotations

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
from moeformer.interop.checkpoints import load_model  # re-exported: loads either format

__all__ = [
    "LoadedModel",
    "MissingTokenizerError",
    "Note",
    "Overlong",
    "check_vocabulary",
    "checkpoint_tokenizers",
    "generate",
    "load_model",
    "plan_inputs",
    "read_tokenizer",
    "require_arch",
    "translate",
]
