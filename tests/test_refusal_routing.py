"""Routing statistics of MoE models for harmful vs harmless prompts, checked against the models' own."""

from __future__ import annotations

import pytest
import torch

from moeformer.refusal.lm import RefusalError
from moeformer.refusal.routing import routing_frequencies, routing_report

pytest.importorskip("transformers")
from refusal_models import HARMFUL, HARMLESS, hf_chat_lm, native_chat_lm  # noqa: E402


def test_mixtral_frequencies_match_its_router_logits():
    lm = hf_chat_lm("mixtral")
    freqs = routing_frequencies(lm, HARMFUL, batch_size=3)
    batch = lm.batch(HARMFUL)
    positions = ((~batch.padding_mask).long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = lm.model(input_ids=batch.ids, attention_mask=(~batch.padding_mask).long(), position_ids=positions,
                       output_router_logits=True)  # fmt: skip
    assert sorted(freqs) == [0, 1, 2]
    for layer, logits in enumerate(out.router_logits):
        chosen = logits.topk(2, dim=-1).indices[~batch.padding_mask.reshape(-1)]
        expected = torch.bincount(chosen.reshape(-1), minlength=4).float()
        torch.testing.assert_close(freqs[layer], expected / expected.sum())


def test_moeformer_frequencies_match_the_layer_statistics():
    lm = native_chat_lm()
    freqs = routing_frequencies(lm, HARMLESS, batch_size=4)
    batch = lm.batch(HARMLESS)
    with torch.no_grad():
        stats = lm.model(batch.ids, padding_mask=batch.padding_mask).reports.stats
    for layer, f in freqs.items():
        counts = stats[f"layers.{layer}"]["tokens_per_expert"]
        torch.testing.assert_close(f, counts / counts.sum())


def test_report_shows_no_difference_for_the_same_prompts_and_measures_ablation():
    lm = hf_chat_lm("qwen2_moe")
    r = torch.randn(lm.d_model) * 5
    same = routing_report(lm, HARMFUL, HARMFUL, r, batch_size=4)
    assert len(same) == 3
    for layer in same:
        assert layer.difference.abs().max() == 0
        d = layer.to_dict()
        assert d["tv_harmful_vs_harmless"] == 0 and 0 <= d["tv_harmful_vs_ablated"] <= 1
    assert any(layer.to_dict()["tv_harmful_vs_ablated"] > 0 for layer in same)  # ablation moves some routing
    report = routing_report(lm, HARMFUL, HARMLESS, r, batch_size=4)
    assert any(layer.difference.abs().max() > 0 for layer in report)
    torch.testing.assert_close(sum(report[0].harmful), torch.tensor(1.0))


def test_dense_models_have_no_routing_to_report():
    with pytest.raises(RefusalError, match="no MoE layer"):
        routing_frequencies(hf_chat_lm("llama"), HARMFUL)


def test_deepseek_v3_dense_first_layers_are_skipped():
    lm = hf_chat_lm("deepseek_v3")
    freqs = routing_frequencies(lm, HARMLESS)
    assert sorted(freqs) == [1, 2] and all(f.shape == (8,) for f in freqs.values())
