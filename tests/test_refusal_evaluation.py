"""Evaluation under the four conditions, on our own MoE DecoderLM and a transformers model."""

from __future__ import annotations

import pytest
import torch

from moeformer.refusal.evaluation import CONDITIONS, evaluate, text_loss
from moeformer.refusal.lm import RefusalError

pytest.importorskip("transformers")
from refusal_models import HARMFUL, HARMLESS, hf_chat_lm, native_chat_lm  # noqa: E402


@pytest.mark.parametrize("make", [native_chat_lm, lambda: hf_chat_lm("qwen2_moe")], ids=["moeformer", "qwen2_moe"])
def test_every_condition_runs_and_leaves_the_model_unchanged(make, single_thread):
    lm = make()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    r = torch.randn(lm.d_model) * 4
    report = evaluate(lm, r, 1, HARMFUL[:3], HARMLESS[:3], max_new_tokens=3, batch_size=2)
    assert [x.condition for x in report.results] == list(CONDITIONS)
    rows = {x.condition: x for x in report.results}
    assert rows["baseline"].kl == pytest.approx(0.0, abs=1e-6)
    assert rows["orthogonalized"].kl == pytest.approx(rows["ablation"].kl, abs=1e-4)
    assert rows["orthogonalized"].loss == pytest.approx(rows["ablation"].loss, abs=1e-4)
    assert all(len(x.completions["harmful"]) == 3 for x in report.results)
    assert "| actadd |" in report.table() and report.to_dict()["layer"] == 1
    assert "loss (harmless prompts) |" in report.table()
    for k, v in lm.model.state_dict().items():  # the orthogonalized condition edits a copy
        torch.testing.assert_close(v, before[k])


def test_text_loss_is_the_mean_token_cross_entropy():
    lm = hf_chat_lm("llama")
    texts = ["how do i bake a cake", "write a poem"]
    expected = []
    for t in texts:
        ids = torch.tensor([lm.encode(t, special_tokens=True)])
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, :-1]
        expected.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    want = float(torch.cat(expected).mean())
    assert text_loss(lm, texts, batch_size=1) == pytest.approx(want, abs=1e-5)
    assert text_loss(lm, texts, batch_size=2) == pytest.approx(want, abs=1e-5)  # padding changes nothing


def test_bad_conditions_are_refused():
    lm = hf_chat_lm("llama")
    r = torch.randn(lm.d_model)
    texts = evaluate(lm, r, 1, HARMFUL[:2], HARMLESS[:2], conditions=["baseline"], loss_texts=["a plain text"],
                     max_new_tokens=1)  # fmt: skip
    assert "loss (given texts) |" in texts.table() and texts.to_dict()["loss_on"] == "given texts"
    with pytest.raises(RefusalError, match="unknown conditions"):
        evaluate(lm, r, 1, HARMFUL, HARMLESS, conditions=["baseline", "steer"])
    with pytest.raises(RefusalError, match="needs the direction's layer"):
        evaluate(lm, r, None, HARMFUL, HARMLESS)
