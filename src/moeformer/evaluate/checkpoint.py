"""``moeformer eval``: score a loaded checkpoint on a file it has not seen.

Translation checkpoints: BLEU (``zh`` tokenisation for Chinese targets) and chrF on a TSV/JSONL
file of pairs, cleaned as the training data was (NFKC, whitespace; a Chinese side keeps its
full-width punctuation, except for runs saved before ``data.zh_script`` existed, whose training
text was NFKC'd throughout), scored by :func:`moeformer.evaluate.translation.evaluate_translation`
against the references as given and, with the run's ``data.zh_script``, converted to that script
(``bleu_simplified``, ...). Language models: perplexity over consecutive windows of
``max_seq_len`` tokens of a text file. Sources longer than the model's limit are translated
sentence by sentence (:func:`moeformer.decode.text.translate`), and ``note`` is told.

Loading is the caller's: :func:`moeformer.inference.evaluate_checkpoint` loads a checkpoint of
either format (the loaders live above this floor) and calls :func:`evaluate_loaded`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moeformer.checkpoint_io import LoadedModel
from moeformer.data.cleaning import CleaningConfig, clean_pair
from moeformer.data.config import DataConfig
from moeformer.data.readers import read_documents, read_parallel
from moeformer.decode.text import Note
from moeformer.evaluate.perplexity import perplexity
from moeformer.evaluate.translation import evaluate_translation

__all__ = ["evaluate_loaded"]


def evaluate_loaded(
    loaded: LoadedModel,
    data: str | Path,
    *,
    limit: int | None = None,
    beam_size: int = 1,
    note: Note | None = None,
) -> dict[str, float | str]:
    """Scores of a loaded checkpoint on ``data`` (its first ``limit`` pairs or windows)."""
    tokenizers = loaded.tokenizers  # a weights-only checkpoint fails here, before the data is read
    if loaded.model.config.arch == "seq2seq":
        pairs, report = read_parallel(data)
        saved = loaded.meta.get("config", {}).get("data", {})
        cleaning = _cleaning(saved)
        pairs = [clean_pair(s, t, cleaning) for s, t in pairs][:limit]
        if not pairs:
            raise ValueError(f"{data}: no readable pairs (rejected: {dict(report.rejected)})")
        lang, script = saved.get("target_lang", "zh"), saved.get("zh_script", "keep")
        result = evaluate_translation(
            loaded.model, tokenizers, pairs, target_lang=lang, zh_script=script, beam_size=beam_size, note=note
        )
        scores = result.scores
        assert scores is not None  # no deadline: every pair is decoded and scored
        return {"pairs": len(pairs), **scores.as_dict(), "bleu_signature": scores.bleu_signature}
    texts, _ = read_documents(data)
    ids = torch.tensor(tokenizers.source.encode("\n".join(texts)), dtype=torch.long)
    window = loaded.model.config.max_seq_len
    chunks = [ids[i : i + window] for i in range(0, len(ids) - 1, window)][:limit]
    chunks = [c for c in chunks if len(c) > 1]
    if not chunks:
        raise ValueError(f"{data}: too little text to score")
    return {"windows": len(chunks), "perplexity": perplexity(loaded.model, ((c[None], None) for c in chunks))}


def _cleaning(saved: dict[str, Any]) -> CleaningConfig:
    """How the run's training text was cleaned, from its saved ``data`` table.

    A table without ``zh_script`` comes from a run made before Chinese punctuation was kept: its
    tokenizer and model saw NFKC'd text ("你好吗?"), so its references are NFKC'd the same way.
    """
    if "zh_script" not in saved:
        return CleaningConfig()
    sides = DataConfig(source_lang=saved.get("source_lang", "en"), target_lang=saved.get("target_lang", "zh"))
    return CleaningConfig(chinese=sides.chinese_sides)
