"""Attention maps of one input: every layer and head of every attention sublayer.

Seq2seq: encoder self-attention (S x S), decoder masked self-attention (T x T, lower
triangular) and encoder-decoder attention (T x S: target queries over source keys), the
pictures of the article's Figure 2-1. Decoder-only LMs: masked self-attention (T x T).

The models are not changed: a forward pre-hook on each attention module (found by the names
``self_attn`` / ``cross_attn``, whatever its class) asks for ``need_weights=True``, and a forward
hook reads the ``weights`` (B, H, T, S) of the :class:`AttentionOutput` it returns. Asking for
weights runs the reference kernel, whose outputs equal the fused one's, so what is shown is what
the model computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moeformer.inference import LoadedModel, translate
from moeformer.inspect.corpus import Example, InspectError, Item, encode_item
from moeformer.inspect.tokens import token_labels

ATTENTION_NAMES = ("self_attn", "cross_attn")
KIND_TITLES = {
    "encoder.self_attn": "encoder self-attention",
    "decoder.self_attn": "decoder masked self-attention",
    "decoder.cross_attn": "encoder-decoder (cross) attention",
    "layers.self_attn": "masked self-attention",
}


@dataclass
class AttentionMaps:
    """Weights by module name ("decoder.1.cross_attn" -> (H, T_query, S_key)) and the token labels."""

    maps: dict[str, np.ndarray]
    source_tokens: list[str]  # encoder input, or the LM's sequence
    target_tokens: list[str] = field(default_factory=list)  # decoder input (seq2seq)

    def kinds(self) -> dict[str, list[str]]:
        """Module names by kind ("decoder.cross_attn"), in layer order (maps are stored in forward order)."""
        out: dict[str, list[str]] = {}
        for name in self.maps:
            out.setdefault(kind_of(name), []).append(name)
        return out

    def axes(self, name: str) -> tuple[list[str], list[str]]:
        """(query labels, key labels) of a map: encoder maps use the source, the decoder's the target."""
        stack = name.split(".")[0]
        if stack != "decoder":
            return self.source_tokens, self.source_tokens
        keys = self.source_tokens if name.endswith("cross_attn") else self.target_tokens
        return self.target_tokens, keys

    def to_arrays(self) -> dict[str, np.ndarray]:
        """For ``.npz``: every map under its module name, plus ``source_tokens`` / ``target_tokens``."""
        arrays: dict[str, np.ndarray] = dict(self.maps)
        arrays["source_tokens"] = np.array(self.source_tokens, dtype=str)
        arrays["target_tokens"] = np.array(self.target_tokens, dtype=str)
        return arrays


def kind_of(name: str) -> str:
    """The kind of a module name: "decoder.1.cross_attn" -> "decoder.cross_attn"."""
    parts = name.split(".")
    return f"{parts[0]}.{parts[-1]}"


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention sublayer by dotted name, in module order (encoder first, then decoder)."""
    found = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ATTENTION_NAMES}
    if not found:
        raise InspectError(f"{type(model).__name__} has no module named {' or '.join(ATTENTION_NAMES)}")
    return found


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Inside the block, each forward fills ``{name: weights (B, H, T, S)}``; hooks always removed."""
    store: dict[str, Tensor] = {}

    def ask(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "need_weights": True}

    def keep(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            weights = getattr(output, "weights", None)
            if weights is None:
                raise InspectError(f"{name} ({type(module).__name__}) returned no attention weights")
            store[name] = weights.detach().float().cpu()

        return hook

    with ExitStack() as stack:
        for name, module in attention_modules(model).items():
            stack.callback(module.register_forward_pre_hook(ask, with_kwargs=True).remove)
            stack.callback(module.register_forward_hook(keep(name)).remove)
        yield store


@torch.no_grad()
def collect_attention(model: nn.Module, example: Example) -> dict[str, np.ndarray]:
    """The maps of one example (teacher-forced for seq2seq): name -> (H, T, S) float32."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model) as store:
            source = torch.tensor([example.source], device=device)
            if example.target is None:
                model(source)
            else:
                model(source, torch.tensor([example.target], device=device))
    finally:
        model.train(was_training)
    return {name: weights[0].numpy() for name, weights in store.items()}


def sentence_item(loaded: LoadedModel, text: str, target: str | None = None) -> Item:
    """The input to look at; a seq2seq model without ``target`` gets its own greedy translation."""
    if not text.strip():
        raise InspectError("the text is empty: give a sentence")
    arch = loaded.model.config.arch
    if arch != "seq2seq":
        if target is not None:
            raise InspectError("a decoder-only model has no decoder target: give --text only")
        return Item(text)
    if target is None:
        target = translate(loaded.model, loaded.tokenizers, [text], beam_size=1)[0]
    return Item(text, target)


def attention_maps(loaded: LoadedModel, item: Item, *, max_tokens: int | None = None) -> AttentionMaps:
    """Attention maps and token labels for ``item`` (cut to ``max_tokens`` per side, if given)."""
    limit = min(loaded.model.config.max_seq_len, max_tokens or loaded.model.config.max_seq_len)
    example = encode_item(item, loaded.tokenizers, loaded.model.config.arch, limit)
    maps = collect_attention(loaded.model, example)
    source = token_labels(loaded.tokenizers.source, example.source)
    target = [] if example.target is None else token_labels(loaded.tokenizers.target, example.target)
    return AttentionMaps(maps, source, target)
