"""Text in, text out: translate sentences with a seq2seq model, continue a prompt with a decoder LM.

The id-level decoders (:mod:`~moeformer.decode.greedy`, :mod:`~moeformer.decode.beam`,
:mod:`~moeformer.decode.sampling`) under a tokenizer pair: texts are encoded, batched by length,
decoded and decoded back to text. Loading the model is not done here (:mod:`moeformer.inference`
loads a checkpoint and re-exports these names), so evaluation and training decode through this
module without importing the loaders above them.

translate(model, tokenizers, ["Are you OK?"], beam_size=4)   # one translation per text

Inputs are checked against the model before any decoding: the wrong kind of model, or an input
longer than ``max_seq_len`` that cannot be split, raises ``ValueError`` naming the limit and the
length. What the user should know but is not an error (a long input translated sentence by
sentence, generation stopped at the model's limit) is passed to the ``note`` callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from moeformer.data.batching import pad_batch
from moeformer.data.sentences import join_sentences, split_sentences
from moeformer.data.tokenizer import Tokenizer, TokenizerPair
from moeformer.decode.beam import beam_translate
from moeformer.decode.greedy import greedy_translate
from moeformer.decode.sampling import sample_generate
from moeformer.decode.speculative import speculative_generate

__all__ = ["Note", "Overlong", "generate", "plan_inputs", "require_arch", "translate"]

Note = Callable[[str], None]
Overlong = Literal["refuse", "cut"]  # what translate does with a sentence longer than the model


def require_arch(model: nn.Module, arch: str, task: str) -> None:
    """A clear error instead of an AttributeError deep in decoding when the model cannot do ``task``."""
    have = model.config.arch
    if have != arch:
        kinds = {"seq2seq": "an encoder-decoder (seq2seq) translation model", "decoder": "a decoder-only LM"}
        other = "generate" if have == "decoder" else "translate"
        raise ValueError(f"{task} needs {kinds[arch]}; this model is {kinds[have]} (use `{other}`)")


@torch.no_grad()
def translate(
    model: nn.Module,
    tokenizers: TokenizerPair,
    texts: Sequence[str],
    *,
    beam_size: int = 1,
    batch_size: int = 64,
    max_len: int | None = None,
    length_penalty: float = 0.6,
    note: Note | None = None,
    overlong: Overlong = "refuse",
) -> list[str]:
    """Translations of ``texts`` (greedy when beam_size is 1), one per text, in order, batched by length.

    A blank text translates to "". A text longer than the model's ``max_seq_len`` source tokens is
    split into sentences (. ! ? 。！？), translated piece by piece and joined, and ``note`` is told;
    a single sentence still too long raises ValueError with the limit and its length, before any
    decoding (or, with ``overlong="cut"``, is cut to the limit and ``note`` told).
    """
    require_arch(model, "seq2seq", "translate")
    if beam_size < 1:
        raise ValueError(f"beam size must be at least 1 (1 is greedy), got {beam_size}")
    limit = model.config.max_seq_len
    pieces, owners = plan_inputs(tokenizers.source, texts, limit, note, overlong=overlong)
    max_len = min(max_len or limit, limit)
    outputs = _translate_ids(model, tokenizers, pieces, beam_size, batch_size, max_len, length_penalty)
    grouped: list[list[str]] = [[] for _ in texts]
    for owner, output in zip(owners, outputs, strict=True):
        grouped[owner].append(output)
    return [join_sentences(parts) for parts in grouped]


def plan_inputs(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    limit: int,
    note: Note | None = None,
    *,
    overlong: Overlong = "refuse",
) -> tuple[list[list[int]], list[int]]:
    """Source ids to translate (each <= ``limit`` tokens, EOS included) and the text each belongs to.

    Blank texts get no piece; texts over the limit one piece per sentence. A sentence still over
    the limit raises ValueError (``overlong="refuse"``) or keeps its first ``limit`` tokens and
    tells ``note`` (``"cut"``: for scoring a test set at the end of a run, where stopping loses more).
    """
    pieces: list[list[int]] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        if not text.strip():
            continue
        ids = tokenizer.encode(text, eos=True)
        if len(ids) <= limit:
            pieces.append(ids)
            owners.append(i)
            continue
        sentences = [_fit(tokenizer, s, limit, f"input {i + 1}", overlong, note) for s in split_sentences(text)]
        pieces.extend(sentences)
        owners.extend([i] * len(sentences))
        if note is not None and len(sentences) > 1:
            note(
                f"input {i + 1} has {len(ids)} tokens, more than the model's limit of {limit}: "
                f"translated as {len(sentences)} sentences, one at a time"
            )
    return pieces, owners


def _fit(
    tokenizer: Tokenizer, sentence: str, limit: int, where: str, overlong: Overlong, note: Note | None
) -> list[int]:
    """The ids of one sentence, refused or cut when over ``limit`` (see :func:`plan_inputs`)."""
    ids = tokenizer.encode(sentence, eos=True)
    if len(ids) <= limit:
        return ids
    message = f"{where}: a sentence of {len(ids)} tokens (end of sentence included) starting {sentence[:40]!r}"
    if overlong == "refuse":
        raise ValueError(f"{message} is longer than the model's limit of {limit} tokens; split it")
    if note is not None:
        note(f"{message} was cut to the model's limit of {limit} tokens")
    return [*ids[: limit - 1], tokenizer.eos_id]


def _translate_ids(
    model: nn.Module,
    tokenizers: TokenizerPair,
    encoded: list[list[int]],
    beam_size: int,
    batch_size: int,
    max_len: int,
    length_penalty: float,
) -> list[str]:
    """Decoded translations of source id lists, in order; sorted by length so batches pad little."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    tgt = tokenizers.target
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        src, pad = pad_batch([encoded[i] for i in idx], tokenizers.source.pad_id)
        src, pad = src.to(device), pad.to(device)
        if beam_size == 1:
            rows = greedy_translate(
                model, src, src_padding_mask=pad, bos_id=tgt.bos_id, eos_id=tgt.eos_id, max_len=max_len
            ).tolist()
        else:
            rows = beam_translate(
                model,
                src,
                src_padding_mask=pad,
                bos_id=tgt.bos_id,
                eos_id=tgt.eos_id,
                beam_size=beam_size,
                max_len=max_len,
                length_penalty=length_penalty,
            )
        for i, row in zip(idx, rows):
            out[i] = tgt.decode(row)
    model.train(was_training)
    return out


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizers: TokenizerPair,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    note: Note | None = None,
    speculative: bool = False,
    draft_tokens: int | None = None,
) -> str:
    """Continue ``prompt`` with a decoder-only model (sampling; temperature 0 is greedy).

    ``speculative=True`` (a model trained with ``[model.mtp]``): the MTP modules draft up to
    ``draft_tokens`` tokens (default: the MTP depth) and the main model verifies them in one pass
    (:func:`~moeformer.decode.speculative_generate`: the same greedy output, the same sampling
    distribution); ``note`` gets the acceptance rate.

    The prompt and the new tokens share the model's ``max_seq_len`` positions: a prompt that leaves
    no room raises ValueError with both numbers; generation that stops at the limit before
    ``max_new_tokens`` (and before EOS) tells ``note``.
    """
    require_arch(model, "decoder", "generate")
    tok = tokenizers.source
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenisation; give at least one character")
    limit = model.config.max_seq_len
    if len(ids) >= limit:
        raise ValueError(
            f"the prompt has {len(ids)} tokens; the model reads at most {limit} positions, prompt and new "
            f"tokens together, so a prompt may have at most {limit - 1} tokens: shorten it"
        )
    room = limit - len(ids)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    options = {"max_new_tokens": min(max_new_tokens, room), "temperature": temperature, "top_k": top_k,
               "top_p": top_p, "eos_id": tok.eos_id, "generator": generator}  # fmt: skip
    prompt_ids = torch.tensor([ids], device=device)
    if draft_tokens is not None and not speculative:
        raise ValueError("draft_tokens (--draft-tokens) counts the drafts of speculative decoding: ask for it too "
                         "(speculative=True, --speculative)")
    if speculative:
        result = speculative_generate(model.eval(), prompt_ids, draft_tokens=draft_tokens, **options)
        new = result.tokens[0].tolist()
        if note is not None:
            passes = result.passes + 1  # the prompt's pass gives the first token
            by_depth = ", ".join(f"{a:.0%}" for a in result.acceptance_at)
            per_depth = f"; by depth: {by_depth}" if len(result.acceptance_at) > 1 else ""
            note(f"speculative decoding: {result.accepted} of {result.drafted} drafts accepted "
                 f"({result.acceptance:.0%}{per_depth}), {len(new)} tokens in {passes} passes of the "
                 "main model")  # fmt: skip
    else:
        new = sample_generate(model.eval(), prompt_ids, **options)[0].tolist()
    if note is not None and max_new_tokens > room and len(new) == room and tok.eos_id not in new:
        note(
            f"stopped after {room} new tokens (of {max_new_tokens} asked for): the model's limit is {limit} "
            f"positions and the prompt takes {len(ids)}"
        )
    return tok.decode(new)
