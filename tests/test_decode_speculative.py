"""Self-speculative decoding with the MTP module: greedy output equals plain greedy decoding (MHA
and MLA, dense and MoE, batches whose rows accept differently, left padding, EOS), and sampling
keeps the target distribution (checked statistically on a small vocabulary)."""

from __future__ import annotations

import pytest
import torch

from moeformer.decode import greedy_generate, speculative_generate
from moeformer.models import build_model
from moeformer.models.cache import DecoderCache
from moeformer.presets import model_config_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")

MOE = {"kind": "deepseek", "n_experts": 6, "top_k": 2, "expert_hidden": 32, "n_shared": 1, "score": "sigmoid"}
MLA = {"kind": "mla", "n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
       "v_head_dim": 8}  # fmt: skip


def model_with_mtp(vocab, attention=None, moe=None, n_layers=2, seed=0):
    torch.manual_seed(seed)
    config = {"preset": "lm-tiny", "vocab_size": vocab, "n_layers": n_layers, "dropout": 0.0, "mtp": {"depth": 1}}
    if attention is not None:
        config["attention"] = attention
    if moe is not None:
        config["moe"] = moe
    model = build_model(model_config_from_dict(config)).eval()
    # a drafter that often agrees with the main model: its head input is the main model's own last
    # hidden state (eh_proj passes the h half through), so acceptance is neither 0 nor 1
    with torch.no_grad():
        D = model.config.d_model
        proj = model.mtp[0].eh_proj.weight
        proj.zero_()
        proj[:, D:] = torch.eye(D) * 3.0
    return model


def prompts(batch, length, vocab, seed=1):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "attention, moe", [(None, None), (MLA, None), (None, MOE), (MLA, MOE)], ids=["mha", "mla", "mha-moe", "mla-moe"]
)
def test_greedy_equals_plain_greedy_with_rows_that_accept_differently(attention, moe):
    model = model_with_mtp(8, attention, moe)
    x = prompts(5, 6, 8)
    plain = greedy_generate(model, x, max_new_tokens=24)
    fast = speculative_generate(model, x, max_new_tokens=24)
    assert torch.equal(fast.tokens, plain)
    assert 0 < fast.accepted < fast.drafted and fast.passes < 24
    # rows took different numbers of passes' worth of acceptances: check it row by row
    per_row = [speculative_generate(model, x[i : i + 1], max_new_tokens=24).passes for i in range(5)]
    assert len(set(per_row)) > 1


def test_left_padded_prompts_and_eos():
    model = model_with_mtp(8, MLA, MOE)
    rows = [prompts(1, n, 8, seed=n)[0] for n in (3, 7, 5)]
    x = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.ones(3, 7, dtype=torch.bool)
    for i, row in enumerate(rows):
        x[i, 7 - len(row) :], mask[i, 7 - len(row) :] = row, False
    for eos in (None, 3, 5):
        plain = greedy_generate(model, x, padding_mask=mask, max_new_tokens=20, eos_id=eos)
        fast = speculative_generate(model, x, padding_mask=mask, max_new_tokens=20, eos_id=eos)
        assert torch.equal(fast.tokens, plain), eos


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_short_budgets(n):
    model = model_with_mtp(8)
    x = prompts(2, 4, 8)
    fast = speculative_generate(model, x, max_new_tokens=n)
    assert torch.equal(fast.tokens, greedy_generate(model, x, max_new_tokens=n))


def test_sampling_keeps_the_target_distribution():
    """Two tokens after a fixed prompt, 20,000 rows at once: the empirical joint distribution of
    (x1, x2) matches the exact one from the main model (total variation well inside the noise)."""
    V = 4
    model = model_with_mtp(V, n_layers=1, seed=3)
    with torch.no_grad():  # a drafter that disagrees often enough that rejections and residuals matter
        model.mtp[0].eh_proj.weight.mul_(0.3)
    prompt = torch.tensor([[1, 2, 3]])
    p1 = torch.softmax(model(prompt).logits[0, -1], -1)
    joint = torch.stack([p1[a] * torch.softmax(model(torch.tensor([[1, 2, 3, a]])).logits[0, -1], -1)
                         for a in range(V)])  # fmt: skip
    n = 20_000
    out = speculative_generate(model, prompt.expand(n, 3), max_new_tokens=2, temperature=1.0,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert 0.2 < out.acceptance < 0.95
    counts = torch.bincount(out.tokens[:, 0] * V + out.tokens[:, 1], minlength=V * V).double() / n
    tv = 0.5 * (counts - joint.flatten()).abs().sum()
    assert tv < 0.03, (tv, counts.view(V, V), joint)


def test_sampling_with_top_k_never_leaves_the_filtered_support():
    model = model_with_mtp(8, n_layers=1)
    x = prompts(64, 3, 8)
    out = speculative_generate(model, x, max_new_tokens=6, temperature=0.8, top_k=2,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
    plain = greedy_generate(model, x, max_new_tokens=1)
    assert out.tokens.shape == (64, 6)
    top2 = model(x).logits[:, -1].topk(2).indices
    assert all(out.tokens[i, 0] in top2[i] for i in range(64))
    assert (out.tokens[:, 0] == plain[:, 0]).float().mean() > 0.3


def test_generation_up_to_the_position_limit():
    """Discarded slots take cache room but no position: the model's max_seq_len still fits."""
    model = model_with_mtp(8)
    model.config.max_seq_len = 16
    x = prompts(3, 4, 8)
    fast = speculative_generate(model, x, max_new_tokens=12)
    assert fast.drafted > fast.accepted  # some slots were discarded on the way
    assert torch.equal(fast.tokens, greedy_generate(model, x, max_new_tokens=12))


def test_a_model_without_mtp_is_refused():
    model = build_model(model_config_from_dict({"preset": "lm-tiny", "vocab_size": 8}))
    with pytest.raises(ValueError, match=r"\[model.mtp\]"):
        speculative_generate(model, prompts(1, 3, 8), max_new_tokens=4)


def test_discarded_slots_are_padding_and_give_back_their_position():
    cache = DecoderCache([], capacity=0)
    cache.length, cache.next_position = 4, torch.tensor([4, 4])
    cache.discard_last(torch.tensor([True, False]))
    assert cache.padding_mask.tolist() == [[False, False, False, True], [False] * 4]
    assert cache.next_position.tolist() == [3, 4]


TINY_MTP = """
[model]
preset = "lm-tiny"
vocab_size = 64
n_layers = 2
max_seq_len = 48

[model.mtp]
depth = 1
weight = 0.3

[data]
corpus = "text"
path = "{path}"
tokenizer = "char"
seq_len = 32
valid_size = 4
test_size = 4

[train]
steps = 60
batch_tokens = 512
lr = 3e-3
warmup_steps = 5
eval_every = 60
eval_batches = 2
bleu_samples = 0
"""


def test_cli_generate_speculative_prints_the_greedy_text_and_the_acceptance(tmp_path, capsys):
    from moeformer.cli import main

    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question. " * 100, encoding="utf-8")
    config = tmp_path / "mtp.toml"
    config.write_text(TINY_MTP.format(path=text.as_posix()), encoding="utf-8")
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    args = ["generate", str(tmp_path / "run"), "--prompt", "to be or", "--temperature", "0", "--max-new-tokens", "30"]
    capsys.readouterr()
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative"]) == 0
    fast = capsys.readouterr()
    assert fast.out == plain
    assert "drafts accepted" in fast.err and "passes of the main model" in fast.err
