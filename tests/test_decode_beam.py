"""Beam search: greedy at beam 1, exhaustive search at a full beam, batching, padding, limits, errors."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from moeformer.decode import greedy_generate, greedy_translate
from moeformer.decode.beam import beam_generate, beam_translate, gnmt_length_penalty
from moeformer.models.outputs import EncoderOutput, FFNReports

BOS, EOS, PAD = 1, 17, 0
# With these tiny random models and sources, greedy decoding ends at varied lengths for these EOS ids.
S2S_EOS, LM_EOS = (9, 19, 26), (13, 18)

pytestmark = pytest.mark.usefixtures("single_thread")


def sources(n: int, length: int, vocab: int, seed: int = 1) -> Tensor:
    """Random source ids that avoid the special tokens 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g)


def strip(row: Tensor, eos_id: int) -> list[int]:
    """A greedy output row up to (not including) its first EOS."""
    ids = row.tolist()
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def translation_score(model, src: Tensor, hyp: list[int], *, eos_id: int, max_len: int, alpha: float) -> float:
    """log P(hyp [+ EOS] | src) / lp from one teacher-forced forward pass (src: (1, S))."""
    target = hyp + [eos_id] if len(hyp) < max_len else hyp
    tgt_in = torch.tensor([[BOS] + target[:-1]])
    logprobs = model(src, tgt_in).logits[0].double().log_softmax(-1)
    total = sum(float(logprobs[t, y]) for t, y in enumerate(target))
    return total / gnmt_length_penalty(len(target), alpha)


def lm_score(model, prompt: Tensor, hyp: list[int], *, eos_id: int, max_new: int, alpha: float) -> float:
    """log P(hyp [+ EOS] | prompt) / lp from one full forward pass (prompt: (1, T))."""
    target = hyp + [eos_id] if len(hyp) < max_new else hyp
    ids = torch.cat([prompt, torch.tensor([target[:-1]], dtype=torch.long)], dim=1)
    logprobs = model(ids).logits[0, prompt.shape[1] - 1 :].double().log_softmax(-1)
    total = sum(float(logprobs[t, y]) for t, y in enumerate(target))
    return total / gnmt_length_penalty(len(target), alpha)


class BigramModel:
    """A fake model whose next-token distribution depends on the last token only: probs[last]."""

    def __init__(self, probs: list[list[float]]) -> None:
        self.logits = torch.tensor(probs, dtype=torch.float64).log().float()  # zero probability -> -inf
        self.config = SimpleNamespace(vocab_size=len(probs))
        self.calls = 0

    def encode(self, src: Tensor, *, src_padding_mask: Tensor | None = None) -> EncoderOutput:
        return EncoderOutput(torch.zeros(src.shape[0], src.shape[1], 1), src_padding_mask, FFNReports())

    def decode(self, tgt: Tensor, memory: EncoderOutput, *, cache=None) -> SimpleNamespace:
        assert memory.hidden.shape[0] == tgt.shape[0], "memory must follow the beams"
        self.calls += 1
        return SimpleNamespace(logits=self.logits[tgt])

    def __call__(self, tokens: Tensor, *, padding_mask: Tensor | None = None, cache=None) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(logits=self.logits[tokens])

    def new_cache(self) -> SimpleNamespace:
        return SimpleNamespace(reorder=lambda index: None)


# ids: 0 pad, 1 BOS, 2 EOS, 3 "a", 4 "b". Greedy takes "a" (0.55), whose continuations are all weak
# (and "a" beats EOS after it), so greedy never ends; "b" EOS has probability 0.45 * 0.9.
TRAP = [
    [0.0, 0.0, 0.0, 0.5, 0.5],
    [0.0, 0.0, 0.0, 0.55, 0.45],
    [0.0, 0.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 0.33, 0.34, 0.33],
    [0.0, 0.0, 0.9, 0.05, 0.05],
]


def test_gnmt_length_penalty_formula():
    """lp(|Y|) = ((5 + |Y|) / 6)^alpha: 1 at length 1, 1 everywhere at alpha 0."""
    assert gnmt_length_penalty(1, 0.6) == pytest.approx(1.0)
    assert gnmt_length_penalty(7, 0.6) == pytest.approx(2.0**0.6)
    assert gnmt_length_penalty(30, 0.0) == 1.0


@torch.no_grad()
def test_beam_finds_the_likelier_sequence_greedy_misses():
    """On the hand-built bigram trap greedy runs to max_len with "a"s; beam search returns "b" EOS."""
    model = BigramModel(TRAP)
    src = torch.tensor([[3, 4]])
    greedy = greedy_translate(model, src, bos_id=1, eos_id=2, max_len=6)
    assert greedy.tolist() == [[3, 3, 3, 3, 3, 3]]
    assert beam_translate(model, src, bos_id=1, eos_id=2, max_len=6, beam_size=2, length_penalty=0.0) == [[4]]
    assert beam_generate(model, torch.tensor([[1]]), max_new_tokens=6, eos_id=2, beam_size=2) == [[4]]


@torch.no_grad()
@pytest.mark.parametrize("eos", S2S_EOS)
def test_beam_size_one_equals_greedy_translate(make_seq2seq, eos):
    """beam_size=1 returns greedy_translate's tokens, EOS and what follows it removed."""
    model = make_seq2seq()
    src = sources(6, 7, model.config.vocab_size)
    greedy = greedy_translate(model, src, bos_id=BOS, eos_id=eos, max_len=10)
    beam = beam_translate(model, src, bos_id=BOS, eos_id=eos, max_len=10, beam_size=1)
    assert beam == [strip(row, eos) for row in greedy]
    assert len({len(h) for h in beam}) > 1, "the check should cover finished and cut-off rows"


@torch.no_grad()
@pytest.mark.parametrize("eos", LM_EOS)
def test_beam_size_one_equals_greedy_generate(make_lm, eos):
    """beam_size=1 on a left-padded batch returns greedy_generate's tokens up to EOS."""
    model = make_lm()
    prompt, mask = left_pad([sources(1, n, 37, seed=n)[0] for n in (3, 6, 5, 4, 2, 5)], 6)
    greedy = greedy_generate(model, prompt, padding_mask=mask, max_new_tokens=8, eos_id=eos)
    beam = beam_generate(model, prompt, padding_mask=mask, max_new_tokens=8, eos_id=eos, beam_size=1)
    assert beam == [strip(row, eos) for row in greedy]
    assert len({len(h) for h in beam}) > 1, "the check should cover finished and cut-off rows"


@torch.no_grad()
@pytest.mark.parametrize("eos", S2S_EOS)
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beam_scores_higher_than_greedy(make_seq2seq, alpha, eos):
    """Summed over sources, beam results outscore greedy ones under the same length-penalised score.

    Per source this is no theorem: the greedy prefix can fall out of the beam and then end better
    (source 5 with eos 9 does here), so the exhaustive test below holds the per-source guarantee.
    """
    model = make_seq2seq()
    src = sources(6, 7, model.config.vocab_size)
    greedy = greedy_translate(model, src, bos_id=BOS, eos_id=eos, max_len=10)
    beam = beam_translate(model, src, bos_id=BOS, eos_id=eos, max_len=10, beam_size=4, length_penalty=alpha)
    kw = {"eos_id": eos, "max_len": 10, "alpha": alpha}
    beam_total = sum(translation_score(model, src[i : i + 1], beam[i], **kw) for i in range(6))
    greedy_total = sum(translation_score(model, src[i : i + 1], strip(greedy[i], eos), **kw) for i in range(6))
    assert beam_total > greedy_total


@torch.no_grad()
@pytest.mark.parametrize("alpha", [0.0, 0.6, -0.5])
@pytest.mark.parametrize(("seed", "eos"), [(5, 0), (5, 2), (0, 2)])  # cases where greedy is not optimal
def test_full_beam_equals_exhaustive_search(make_seq2seq, alpha, seed, eos):
    """A beam wider than every prefix set (and than the vocabulary) finds the best of all sequences."""
    V, max_len = 4, 3
    model = make_seq2seq(seed, vocab_size=V, tie_embeddings=False)
    src = torch.tensor([[3, 1, 2, 0, 3]])
    beam = beam_translate(
        model, src, bos_id=1, eos_id=eos, max_len=max_len, beam_size=V * (V - 1) ** 2, length_penalty=alpha,
        early_stop=False,
    )  # fmt: skip
    others = [v for v in range(V) if v != eos]
    candidates = [list(p) for n in range(max_len) for p in itertools.product(others, repeat=n)]
    candidates += [list(p) for p in itertools.product(others, repeat=max_len)]
    kw = {"eos_id": eos, "max_len": max_len, "alpha": alpha}
    scores = [translation_score(model, src, c, **kw) for c in candidates]
    assert beam[0] == candidates[max(range(len(scores)), key=scores.__getitem__)]
    greedy = greedy_translate(model, src, bos_id=1, eos_id=eos, max_len=max_len)
    assert max(scores) >= translation_score(model, src, strip(greedy[0], eos), **kw)


@torch.no_grad()
def test_no_early_stop_scores_at_least_early_stop(make_seq2seq):
    """early_stop=False only searches further, so its results never score lower."""
    model = make_seq2seq()
    src = sources(6, 7, model.config.vocab_size)
    kw = {"bos_id": BOS, "eos_id": 11, "max_len": 10, "beam_size": 3}
    early = beam_translate(model, src, **kw)
    full = beam_translate(model, src, early_stop=False, **kw)
    score = {"eos_id": 11, "max_len": 10, "alpha": 0.6}
    for i, (a, b) in enumerate(zip(early, full)):
        got = translation_score(model, src[i : i + 1], b, **score)
        assert got >= translation_score(model, src[i : i + 1], a, **score) - 1e-6


# BOS -> EOS 0.6 or "a" 0.4; "a" -> "a" 0.99. With alpha = 1 the long "a"s score higher only when
# max_len leaves room: -1.01 / lp(10) = -0.40 beats log 0.6 = -0.51, -0.94 / lp(3) = -0.70 does not.
PATIENCE = [[0.0, 0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.6, 0.4, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]]
PATIENCE += [[0.0, 0.0, 0.01, 0.99, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]]


@torch.no_grad()
@pytest.mark.parametrize(("max_len", "expected"), [(10, [3] * 10), (3, [])])
def test_no_early_stop_searches_while_a_live_beam_can_still_win(max_len, expected):
    """early_stop=True stops at K finished; early_stop=False goes on exactly while a live beam can win."""
    model = BigramModel(PATIENCE)
    src = torch.tensor([[3]])
    kw = {"bos_id": 1, "eos_id": 2, "max_len": max_len, "beam_size": 1, "length_penalty": 1.0}
    assert beam_translate(model, src, **kw) == [[]]
    model.calls = 0
    assert beam_translate(model, src, early_stop=False, **kw) == [expected]
    assert model.calls == (max_len if expected else 1), "the search should stop as soon as nothing can win"


@torch.no_grad()
def test_stops_once_every_source_has_finished():
    """Decoding stops after the step where each source holds beam_size finished hypotheses."""
    likely_eos = [[0.0, 0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.1, 0.5, 0.4]] + [[0.0, 0.0, 0.9, 0.05, 0.05]] * 3
    model = BigramModel(likely_eos)
    out = beam_translate(model, torch.tensor([[3], [4]]), bos_id=1, eos_id=2, max_len=20, beam_size=2)
    assert out == [[3], [3]]
    assert model.calls == 2  # BOS, then the step where "a" EOS and "b" EOS finish


@torch.no_grad()
def test_batched_translate_equals_one_by_one(make_seq2seq):
    """Right-padded sources decoded together give what each gives alone."""
    model = make_seq2seq()
    rows = [sources(1, n, model.config.vocab_size, seed=n)[0] for n in (7, 3, 5, 6)]
    src = torch.full((4, 7), PAD, dtype=torch.long)
    mask = torch.ones(4, 7, dtype=torch.bool)
    for i, row in enumerate(rows):
        src[i, : len(row)], mask[i, : len(row)] = row, False
    kw = {"bos_id": BOS, "eos_id": EOS, "max_len": 9, "beam_size": 3}
    batched = beam_translate(model, src, src_padding_mask=mask, **kw)
    assert batched == [beam_translate(model, row[None], **kw)[0] for row in rows]


def left_pad(rows: list[Tensor], total: int) -> tuple[Tensor, Tensor]:
    """Left-pad 1-D id rows to (len(rows), total), with the padding mask."""
    ids = torch.full((len(rows), total), PAD, dtype=torch.long)
    mask = torch.ones(len(rows), total, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, total - len(row) :], mask[i, total - len(row) :] = row, False
    return ids, mask


@torch.no_grad()
def test_left_padded_generate_equals_one_by_one(make_lm):
    """Left-padded prompts decoded together give what each unpadded prompt gives alone."""
    model = make_lm()
    rows = [sources(1, n, 37, seed=n)[0] for n in (2, 6, 4)]
    prompt, mask = left_pad(rows, 6)
    kw = {"max_new_tokens": 7, "eos_id": 5, "beam_size": 4}
    batched = beam_generate(model, prompt, padding_mask=mask, **kw)
    assert batched == [beam_generate(model, row[None], **kw)[0] for row in rows]


@torch.no_grad()
@pytest.mark.parametrize("eos", LM_EOS)
def test_generate_scores_higher_than_greedy(make_lm, eos):
    """Summed over prompts, beam_generate outscores greedy_generate under the length-penalised score."""
    model = make_lm()
    prompt = sources(6, 5, 37)
    greedy = greedy_generate(model, prompt, max_new_tokens=8, eos_id=eos)
    beam = beam_generate(model, prompt, max_new_tokens=8, eos_id=eos, beam_size=4)
    kw = {"eos_id": eos, "max_new": 8, "alpha": 0.6}
    beam_total = sum(lm_score(model, prompt[i : i + 1], beam[i], **kw) for i in range(6))
    assert beam_total > sum(lm_score(model, prompt[i : i + 1], strip(greedy[i], eos), **kw) for i in range(6))


@torch.no_grad()
@pytest.mark.parametrize("max_len", [1, 2, 5])
def test_respects_max_len(make_seq2seq, max_len):
    """No hypothesis is longer than max_len; the never-ending bigram trap is cut exactly there."""
    model = make_seq2seq()
    out = beam_translate(model, sources(5, 6, 37), bos_id=BOS, eos_id=EOS, max_len=max_len, beam_size=3)
    assert len(out) == 5 and all(len(h) <= max_len for h in out)
    trap = [[0.0, 0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.6, 0.4]] + [[0.0, 0.0, 0.01, 0.5, 0.49]] * 3
    got = beam_generate(BigramModel(trap), torch.tensor([[1]]), max_new_tokens=max_len, eos_id=2, beam_size=2)
    assert len(got[0]) == max_len


@torch.no_grad()
def test_beam_wider_than_vocabulary(make_lm):
    """beam_size > vocab works: empty beam slots never win, and results are real token ids."""
    model = make_lm(vocab_size=5)
    prompt = torch.tensor([[3, 4, 1], [1, 1, 2]])
    out = beam_generate(model, prompt, max_new_tokens=4, eos_id=2, beam_size=12)
    assert len(out) == 2 and all(0 <= t < 5 and t != 2 for h in out for t in h)
    wide = beam_generate(model, prompt, max_new_tokens=4, eos_id=2, beam_size=12, early_stop=False)
    for i in range(2):
        kw = {"eos_id": 2, "max_new": 4, "alpha": 0.6}
        assert math.isfinite(lm_score(model, prompt[i : i + 1], wide[i], **kw))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beam_size": 0}, "beam_size must be an integer >= 1"),
        ({"max_len": 0}, "max_len must be an integer >= 1"),
        ({"eos_id": 37}, r"eos_id must be a token id in \[0, 37\)"),
        ({"bos_id": -1}, r"bos_id must be a token id"),
        ({"length_penalty": float("nan")}, "length_penalty must be a finite number"),
    ],
)
def test_translate_rejects_bad_options(make_seq2seq, kwargs, match):
    """Invalid options raise ValueError naming the option."""
    options = {"bos_id": BOS, "eos_id": EOS, "max_len": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        beam_translate(make_seq2seq(), sources(1, 3, 37), **options)


def test_generate_rejects_right_padding(make_lm):
    """A prompt whose last position is padding raises a clear error instead of continuing from a pad."""
    prompt = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        beam_generate(make_lm(), prompt, padding_mask=prompt == 0, max_new_tokens=3, eos_id=2)
