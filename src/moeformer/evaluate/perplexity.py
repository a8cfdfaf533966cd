"""Perplexity and validation loss: the token-weighted mean negative log-likelihood.

    NLL = -(1 / N) sum_t log p(y_t | y_<t [, x]),      perplexity = exp(NLL)

summed over every next-token prediction whose input and target are both real tokens, so that
padding (left or right) and the way a corpus is cut into batches change nothing. Auxiliary (MoE
balancing) losses are left out. Shapes: B batch, T target length, S source length, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moeformer.models.decoder import DecoderLM
from moeformer.models.seq2seq import Seq2SeqTransformer

LMBatch = tuple[Tensor, Tensor | None]  # tokens (B, T), padding_mask (B, T) True at padding
TranslationBatch = tuple[Tensor, Tensor, Tensor | None, Tensor | None]  # src, tgt, src/tgt padding masks


@dataclass(frozen=True)
class LossTotals:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # predictions counted

    @property
    def mean_nll(self) -> float:
        if self.tokens == 0:
            raise ValueError("no predictions were counted: every sequence was shorter than 2 real tokens")
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def perplexity(model: DecoderLM, batches: Iterable[LMBatch]) -> float:
    """exp of the mean next-token NLL over ``batches`` of (tokens (B, T), padding_mask (B, T) | None)."""
    return lm_loss(model, batches).perplexity


@torch.no_grad()
def lm_loss(model: DecoderLM, batches: Iterable[LMBatch]) -> LossTotals:
    """Summed next-token NLL and count over (tokens, padding_mask) batches, in eval mode."""
    nll, count = 0.0, 0
    with _eval_mode(model):
        for tokens, padding_mask in batches:
            logits = model(tokens, padding_mask=padding_mask).logits[:, :-1]
            batch_nll, batch_count = _next_token_nll(logits, tokens, padding_mask)
            nll, count = nll + batch_nll, count + batch_count
    return LossTotals(nll, count)


@torch.no_grad()
def seq2seq_loss(model: Seq2SeqTransformer, batches: Iterable[TranslationBatch]) -> LossTotals:
    """Teacher-forced NLL of translation batches (src, tgt, src_padding_mask, tgt_padding_mask).

    tgt: (B, T) = BOS y_1 ... y_n EOS, padded; the decoder reads tgt[:, :-1] and predicts tgt[:, 1:].
    """
    nll, count = 0.0, 0
    with _eval_mode(model):
        for src, tgt, src_padding_mask, tgt_padding_mask in batches:
            tgt_in_mask = None if tgt_padding_mask is None else tgt_padding_mask[:, :-1]
            logits = model(src, tgt[:, :-1], src_padding_mask=src_padding_mask, tgt_padding_mask=tgt_in_mask).logits
            batch_nll, batch_count = _next_token_nll(logits, tgt, tgt_padding_mask)
            nll, count = nll + batch_nll, count + batch_count
    return LossTotals(nll, count)


def _next_token_nll(logits: Tensor, tokens: Tensor, padding_mask: Tensor | None) -> tuple[float, int]:
    """logits (B, T - 1, V) at position t predict tokens (B, T) at t + 1 -> (summed NLL, count).

    A prediction counts when its input token and its target are both real (not padding).
    """
    targets = tokens[:, 1:]
    if targets.shape[1] == 0:
        return 0.0, 0
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T - 1)
    counted = torch.ones_like(targets, dtype=torch.bool)
    if padding_mask is not None:
        counted = ~padding_mask[:, :-1] & ~padding_mask[:, 1:]
    return float(nll[counted].double().sum()), int(counted.sum())


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate without dropout (or router noise), then restore the model's previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
