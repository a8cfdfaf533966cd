"""Evaluation: BLEU / chrF against sacrebleu (Chinese tokenization), perplexity and loss by hand."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
from torch import Tensor

from moeformer.evaluate import (
    LossTotals,
    bleu,
    bleu_tokenizer,
    chrf,
    lm_loss,
    perplexity,
    seq2seq_loss,
    translation_scores,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PAD = 0
EN_HYPS = ["The cat sat on the mat.", "There is a dog in the garden today."]
EN_REFS = ["The cat is sitting on the mat.", "A dog is in the garden today."]


def test_identical_hypotheses_score_100():
    """A perfect corpus scores 100 BLEU and 100 chrF, in English and in Chinese."""
    zh = ["你好吗？", "这条河太宽了。"]
    assert bleu(EN_REFS, EN_REFS, target_lang="en") == pytest.approx(100.0)
    assert bleu(zh, zh, target_lang="zh") == pytest.approx(100.0)
    assert chrf(zh, zh) == pytest.approx(100.0)


def test_scores_match_sacrebleu_called_directly():
    """bleu and chrf equal sacrebleu's corpus_bleu (13a) / corpus_chrf on a small English corpus."""
    assert bleu(EN_HYPS, EN_REFS, target_lang="en") == pytest.approx(sacrebleu.corpus_bleu(EN_HYPS, [EN_REFS]).score)
    assert chrf(EN_HYPS, EN_REFS) == pytest.approx(sacrebleu.corpus_chrf(EN_HYPS, [EN_REFS]).score)
    assert 0 < bleu(EN_HYPS, EN_REFS, target_lang="en") < 100


def test_chinese_needs_the_zh_tokenizer():
    """Unspaced Chinese: 13a sees one token per sentence and gives 0; zh tokenization scores partial matches."""
    hyps, refs = ["我喜欢吃苹果。", "今天天气很好。"], ["我喜欢吃香蕉。", "今天天气不错。"]
    zh = bleu(hyps, refs, target_lang="zh")
    assert zh == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    assert 10 < zh < 100
    assert sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score == pytest.approx(0.0, abs=1e-9)
    assert bleu(hyps, refs, target_lang="zh-CN") == zh


def test_translation_scores_carry_signatures():
    """translation_scores returns both metrics and sacrebleu signatures naming the tokenizer."""
    scores = translation_scores(["你好吗？"], ["你好吗？"], target_lang="zh")
    assert scores.bleu == pytest.approx(100.0) and scores.chrf == pytest.approx(100.0)
    assert "tok:zh" in scores.bleu_signature and "nc:6" in scores.chrf_signature
    assert "tok:13a" in translation_scores(EN_HYPS, EN_REFS, target_lang="en").bleu_signature


def test_bleu_tokenizer_choice():
    """zh, zh-CN, zh_Hant and ZH use "zh"; other languages use "13a"; an empty code raises."""
    assert [bleu_tokenizer(c) for c in ("zh", "zh-CN", "zh_Hant", "ZH", "en", "de")] == ["zh"] * 4 + ["13a"] * 2
    with pytest.raises(ValueError, match="target_lang"):
        bleu_tokenizer("")


@pytest.mark.parametrize(
    ("hyps", "refs", "error", "match"),
    [
        (["a", "b"], ["a"], ValueError, "2 hypotheses but 1 references"),
        ([], [], ValueError, "no hypotheses"),
        ("a b", ["a b"], TypeError, "list of strings"),
        (["a", None], ["a", "b"], TypeError, r"hypotheses\[1\] must be a string"),
    ],
)
def test_bad_inputs_raise(hyps, refs, error, match):
    """Mismatched lengths, empty corpora and non-strings raise clear errors for both metrics."""
    with pytest.raises(error, match=match):
        bleu(hyps, refs, target_lang="en")
    with pytest.raises(error, match=match):
        chrf(hyps, refs)


def by_hand_nll(logits: Tensor, tokens: Tensor, real: list[list[bool]]) -> tuple[float, int]:
    """Sum of -log softmax(logits[b, t])[tokens[b, t + 1]] over pairs of real tokens, in plain Python."""
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if real[b][t] and real[b][t + 1]:
                row = logits[b, t].tolist()
                top = max(row)
                log_z = top + math.log(sum(math.exp(v - top) for v in row))
                total += log_z - row[int(tokens[b, t + 1])]
                count += 1
    return total, count


@torch.no_grad()
def test_perplexity_equals_hand_computation(make_lm):
    """perplexity = exp(mean NLL) over real next-token pairs, computed with log-sum-exp by hand."""
    model = make_lm()
    tokens = torch.tensor([[0, 0, 5, 9, 4, 7], [3, 8, 8, 2, 6, 1]])
    mask = tokens == PAD
    total, count = by_hand_nll(model(tokens, padding_mask=mask).logits, tokens, (~mask).tolist())
    assert count == 8
    totals = lm_loss(model, [(tokens, mask)])
    assert totals.tokens == count and totals.nll == pytest.approx(total, rel=1e-5)
    assert perplexity(model, [(tokens, mask)]) == pytest.approx(math.exp(total / count), rel=1e-5)


def pad_rows(rows: list[list[int]], *, left: bool) -> tuple[Tensor, Tensor]:
    width = max(map(len, rows))
    padded = [[PAD] * (width - len(r)) + r if left else r + [PAD] * (width - len(r)) for r in rows]
    tokens = torch.tensor(padded)
    mask = torch.tensor([[left and i < width - len(r) or not left and i >= len(r) for i in range(width)] for r in rows])
    return tokens, mask


@torch.no_grad()
def test_perplexity_ignores_padding_and_batching(make_lm):
    """Left padding, right padding and one sequence per batch all give the same perplexity."""
    model = make_lm()
    rows = [[5, 9, 4, 7, 11], [3, 8], [12, 30, 6, 1]]
    alone = perplexity(model, [(torch.tensor([r]), None) for r in rows])
    for left in (True, False):
        assert perplexity(model, [pad_rows(rows, left=left)]) == pytest.approx(alone, rel=1e-5)
    assert lm_loss(model, [pad_rows(rows, left=True)]).tokens == 4 + 1 + 3


@torch.no_grad()
def test_seq2seq_loss_equals_cross_entropy(make_seq2seq):
    """seq2seq_loss sums the teacher-forced cross-entropy of real target tokens, padding excluded."""
    model = make_seq2seq()
    src = [torch.tensor([[4, 5, 6, 7]]), torch.tensor([[8, 9]])]
    tgt = [torch.tensor([[1, 10, 11, 12, 2]]), torch.tensor([[1, 13, 2]])]
    expected_nll, expected_count = 0.0, 0
    for s, t in zip(src, tgt):
        logits = model(s, t[:, :-1]).logits
        expected_nll += float(torch.nn.functional.cross_entropy(logits[0], t[0, 1:], reduction="sum"))
        expected_count += t.shape[1] - 1
    src_b, src_mask = pad_rows([s[0].tolist() for s in src], left=False)
    tgt_b, tgt_mask = pad_rows([t[0].tolist() for t in tgt], left=False)
    totals = seq2seq_loss(model, [(src_b, tgt_b, src_mask, tgt_mask)])
    assert totals.tokens == expected_count == 6
    assert totals.nll == pytest.approx(expected_nll, rel=1e-5)


def test_eval_mode_is_used_and_restored(make_lm):
    """lm_loss evaluates without dropout and hands the model back in the mode it had."""
    model = make_lm(dropout=0.5).train()
    tokens = torch.tensor([[5, 9, 4, 7, 11]])
    first = lm_loss(model, [(tokens, None)]).nll
    assert model.training
    assert lm_loss(model, [(tokens, None)]).nll == first


def test_no_predictions_raises():
    """A loss over no predictions (only 1-token sequences) refuses to invent a perplexity."""
    with pytest.raises(ValueError, match="no predictions"):
        _ = LossTotals(0.0, 0).perplexity
