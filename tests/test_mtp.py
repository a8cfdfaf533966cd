"""Multi-token prediction (DeepSeek-V3 section 2.2): config, shapes, causality at every depth, the
loss's alignment, and training with it (per-depth losses in the log and the validation metrics)."""

from __future__ import annotations

import json

import pytest
import torch

from moeformer.model_config import ConfigError, MTPConfig
from moeformer.models import build_model
from moeformer.presets import model_config_from_dict
from moeformer.train.loss import mtp_loss, smoothed_cross_entropy

pytestmark = pytest.mark.usefixtures("single_thread")

V = 40
MOE = {"kind": "deepseek", "n_experts": 6, "top_k": 2, "expert_hidden": 32, "n_shared": 1, "score": "sigmoid"}
MLA = {"kind": "mla", "n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
       "v_head_dim": 8}  # fmt: skip


def mtp_model(depth=2, attention=None, moe=None, seed=0):
    torch.manual_seed(seed)
    config = {"preset": "lm-tiny", "vocab_size": V, "n_layers": 2, "dropout": 0.0, "mtp": {"depth": depth}}
    if attention is not None:
        config["attention"] = attention
    if moe is not None:
        config["moe"] = moe
    return build_model(model_config_from_dict(config)).eval()


def ids(batch=2, length=12, seed=1):
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_validation():
    with pytest.raises(ConfigError, match="depth"):
        MTPConfig(depth=0)
    with pytest.raises(ConfigError, match="weight"):
        MTPConfig(weight=-0.1)
    with pytest.raises(ConfigError, match="late_from"):
        MTPConfig(late_from=1.5)
    schedule = MTPConfig(weight=0.3, late_weight=0.1, late_from=0.5)
    assert [schedule.weight_at(s, 10) for s in (0, 4, 5, 9)] == [0.3, 0.3, 0.1, 0.1]
    assert MTPConfig(weight=0.3).weight_at(9, 10) == 0.3
    with pytest.raises(ConfigError, match="mtp.*decoder-only"):
        model_config_from_dict({"preset": "transformer-tiny", "vocab_size": V, "mtp": {"depth": 1}})
    with pytest.raises(ConfigError, match=r"model\.mtp\.steps: unknown key"):
        model_config_from_dict({"preset": "lm-tiny", "vocab_size": V, "mtp": {"steps": 1}})


def test_weights_are_named_as_deepseek_v3_stores_them_and_share_embedding_and_head():
    model = mtp_model(depth=1, attention=MLA, moe=MOE)
    names = {n for n, _ in model.named_parameters() if n.startswith("mtp.0.")}
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "norm.weight", "block.self_attn.kv_b_proj.weight",
                 "block.ffn.router.weight"):  # fmt: skip
        assert f"mtp.0.{part}" in names, part
    assert model.mtp[0].eh_proj.weight.shape == (32, 64)
    assert not any("embed" in n or "lm_head" in n for n in names)  # shared with the main model


@pytest.mark.parametrize("attention, moe", [(None, None), (MLA, MOE)], ids=["mha-dense", "mla-moe"])
def test_shapes_and_main_logits_unchanged(attention, moe):
    model = mtp_model(depth=2, attention=attention, moe=moe)
    x = ids()
    plain, ahead = model(x), model(x, mtp=True)
    torch.testing.assert_close(plain.logits, ahead.logits)
    assert plain.mtp_logits == [] and [t.shape for t in ahead.mtp_logits] == [(2, 11, V), (2, 10, V)]
    if moe is not None:  # the MTP blocks' balance terms are reported and added
        assert any(name.startswith("mtp.1.") for name in ahead.reports.aux_losses) or "mtp.1" in ahead.reports.stats


@pytest.mark.parametrize("attention, moe", [(None, None), (MLA, MOE)], ids=["mha-dense", "mla-moe"])
def test_every_depth_is_causal(attention, moe):
    """Depth k at position i reads tokens t_0 .. t_{i+k}: changing t_j moves nothing at i < j - k."""
    model = mtp_model(depth=2, attention=attention, moe=moe)
    x = ids(length=14)
    base = model(x, mtp=True).mtp_logits
    for j in (5, 9):
        y = x.clone()
        y[:, j] = (y[:, j] % (V - 1)) + 1
        moved = model(y, mtp=True).mtp_logits
        for k, (a, b) in enumerate(zip(base, moved, strict=True), start=1):
            torch.testing.assert_close(a[:, : j - k], b[:, : j - k], atol=1e-5, rtol=1e-5)
            assert (a[:, j - k] - b[:, j - k]).abs().max() > 1e-4  # ... and position j - k does move


def test_padding_rows_match_unpadded_rows():
    model = mtp_model(depth=1)
    x = ids(batch=1, length=10)
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = padded == 0
    a = model(x, mtp=True).mtp_logits[0]
    b = model(padded, padding_mask=mask, mtp=True).mtp_logits[0]
    torch.testing.assert_close(a, b[:, :9], atol=1e-5, rtol=1e-5)


def test_loss_scores_depth_k_against_the_token_k_further():
    logits = [torch.randn(2, 7, V), torch.randn(2, 6, V)]
    target = ids(length=8)
    total, nlls = mtp_loss(logits, target, pad_id=0, eps=0.0, weight=0.3)
    expected = [smoothed_cross_entropy(x, target[:, k:], pad_id=0, eps=0.0)[1] for k, x in enumerate(logits, 1)]
    torch.testing.assert_close(torch.stack(nlls), torch.stack(expected))
    torch.testing.assert_close(total, 0.3 * torch.stack(expected).mean())


def test_errors_name_the_problem():
    model = mtp_model(depth=2)
    with pytest.raises(ValueError, match="more than 2 tokens"):
        model(ids(length=2), mtp=True)
    with pytest.raises(ValueError, match="no cache"):
        model(ids(), mtp=True, cache=model.new_cache())
    plain = build_model(model_config_from_dict({"preset": "lm-tiny", "vocab_size": V}))
    with pytest.raises(ValueError, match=r"\[model.mtp\]"):
        plain(ids(), mtp=True)


def test_gradients_reach_the_mtp_modules_and_the_shared_embedding():
    model = mtp_model(depth=1).train()
    x = ids(length=10)
    out = model(x[:, :-1], mtp=True)
    loss, _ = mtp_loss(out.mtp_logits, x[:, 1:], pad_id=0, eps=0.0, weight=1.0)
    loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.embedding.embed.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0


def test_training_logs_each_depth_and_validation_reports_it(tmp_path):
    from moeformer.config import config_from_dict
    from moeformer.train.run import run_training

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    config = config_from_dict(
        {
            "model": {
                "preset": "lm-tiny",
                "vocab_size": 64,
                "n_layers": 1,
                "max_seq_len": 32,
                "mtp": {"depth": 2, "weight": 0.3},
            },
            "data": {
                "corpus": "text",
                "path": str(text),
                "tokenizer": "char",
                "seq_len": 16,
                "valid_size": 8,
                "test_size": 8,
            },
            "train": {
                "steps": 30,
                "batch_tokens": 256,
                "lr": 3e-3,
                "log_every": 10,
                "eval_every": 30,
                "eval_batches": 2,
                "bleu_samples": 0,
                "warmup_steps": 5,
                "schedule": "cosine",
                "label_smoothing": 0.0,
            },
        }  # fmt: skip
    )
    run_training(config, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert all("mtp_nll_1" in r and "mtp_nll_2" in r for r in logged)
    assert logged[-1]["mtp_nll_1"] < logged[0]["mtp_nll_1"]  # the MTP module learns
    valid = [r for r in rows if "valid_loss" in r][-1]
    assert all(0 < valid[key] < 10 for key in ("valid_loss", "valid_mtp_nll_1", "valid_mtp_nll_2"))
