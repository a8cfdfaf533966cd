"""Batched beam search over the KV cache (Sutskever et al. 2014; GNMT, Wu et al. 2016, section 7).

Each source keeps ``beam_size`` live hypotheses. At every step the model scores the next token of
all of them at once (B * K rows, one new token each, over the cache); the best 2K continuations of
a source are ranked by summed log-probability, the best K that do not end in EOS stay live, and
those that end in EOS *within the top K* are set aside as finished. Hypotheses are compared by

    score(Y) = log P(Y | X) / lp(Y),      lp(Y) = (5 + |Y|)^alpha / (5 + 1)^alpha      (GNMT eq. 14)

where |Y| counts the generated tokens, EOS included (its log-probability is part of log P(Y)); a
hypothesis cut at the step limit has |Y| = the limit. ``alpha = 0`` ranks by plain log-probability.

The encoder runs once and the first step (BOS, or the prompt) runs once per source; the cache
(cross-attention keys and values included) and the encoder output are then expanded to B * K rows
by the first reorder, and every later step reorders them to follow the surviving beams.

Stopping, per source: ``early_stop=True`` (fairseq, and transformers' ``early_stopping=True``)
stops once K hypotheses are finished. ``early_stop=False`` goes on until no live beam can still
beat the worst of the K finished ones: log-probabilities only fall, so a live beam's best
reachable score is its log-probability over the largest lp it can reach (at the step limit when
alpha > 0, at the next step otherwise). Either way the search ends at the step limit, where live
beams count as (unfinished) hypotheses. With ``beam_size=1`` and ``early_stop=True`` this is
greedy decoding.

Shapes: B sources, K beams, V vocabulary, N = B * K rows fed to the model, t tokens generated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from moeformer.models.cache import DecoderCache
from moeformer.models.decoder import DecoderLM
from moeformer.models.outputs import EncoderOutput
from moeformer.models.seq2seq import Seq2SeqTransformer

Hypothesis = tuple[float, list[int]]  # (length-penalised score, tokens without BOS/EOS)


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """lp(Y) = ((5 + |Y|) / 6) ** alpha, GNMT's length penalty for a hypothesis of ``length`` tokens."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_translate(
    model: Seq2SeqTransformer,
    src: Tensor,
    *,
    src_padding_mask: Tensor | None = None,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    max_len: int,
    length_penalty: float = 0.6,
    early_stop: bool = True,
) -> list[list[int]]:
    """src: (B, S) ids, src_padding_mask: (B, S) True at padding -> B best hypotheses, no BOS/EOS.

    Each has at most ``max_len`` tokens (``max_len`` decoding steps, EOS included).
    """
    vocab = model.config.vocab_size
    _check_options(beam_size, max_len, "max_len", length_penalty, eos_id, vocab)
    _check_id(bos_id, "bos_id", vocab)
    memory = model.encode(src, src_padding_mask=src_padding_mask)
    state = _Translation(model, memory, model.new_cache())
    bos = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
    opts = _Options(beam_size, eos_id, max_len, length_penalty, early_stop)
    return _search(state.feed(bos), state.feed, state.reorder, opts)


@torch.no_grad()
def beam_generate(
    model: DecoderLM,
    prompt: Tensor,
    *,
    padding_mask: Tensor | None = None,
    max_new_tokens: int,
    eos_id: int,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    early_stop: bool = True,
) -> list[list[int]]:
    """prompt: (B, T) ids, left-padded where padding_mask (B, T) is True -> B best continuations.

    Each continuation has at most ``max_new_tokens`` tokens and holds neither prompt nor EOS.
    """
    _check_options(beam_size, max_new_tokens, "max_new_tokens", length_penalty, eos_id, model.config.vocab_size)
    check_left_padding(padding_mask)
    cache = model.new_cache()
    first = model(prompt, padding_mask=padding_mask, cache=cache).logits[:, -1]

    def feed(ids: Tensor) -> Tensor:
        return model(ids, cache=cache).logits[:, -1]

    return _search(first, feed, cache.reorder, _Options(beam_size, eos_id, max_new_tokens, length_penalty, early_stop))


def check_left_padding(padding_mask: Tensor | None) -> None:
    """Generation continues from the last column, so that column must be a real token in every row."""
    if padding_mask is not None and padding_mask.dim() == 2 and bool(padding_mask[:, -1].any()):
        rows = padding_mask[:, -1].nonzero().flatten().tolist()
        raise ValueError(f"padding_mask: prompts must be left-padded (last position real); rows {rows} end in padding")


@dataclass
class _Translation:
    """beam_translate's decoding state: the cache and the encoder output, both following the beams."""

    model: Seq2SeqTransformer
    memory: EncoderOutput  # hidden (N, S, D), padding_mask (N, S)
    cache: DecoderCache

    def feed(self, ids: Tensor) -> Tensor:
        """ids: (N, 1) -> next-token logits (N, V)."""
        return self.model.decode(ids, self.memory, cache=self.cache).logits[:, -1]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (N,) of the cache and of the encoder output."""
        self.cache.reorder(index)
        hidden = self.memory.hidden.index_select(0, index)
        padding = None if self.memory.padding_mask is None else self.memory.padding_mask.index_select(0, index)
        self.memory = EncoderOutput(hidden, padding, self.memory.reports)


@dataclass(frozen=True)
class _Options:
    beam_size: int
    eos_id: int
    max_steps: int
    alpha: float
    early_stop: bool


@dataclass
class _Source:
    """Finished hypotheses of one source, best first, at most K of them."""

    finished: list[Hypothesis] = field(default_factory=list)
    done: bool = False

    def add(self, hypothesis: Hypothesis, beam_size: int) -> None:
        self.finished.append(hypothesis)
        self.finished.sort(key=lambda h: -h[0])  # stable: on equal scores the earlier one wins
        del self.finished[beam_size:]


def _search(
    first: Tensor,
    feed: Callable[[Tensor], Tensor],
    reorder: Callable[[Tensor], None],
    opts: _Options,
) -> list[list[int]]:
    """first: (B, V) logits of the first token; feed: (N, 1) ids -> (N, V) logits; reorder(index (N,)).

    The state starts with one row per source (K_cur = 1); the first reorder expands it to K rows.
    """
    B, K = first.shape[0], opts.beam_size
    scores = first.new_zeros(B, 1, dtype=torch.float32)  # (B, K_cur) summed log-probs of live beams
    tokens = torch.zeros(B, 0, dtype=torch.long, device=first.device)  # (B * K_cur, t)
    sources = [_Source() for _ in range(B)]
    logits = first
    for t in range(1, opts.max_steps + 1):
        logprobs = logits.float().log_softmax(-1)
        ranked, ranked_beam, ranked_token = _rank(scores, logprobs, K)
        _finish_eos(sources, ranked, ranked_beam, ranked_token, tokens, t, opts)
        scores, origin, token = _keep_live(ranked, ranked_beam, ranked_token, scores.shape[1], opts)
        tokens = torch.cat([tokens.index_select(0, origin), token[:, None]], dim=1)
        _update_done(sources, scores, t, opts)
        if t == opts.max_steps or all(s.done for s in sources):
            break
        reorder(origin)
        logits = feed(token[:, None])
    _finish_live(sources, scores, tokens, opts)
    return [s.finished[0][1] if s.finished else [] for s in sources]


def _rank(scores: Tensor, logprobs: Tensor, beam_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """scores (B, K_cur), logprobs (B * K_cur, V) -> the best min(2K, K_cur * V) continuations per source.

    Returns their summed log-probs, beams (row within the source) and tokens, each (B, C), best first.
    """
    B, k_cur = scores.shape
    V = logprobs.shape[-1]
    candidates = (scores[:, :, None] + logprobs.view(B, k_cur, V)).view(B, k_cur * V)
    ranked, flat = candidates.topk(min(2 * beam_size, k_cur * V), dim=1)
    return ranked, torch.div(flat, V, rounding_mode="floor"), flat % V


def _finish_eos(
    sources: list[_Source], ranked: Tensor, beam: Tensor, token: Tensor, tokens: Tensor, t: int, opts: _Options
) -> None:
    """Set aside the EOS continuations ranked among the top K of each unfinished source."""
    K = opts.beam_size
    top = slice(0, min(K, ranked.shape[1]))
    is_eos = (token[:, top] == opts.eos_id) & torch.isfinite(ranked[:, top])
    if not bool(is_eos.any()):
        return
    k_cur = tokens.shape[0] // len(sources)
    lp = gnmt_length_penalty(t, opts.alpha)
    for b, j in is_eos.nonzero().tolist():
        if not sources[b].done:
            row = b * k_cur + int(beam[b, j])
            sources[b].add((float(ranked[b, j]) / lp, tokens[row].tolist()), K)


def _keep_live(
    ranked: Tensor, beam: Tensor, token: Tensor, k_cur: int, opts: _Options
) -> tuple[Tensor, Tensor, Tensor]:
    """The K best non-EOS continuations per source -> scores (B, K), origin rows (N,), tokens (N,).

    ``k_cur`` is the number of rows per source before this step. Where fewer than K continuations
    exist (a vocabulary smaller than the beam), the rest are empty slots with score -inf: their
    continuations stay -inf, so they never win and are never finished.
    """
    B, K = ranked.shape[0], opts.beam_size
    live = ranked.masked_fill(token == opts.eos_id, float("-inf"))
    if live.shape[1] < K:
        missing = (0, K - live.shape[1])
        live = F.pad(live, missing, value=float("-inf"))
        beam, token = F.pad(beam, missing), F.pad(token, missing)
    kept, pick = live.topk(K, dim=1)
    origin = torch.arange(B, device=ranked.device)[:, None] * k_cur + beam.gather(1, pick)
    return kept, origin.flatten(), token.gather(1, pick).flatten()


def _update_done(sources: list[_Source], scores: Tensor, t: int, opts: _Options) -> None:
    """Mark the sources whose search may stop after step t (see the module docstring)."""
    best_live = scores.max(dim=1).values.tolist()
    for source, best in zip(sources, best_live):
        if source.done:
            continue
        if best == float("-inf"):  # nothing left alive
            source.done = True
        elif len(source.finished) >= opts.beam_size:
            source.done = opts.early_stop or source.finished[-1][0] >= _best_reachable(best, t, opts)


def _best_reachable(logprob: float, t: int, opts: _Options) -> float:
    """The highest score any continuation of a live beam with summed log-prob ``logprob`` can get."""
    longest = opts.max_steps if opts.alpha > 0 else t + 1
    return logprob / gnmt_length_penalty(longest, opts.alpha)


def _finish_live(sources: list[_Source], scores: Tensor, tokens: Tensor, opts: _Options) -> None:
    """At the step limit, the live beams of unfinished sources become (unfinished) hypotheses."""
    lp = gnmt_length_penalty(tokens.shape[1], opts.alpha)
    K = scores.shape[1]
    for b, source in enumerate(sources):
        if source.done:
            continue
        for j, score in enumerate(scores[b].tolist()):
            if math.isfinite(score):
                source.add((score / lp, tokens[b * K + j].tolist()), opts.beam_size)


def _check_options(beam_size: int, steps: int, steps_name: str, alpha: float, eos_id: int, vocab: int) -> None:
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1, got {beam_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{steps_name} must be an integer >= 1, got {steps!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"length_penalty must be a finite number, got {alpha!r}")
    _check_id(eos_id, "eos_id", vocab)


def _check_id(token_id: int, name: str, vocab: int) -> None:
    if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab:
        raise ValueError(f"{name} must be a token id in [0, {vocab}), got {token_id!r}")
