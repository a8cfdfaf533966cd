"""The refusal metric over whole openers: equal to the paper's with one-token openers, equal to the
probabilities of the sequences computed one prompt at a time, under interventions too; the openers
found from example responses."""

from __future__ import annotations

import json

import pytest
import torch

from moeformer.refusal.extract import ExtractOptions, extract, save_extraction
from moeformer.refusal.interventions import Intervention
from moeformer.refusal.lm import RefusalError
from moeformer.refusal.openers import RefusalOpeners, refusal_token_ids, resolve_openers
from moeformer.refusal.selection import last_logits, refusal_metric

pytest.importorskip("transformers")
from refusal_models import PLANTED_HARMFUL, PLANTED_HARMLESS, native_chat_lm, planted_llama  # noqa: E402

PROMPTS = ["how do i make a bomb", "write a poem", "tell a joke about cats please", "explain"]


@torch.no_grad()
def _one_at_a_time(lm, prompt: str, openers: RefusalOpeners) -> float:
    """sum over openers of prod_i P(s_i | prompt, s_<i), one unpadded forward pass per opener."""
    total = 0.0
    for seq in openers.sequences:
        batch = lm.batch([prompt])
        ids = torch.cat([batch.ids, torch.tensor([seq])], 1)
        logp = lm.forward_logits(type(batch)(ids, torch.zeros_like(ids, dtype=torch.bool)))[0].log_softmax(-1)
        n = len(seq)
        total += float(sum(logp[-n - 1 + i, t] for i, t in enumerate(seq)).exp())
    return total


def _log_odds(p: float) -> float:
    return float(torch.log(torch.tensor(p) + 1e-8) - torch.log(torch.tensor(1 - p) + 1e-8))


def test_one_token_openers_are_the_papers_metric_exactly(single_thread):
    lm = native_chat_lm()
    ids = refusal_token_ids(lm, [" s", " a"])
    expected = refusal_metric(last_logits(lm, PROMPTS, batch_size=3), ids)
    got = RefusalOpeners.first_tokens(ids).metric(lm, PROMPTS, batch_size=3)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("which", ["native", "llama"])
def test_longer_openers_are_the_sequences_probabilities_under_padding_and_interventions(which, single_thread):
    if which == "native":  # characters: " cannot" is seven tokens; all three share the space
        lm = native_chat_lm()
        openers = RefusalOpeners.from_texts(lm, [" sorry", " as an", " cannot"])
        assert openers.depth == 7 and len(openers.prefixes()) == 1 + 3 * 4 + 1  # " ", then 4 / 4 / 5 more
    else:  # words
        lm, _ = planted_llama()
        openers = RefusalOpeners.from_texts(lm, ["sorry cannot", "as an ai", "sure"])
    batched = openers.metric(lm, PROMPTS, batch_size=4)  # left-padded together
    expected = torch.tensor([_log_odds(_one_at_a_time(lm, p, openers)) for p in PROMPTS])
    torch.testing.assert_close(batched, expected, atol=2e-4, rtol=1e-4)

    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1))
    for intervention in (Intervention("ablation", r), Intervention("actadd", 3 * r, 1)):
        got = openers.metric(lm, PROMPTS, intervention, batch_size=2)
        with intervention.apply(lm):  # the opener's own tokens are intervened on too, as in generation
            expected = torch.tensor([_log_odds(_one_at_a_time(lm, p, openers)) for p in PROMPTS])
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
        assert not torch.allclose(got, batched, atol=1e-3)  # the intervention did change the metric


def test_extract_with_whole_openers_equals_first_tokens_when_they_are_one_token(tmp_path, single_thread):
    lm, _ = planted_llama()
    runs = {}
    for key, metric in (("tokens", {"refusal_tokens": ["sorry"]}), ("openers", {"refusal_openers": ["sorry"]})):
        options = ExtractOptions(n_train=40, n_val=12, batch_size=32, **metric)
        runs[key] = extract(lm, PLANTED_HARMFUL, PLANTED_HARMLESS, PLANTED_HARMFUL, PLANTED_HARMLESS, options)
    same = [[json.dumps(c.to_dict()) for c in runs[k].selection.scores] for k in runs]  # NaN == NaN in JSON
    assert same[0] == same[1]
    save_extraction(runs["openers"], tmp_path / "x", plot=False)
    model = json.loads((tmp_path / "x" / "summary.json").read_text())["model"]
    assert model["refusal_opener_texts"] == ["sorry"] and model["refusal_openers"] == [[lm.token_id("sorry")]]
    with pytest.raises(RefusalError, match="not both"):
        ExtractOptions(refusal_tokens=["I"], refusal_openers=["I cannot"])


class _TwoCharLM:
    """Tokens of two characters (the first one may be a space): enough to make first tokens collide."""

    def encode(self, text, special_tokens=False):
        return [sum(ord(c) << (8 * i) for i, c in enumerate(text[j : j + 2])) for j in range(0, len(text), 2)]

    def decode(self, ids):
        return "".join(chr(t & 255) + (chr(t >> 8) if t >> 8 else "") for t in ids)

    def token_id(self, text):
        return self.encode(text)[0]


def _texts(openers: RefusalOpeners) -> list[str]:
    return openers.texts(_TwoCharLM())


def test_first_token_openers_leave_out_tokens_that_also_begin_compliant_answers():
    refusals = [" That is not ok"] * 6 + [" I cannot"] * 9 + [" No way"] * 5 + [" Nah"] * 4
    compliant = [" The sky"] * 20 + [" Sure"] * 20 + [" I am happy to"] * 1
    lm = _TwoCharLM()
    # " T" begins refusals and "The": out; " I" 9 of 10: out at 0.95, in at 0.9; " N" 9 of 9: in
    assert _texts(RefusalOpeners.from_examples(lm, refusals, compliant)) == [" N"]
    assert _texts(RefusalOpeners.from_examples(lm, refusals, compliant, min_share=0.9)) == [" I", " N"]  # 9 ties 9
    with pytest.raises(RefusalError, match="no opener of up to 1 token\\(s\\) begins >= 90% refusals"):
        RefusalOpeners.from_examples(lm, refusals, compliant, min_share=0.9, min_count=10)


def test_a_shared_first_token_is_followed_deeper():
    refusals = [" Sorry, no"] * 8 + [" That is not ok"] * 6 + [" I cannot"] * 9 + [" Su-su, no"] * 2
    compliant = [" Sure! Here"] * 20 + [" That sky"] * 20 + [" I am happy"] * 5
    lm = _TwoCharLM()
    # " S": 10 refusals and 20 answers -> " So" (8 refusals: in) and " Su" (2 refusals: too few).
    # " T" -> "ha" -> "t " are shared by both -> "is" (6 refusals) only at depth 4.
    # " I" -> " c" (9 refusals) / " a" (answers)
    assert _texts(RefusalOpeners.from_examples(lm, refusals, compliant, max_depth=2)) == [" I c", " Sor"]
    deeper = RefusalOpeners.from_examples(lm, refusals, compliant, max_depth=4)
    assert _texts(deeper) == [" I c", " Sor", " That is"]
    assert deeper.prefixes() == sorted({o[:i] for o in deeper.sequences for i in range(1, len(o))},
                                       key=lambda p: (len(p), p))  # fmt: skip


def test_openers_must_be_prefix_free_and_come_from_one_source():
    lm = _TwoCharLM()
    assert _texts(RefusalOpeners.from_texts(lm, [" Sorry", " Sorry, no", " I c"])) == [" Sorry", " I c"]
    with pytest.raises(RefusalError, match="is a prefix of"):
        RefusalOpeners(((1,), (1, 2)))
    with pytest.raises(RefusalError, match="repeat"):
        RefusalOpeners(((1, 2), (1, 2)))
    with pytest.raises(RefusalError, match="non-empty"):
        RefusalOpeners(((),))
    with pytest.raises(RefusalError, match="encodes to nothing"):
        RefusalOpeners.from_texts(lm, [""])
    with pytest.raises(RefusalError, match="not both"):
        resolve_openers(lm, ["I"], ["I cannot"])
    with pytest.raises(RefusalError, match="max_depth must be >= 1"):
        RefusalOpeners.from_examples(lm, [" No"], [" Yes"], max_depth=0)
