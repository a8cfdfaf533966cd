"""A causal LM as the refusal method sees it: prompts, residual-stream sites, writer weights.

Arditi et al. (2024) read and edit the residual stream x^(l) of a chat model at the input of
every layer l, and edit every component that writes into it (attention outputs, MLP / expert
outputs, the embedding). :class:`ChatLM` names those places once per model family, so that the
extraction, interventions and weight edits are written once: :mod:`moeformer.refusal.hf` wraps
Hugging Face ``transformers`` causal LMs, :mod:`moeformer.refusal.native` this project's
:class:`~moeformer.models.decoder.DecoderLM`.

Prompts are left-padded, so the post-instruction (end-of-instruction, "eoi") template tokens sit
at the same negative positions -n_eoi .. -1 in every row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from moeformer.data.batching import pad_batch

INSTRUCTION = "{instruction}"
_SENTINEL = "\u2063INSTRUCTION\u2063"  # invisible separators: never part of a real chat template


class RefusalError(ValueError):
    """Bad input to the refusal method (model, template, direction); the message says what is allowed."""


@dataclass(frozen=True)
class PromptFormat:
    """An instruction becomes ``prefix + instruction + suffix``; the suffix's tokens are the eoi positions.

    special_tokens: whether the tokenizer should add its own BOS/EOS (False when the text already
    holds them, as chat templates render them).
    """

    prefix: str
    suffix: str
    special_tokens: bool

    def __call__(self, instruction: str) -> str:
        return self.prefix + instruction + self.suffix

    @classmethod
    def from_template(cls, template: str) -> PromptFormat:
        """A user template such as ``"User: {instruction}\\nAssistant:"`` (exactly one placeholder)."""
        if template.count(INSTRUCTION) != 1:
            raise RefusalError(
                f"a prompt template needs exactly one {INSTRUCTION} placeholder, got {template!r}"
            )
        prefix, suffix = template.split(INSTRUCTION)
        return cls(prefix, suffix, special_tokens=True)

    @classmethod
    def from_chat_template(cls, render: Callable[[str], str]) -> PromptFormat:
        """From a function that renders one user turn plus the generation prompt (a tokenizer's template)."""
        text = render(_SENTINEL)
        if text.count(_SENTINEL) != 1:
            raise RefusalError("the chat template does not place the user message exactly once in the prompt")
        prefix, suffix = text.split(_SENTINEL)
        return cls(prefix, suffix, special_tokens=False)


@dataclass(frozen=True)
class Site:
    """A module whose input (first argument) or output (first element) is a residual-stream tensor."""

    module: nn.Module
    where: Literal["input", "output"]


@dataclass(frozen=True)
class WriterWeight:
    """A tensor that writes into the residual stream; ``axis`` is its d_model axis."""

    name: str
    param: Tensor
    axis: int


@dataclass
class PromptBatch:
    """Prompts (chat-formatted or raw texts) tokenized and left-padded for one forward pass."""

    ids: Tensor  # (B, T) left-padded
    padding_mask: Tensor  # (B, T) bool, True at padding (as every padding mask in moeformer)


class ChatLM(ABC):
    """What the refusal method needs from a causal LM. Subclasses name the model's parts."""

    family: str  # e.g. "llama", "mixtral", "moeformer"

    def __init__(self, model: nn.Module, prompt_format: PromptFormat) -> None:
        self.model = model.eval()
        self.prompt_format = prompt_format
        self.eoi_ids = self.encode(prompt_format.suffix, special_tokens=False)
        if not self.eoi_ids:  # the template ends with the instruction: read its last token
            self.eoi_ids = [-1]

    # --- what each family provides -------------------------------------------------------------
    @property
    @abstractmethod
    def n_layers(self) -> int: ...

    @property
    @abstractmethod
    def d_model(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @abstractmethod
    def encode(self, text: str, *, special_tokens: bool) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def forward_logits(self, batch: PromptBatch) -> Tensor:
        """-> (B, T, V) logits in float32."""

    @abstractmethod
    def generate_ids(self, batch: PromptBatch, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations, cut at the end-of-sequence token."""

    @abstractmethod
    def layer_sites(self) -> list[Site]:
        """The residual stream entering each layer: x^(l), l = 0 .. n_layers-1."""

    @abstractmethod
    def final_site(self) -> Site:
        """The residual stream after the last layer (the final norm's input)."""

    @abstractmethod
    def writer_sites(self) -> list[Site]:
        """Every sublayer output that is added to the residual stream."""

    @abstractmethod
    def writer_weights(self) -> list[WriterWeight]:
        """Every weight whose output lands in the residual stream; raises RefusalError where that is not exact."""

    @abstractmethod
    def router_sites(self) -> dict[int, tuple[nn.Module, int]]:
        """MoE layers: layer index -> (router module, number of routed experts)."""

    @staticmethod
    @abstractmethod
    def router_choices(output: object) -> Tensor:
        """A router module's output -> chosen expert ids (tokens, k), tokens in (batch, seq) order."""

    @abstractmethod
    def untie_embeddings(self) -> bool:
        """Give the output layer its own copy of tied embeddings (True if they were tied)."""

    @abstractmethod
    def save(self, out: Path) -> None:
        """Write the model in its own format (with its tokenizer) to the directory ``out``."""

    # --- shared ---------------------------------------------------------------------------------
    @property
    def n_eoi(self) -> int:
        return len(self.eoi_ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompts(self, instructions: Sequence[str]) -> list[str]:
        return [self.prompt_format(text) for text in instructions]

    def batch(self, texts: Sequence[str], *, chat: bool = True) -> PromptBatch:
        """Left-padded ids of ``texts`` (chat-formatted instructions when ``chat``, raw text otherwise)."""
        special = self.prompt_format.special_tokens if chat else True
        rows = [self.encode(self.prompt_format(t) if chat else t, special_tokens=special) for t in texts]
        if any(not row for row in rows):
            raise RefusalError("a prompt encodes to zero tokens; give non-empty instructions")
        ids, padding = pad_batch(rows, self.pad_id, left=True)
        return PromptBatch(ids.to(self.device), padding.to(self.device))

    def token_id(self, text: str) -> int:
        """The first token of ``text`` as the model would generate it (e.g. "I" for refusal tokens)."""
        ids = self.encode(text, special_tokens=False)
        if not ids:
            raise RefusalError(f"refusal token {text!r} encodes to nothing with this tokenizer")
        return ids[0]

    def check_direction(self, direction: Tensor) -> Tensor:
        """The direction as a float32 vector of this model's hidden size, or a clear error."""
        if direction.dim() != 1 or direction.shape[0] != self.d_model:
            raise RefusalError(
                f"the direction has shape {tuple(direction.shape)}; this model's hidden size is {self.d_model}, "
                f"so it must be a vector of shape ({self.d_model},)"
            )
        if not torch.isfinite(direction).all():
            raise RefusalError("the direction holds NaN or inf")
        return direction.float().to(self.device)


def iter_batches(items: Sequence[str], batch_size: int) -> list[Sequence[str]]:
    if batch_size < 1:
        raise RefusalError(f"batch_size must be >= 1, got {batch_size}")
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
