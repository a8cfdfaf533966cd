"""Sampling: filter_logits (temperature, top-k, top-p) by definition, greedy limits, seeds, EOS, errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from moeformer.decode import greedy_generate, greedy_translate
from moeformer.decode.sampling import filter_logits, sample_generate, sample_translate

pytestmark = pytest.mark.usefixtures("single_thread")


def kept(logits: Tensor) -> set[int]:
    """Token ids a filtered 1-D row keeps."""
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def nucleus_by_definition(logits: Tensor, p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches p, by a plain loop."""
    probs = logits.double().softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    chosen, total = set(), 0.0
    for i in order:
        chosen.add(i)
        total += probs[i]
        if total >= p:
            break
    return chosen


def prompts(n: int, length: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 37, (n, length), generator=g)


def test_top_k_keeps_exactly_k_lower_ids_on_ties():
    """top_k keeps exactly k tokens; among logits tied at the cut the lower ids win; values unchanged."""
    logits = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, 2.0])
    for k, expected in [(1, {1}), (2, {1, 2}), (3, {1, 2, 3}), (4, {1, 2, 3, 5}), (6, set(range(6)))]:
        out = filter_logits(logits, top_k=k)
        assert kept(out) == expected
        assert torch.equal(out[list(expected)], logits[list(expected)])
    assert kept(filter_logits(logits, top_k=100)) == set(range(6))


def test_top_k_is_per_row():
    """Each row of a (B, T, V) tensor keeps its own top k."""
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    out = filter_logits(logits, top_k=4)
    for row, filtered in zip(logits.view(-1, 11), out.view(-1, 11)):
        assert kept(filtered) == set(row.topk(4).indices.tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    """top_p keeps the smallest most-likely set with probability >= p, in any token order."""
    logits = torch.tensor([0.15, 0.05, 0.5, 0.3]).log()
    for p, expected in [(1e-6, {2}), (0.45, {2}), (0.79, {2, 3}), (0.81, {0, 2, 3})]:
        assert kept(filter_logits(logits, top_p=p)) == expected
    assert kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3}
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        row = torch.randn(13, generator=g) * 2
        p = float(torch.rand((), generator=g))
        assert kept(filter_logits(row, top_p=p)) == nucleus_by_definition(row, p)


def test_top_p_applies_after_temperature_and_top_k():
    """top_p measures probability after temperature and top-k, so both change which tokens it keeps."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert kept(filter_logits(logits, top_p=0.8)) == {0, 1}
    assert kept(filter_logits(logits, top_p=0.8, temperature=10.0)) == {0, 1, 2, 3}
    assert kept(filter_logits(logits, top_p=0.6, temperature=10.0)) == {0, 1, 2}  # 0.29 + 0.26 < 0.6
    assert kept(filter_logits(logits, top_p=0.6, top_k=3, temperature=10.0)) == {0, 1}  # 0.37 + 0.33 >= 0.6


def test_temperature_scales_logits():
    """Temperature T divides the logits: T > 1 flattens the distribution, T < 1 sharpens it."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2.0)
    torch.testing.assert_close(filter_logits(logits), logits)

    def entropy(t: float) -> float:
        scaled = filter_logits(logits, temperature=t)
        return float(-(scaled.softmax(-1) * scaled.log_softmax(-1)).sum())

    assert entropy(0.5) < entropy(1.0) < entropy(3.0)


def test_temperature_zero_keeps_only_the_argmax():
    """temperature=0 keeps the argmax alone (the first on ties), whatever top_k and top_p say."""
    logits = torch.tensor([[0.0, 4.0, 4.0, 1.0], [5.0, 0.0, 1.0, 2.0]])
    out = filter_logits(logits, temperature=0.0, top_k=3, top_p=0.9)
    assert [kept(row) for row in out] == [{1}, {0}]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature must be a number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a number >= 0"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"top_k": 0}, "top_k must be None or an integer >= 1"),
        ({"top_k": 2.5}, "top_k must be None or an integer >= 1"),
        ({"top_p": 0.0}, r"top_p must be None or a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be None or a number in \(0, 1\]"),
    ],
)
def test_invalid_options_raise(make_lm, kwargs, match):
    """Invalid temperature, top_k or top_p raise ValueError in filter_logits and in generation alike."""
    with pytest.raises(ValueError, match=match):
        filter_logits(torch.zeros(5), **kwargs)
    with pytest.raises(ValueError, match=match):
        sample_generate(make_lm(), prompts(1, 3), max_new_tokens=2, **kwargs)


@torch.no_grad()
@pytest.mark.parametrize("options", [{"temperature": 0.0}, {"top_k": 1}], ids=["temperature0", "top_k1"])
def test_greedy_limits_equal_greedy_decoding(make_lm, make_seq2seq, options):
    """temperature=0 and top_k=1 reproduce greedy_generate / greedy_translate exactly."""
    lm = make_lm()
    prompt, mask = prompts(3, 5), torch.zeros(3, 5, dtype=torch.bool)
    prompt[0, :2], mask[0, :2] = 0, True  # one left-padded row
    expected = greedy_generate(lm, prompt, padding_mask=mask, max_new_tokens=7, eos_id=13)
    got = sample_generate(lm, prompt, padding_mask=mask, max_new_tokens=7, eos_id=13, **options)
    assert torch.equal(got, expected)
    s2s = make_seq2seq()
    src = prompts(3, 6, seed=2)
    expected = greedy_translate(s2s, src, bos_id=1, eos_id=9, max_len=8)
    assert torch.equal(sample_translate(s2s, src, bos_id=1, eos_id=9, max_len=8, **options), expected)


@torch.no_grad()
def test_seeded_generator_reproduces_output(make_lm, make_seq2seq):
    """The same seed gives the same samples; another seed gives different ones."""
    lm, s2s = make_lm(), make_seq2seq()

    def lm_run(seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return sample_generate(lm, prompts(4, 5), max_new_tokens=10, top_p=0.95, generator=gen)

    def s2s_run(seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return sample_translate(s2s, prompts(4, 5), bos_id=1, eos_id=2, max_len=10, temperature=1.5, generator=gen)

    for run in (lm_run, s2s_run):
        assert torch.equal(run(0), run(0))
        assert not torch.equal(run(0), run(1))


@torch.no_grad()
def test_samples_stay_inside_the_filtered_set(make_lm):
    """Every sampled token is among the top_k of its step (checked against an uncached forward pass)."""
    lm = make_lm()
    prompt = prompts(6, 4)
    out = sample_generate(lm, prompt, max_new_tokens=6, top_k=3, generator=torch.Generator().manual_seed(0))
    logits = lm(torch.cat([prompt, out[:, :-1]], dim=1)).logits[:, prompt.shape[1] - 1 :]
    allowed = logits.topk(3, dim=-1).indices
    assert bool((allowed == out[..., None]).any(-1).all())
    assert len(set(out.flatten().tolist())) > 3, "sampling should not collapse to greedy here"


@torch.no_grad()
def test_finished_rows_keep_emitting_eos(make_lm):
    """After a row samples EOS it emits only EOS; decoding stops once every row has ended."""
    lm = make_lm(vocab_size=5)
    prompt = torch.randint(1, 5, (16, 3), generator=torch.Generator().manual_seed(0))
    out = sample_generate(lm, prompt, max_new_tokens=40, eos_id=3, generator=torch.Generator().manual_seed(0))
    ends = [row.index(3) for row in out.tolist()]  # raises if a row never ended
    assert len(set(ends)) > 3, "rows should end at different steps"
    for row, end in zip(out.tolist(), ends):
        assert row[end:] == [3] * (len(row) - end)
    assert out.shape[1] == max(ends) + 1 < 40


@torch.no_grad()
def test_translate_respects_max_len_and_rejects_bad_lengths(make_seq2seq):
    """sample_translate returns at most max_len tokens; max_len < 1 raises ValueError."""
    s2s = make_seq2seq()
    out = sample_translate(s2s, prompts(2, 4), bos_id=1, eos_id=2, max_len=3, generator=torch.Generator())
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 3
    with pytest.raises(ValueError, match="max_len must be an integer >= 1"):
        sample_translate(s2s, prompts(2, 4), bos_id=1, eos_id=2, max_len=0)


def test_filter_output_is_a_distribution_after_softmax():
    """Filtered logits always keep at least one token, so softmax gives a proper distribution."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 20, generator=g)
    for options in ({"top_p": 1e-9}, {"top_k": 1, "top_p": 0.5}, {"temperature": 0.01, "top_p": 0.3}):
        probs = filter_logits(logits, **options).softmax(-1)
        assert not bool(probs.isnan().any())
        torch.testing.assert_close(probs.sum(-1), torch.ones(8))
