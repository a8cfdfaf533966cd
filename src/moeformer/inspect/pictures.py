"""Computed results with their pictures, shared by ``moeformer inspect`` and ``moeformer report``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeformer.inference import LoadedModel
from moeformer.inspect import plots
from moeformer.inspect.attention import AttentionMaps
from moeformer.inspect.corpus import Item
from moeformer.inspect.routing import SentenceRouting, corpus_routing, sentence_routing


def attention_pictures(maps: AttentionMaps, font: str | Path | None = None) -> dict[str, bytes]:
    """kind ("decoder.cross_attn") -> PNG grid of its layers and heads."""
    return {kind: plots.attention_grid(maps, kind, font=font) for kind in maps.kinds()}


@dataclass
class RoutingResult:
    summaries: list[dict[str, Any]]  # one per MoE layer (see LayerRouting.summary)
    sentence: SentenceRouting
    arrays: dict[str, np.ndarray]
    pictures: dict[str, bytes]  # "sentence", "load", "measures"


def routing_result(
    loaded: LoadedModel,
    items: list[Item],
    sentence: Item,
    *,
    batch_size: int = 32,
    progress: bool = False,
    font: str | Path | None = None,
) -> RoutingResult:
    """Corpus totals over ``items`` and the experts of each token of ``sentence``, with pictures."""
    layers = corpus_routing(loaded, items, batch_size=batch_size, progress=progress)
    tok = loaded.tokenizers
    summaries = [r.summary(tok.source if n.startswith("encoder.") else tok.target) for n, r in layers.items()]
    one = sentence_routing(loaded, sentence)
    arrays: dict[str, np.ndarray] = {}
    for name, layer in layers.items():
        arrays[f"{name}/load"] = layer.counts.numpy()
        arrays[f"{name}/by_token"] = layer.by_token.numpy().astype(np.int64)
        arrays[f"sentence/{name}/index"] = one.index[name].numpy()
        arrays[f"sentence/{name}/weights"] = one.weights[name].numpy()
    for stack, labels in one.tokens.items():
        arrays[f"sentence/{stack}/tokens"] = np.array(labels, dtype=str)
    pictures = {
        "sentence": plots.sentence_experts(one, font=font),
        "load": plots.expert_load(summaries, font=font),
        "measures": plots.routing_measures(summaries, font=font),
    }
    return RoutingResult(summaries, one, arrays, pictures)
