"""Self-speculative decoding with the MTP modules: greedy output equals plain greedy decoding (MHA
and MLA, dense and MoE, one to three drafts per pass, batches whose rows accept differently, left
padding, EOS), every draft equals what the training-mode forward predicts from the same tokens,
and sampling keeps the target distribution (checked statistically on a small vocabulary)."""

from __future__ import annotations

import pytest
import torch

from moeformer.decode import greedy_generate, speculative, speculative_generate
from moeformer.models import build_model
from moeformer.models.cache import DecoderCache
from moeformer.presets import model_config_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")

MOE = {"kind": "deepseek", "n_experts": 6, "top_k": 2, "expert_hidden": 32, "n_shared": 1, "score": "sigmoid"}
MLA = {"kind": "mla", "n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
       "v_head_dim": 8}  # fmt: skip


def model_with_mtp(vocab, attention=None, moe=None, n_layers=2, seed=0, depth=1):
    torch.manual_seed(seed)
    config = {"preset": "lm-tiny", "vocab_size": vocab, "n_layers": n_layers, "dropout": 0.0, "mtp": {"depth": depth}}
    if attention is not None:
        config["attention"] = attention
    if moe is not None:
        config["moe"] = moe
    model = build_model(model_config_from_dict(config)).eval()
    # drafters that often agree with the main model: each module's input is the previous depth's
    # hidden state (eh_proj passes the h half through), so acceptance is neither 0 nor 1
    with torch.no_grad():
        D = model.config.d_model
        for module in model.mtp:
            proj = module.eh_proj.weight
            proj.zero_()
            proj[:, D:] = torch.eye(D) * 3.0
    return model


def prompts(batch, length, vocab, seed=1):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("depth", [1, 2], ids=["depth1", "depth2"])
@pytest.mark.parametrize(
    "attention, moe", [(None, None), (MLA, None), (None, MOE), (MLA, MOE)], ids=["mha", "mla", "mha-moe", "mla-moe"]
)
def test_greedy_equals_plain_greedy_with_rows_that_accept_differently(attention, moe, depth):
    model = model_with_mtp(8, attention, moe, depth=depth)
    x = prompts(5, 6, 8)
    plain = greedy_generate(model, x, max_new_tokens=24)
    fast = speculative_generate(model, x, max_new_tokens=24)
    assert torch.equal(fast.tokens, plain)
    assert 0 < fast.accepted < fast.drafted and fast.passes < 24
    assert sum(fast.drafted_at) == fast.drafted and sum(fast.accepted_at) == fast.accepted
    if depth == 2:  # a second draft is checked only where the first was kept, and some are kept
        assert fast.drafted_at[1] <= fast.accepted_at[0] and fast.accepted_at[1] > 0
    # rows took different numbers of passes' worth of acceptances: check it row by row
    per_row = [speculative_generate(model, x[i : i + 1], max_new_tokens=24).passes for i in range(5)]
    assert len(set(per_row)) > 1


@pytest.mark.parametrize("draft_tokens", [1, 2, 3])
def test_fewer_drafts_than_modules_give_the_same_tokens(draft_tokens):
    model = model_with_mtp(8, MLA, MOE, depth=3)
    x = prompts(4, 5, 8)
    fast = speculative_generate(model, x, max_new_tokens=20, draft_tokens=draft_tokens)
    assert torch.equal(fast.tokens, greedy_generate(model, x, max_new_tokens=20))
    assert len(fast.drafted_at) == draft_tokens and all(d > 0 for d in fast.drafted_at)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_every_draft_is_what_the_training_forward_predicts(monkeypatch, padded):
    """Cache = full forward for the draft chain: after every pass, draft k of each row equals the
    argmax of MTP depth k in a plain (uncached, ``mtp=True``) forward over the row's settled tokens
    followed by its drafts 1 ... k-1, at the last settled position (to within float noise)."""
    model = model_with_mtp(8, MLA, MOE, depth=3)
    B, P, new = 3, 6, 18
    x = prompts(B, P, 8)
    mask = torch.zeros(B, P, dtype=torch.bool)
    if padded:
        mask[0, :2] = mask[2, :4] = True
    calls = []
    original = speculative._DraftChain.draft

    def recording(chain, *args):
        drafts, q = original(chain, *args)
        calls.append((drafts.clone(), chain.caches[0].next_position.clone()))
        return drafts, q

    monkeypatch.setattr(speculative._DraftChain, "draft", recording)
    result = speculative_generate(model, x, padding_mask=mask if padded else None, max_new_tokens=new)
    assert len(calls) == result.passes + 1
    checked = 0
    for drafts, settled_positions in calls:
        for b in range(B):
            real = x[b][~mask[b]]
            settled = int(settled_positions[b]) + 1  # module 1 holds positions 0 ... N - 1 of N + 1 tokens
            emitted = settled - len(real)
            if emitted >= new:
                continue
            row = torch.cat([real, result.tokens[b, :emitted], drafts[b, :-1]])[None]
            ahead = model(row, mtp=True).mtp_logits
            for k in range(3):
                logits = ahead[k][0, settled - 2]  # position N - 1 predicts token N + k + 1
                assert logits[drafts[b, k]] >= logits.max() - 1e-4, (b, emitted, k)
                checked += 1
    assert checked > 3 * B


@pytest.mark.parametrize("depth", [1, 3])
def test_left_padded_prompts_and_eos(depth):
    model = model_with_mtp(8, MLA, MOE, depth=depth)
    rows = [prompts(1, n, 8, seed=n)[0] for n in (3, 7, 5)]
    x = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.ones(3, 7, dtype=torch.bool)
    for i, row in enumerate(rows):
        x[i, 7 - len(row) :], mask[i, 7 - len(row) :] = row, False
    for eos in (None, 3, 5):
        plain = greedy_generate(model, x, padding_mask=mask, max_new_tokens=20, eos_id=eos)
        fast = speculative_generate(model, x, padding_mask=mask, max_new_tokens=20, eos_id=eos)
        assert torch.equal(fast.tokens, plain), eos


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_short_budgets(n, depth):
    model = model_with_mtp(8, depth=depth)
    x = prompts(2, 4, 8)
    fast = speculative_generate(model, x, max_new_tokens=n)
    assert torch.equal(fast.tokens, greedy_generate(model, x, max_new_tokens=n))


def exact_joint(model, prompt, steps, V):
    """p(x1 ... x_steps | prompt) of the main model, (V,) * steps."""
    if steps == 0:
        return torch.ones(())
    p = torch.softmax(model(prompt).logits[0, -1], -1)
    return torch.stack([p[a] * exact_joint(model, torch.cat([prompt, torch.tensor([[a]])], 1), steps - 1, V)
                        for a in range(V)])  # fmt: skip


@pytest.mark.parametrize("depth, V, steps", [(1, 4, 2), (2, 3, 3)], ids=["depth1", "depth2"])
def test_sampling_keeps_the_target_distribution(depth, V, steps):
    """The first ``steps`` tokens after a fixed prompt (every one after the first drafted and
    verified), 20,000 rows at once: their empirical joint distribution matches the exact one from
    the main model (total variation well inside what the noise allows)."""
    model = model_with_mtp(V, n_layers=1, seed=3, depth=depth)
    with torch.no_grad():  # drafters that disagree often enough that rejections and residuals matter
        for module in model.mtp:
            module.eh_proj.weight.mul_(0.3)
    prompt = torch.tensor([[1, 2, 3]]) % V
    joint = exact_joint(model, prompt, steps, V).flatten()
    n = 20_000
    out = speculative_generate(model, prompt.expand(n, 3), max_new_tokens=steps + 1, temperature=1.0,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert all(0.1 < a < 0.95 for a in out.acceptance_at), out.acceptance_at
    cells = sum(out.tokens[:, i] * V ** (steps - 1 - i) for i in range(steps))
    counts = torch.bincount(cells, minlength=V**steps).double() / n
    tv = 0.5 * (counts - joint).abs().sum()
    assert tv < 0.03, (tv, counts, joint)


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


@pytest.mark.parametrize("depth", [1, 2])
def test_generation_up_to_the_position_limit(depth):
    """Discarded slots take cache room but no position: the model's max_seq_len still fits."""
    model = model_with_mtp(8, depth=depth)
    model.config.max_seq_len = 16
    x = prompts(3, 4, 8)
    fast = speculative_generate(model, x, max_new_tokens=12)
    assert fast.drafted > fast.accepted  # some slots were discarded on the way
    assert torch.equal(fast.tokens, greedy_generate(model, x, max_new_tokens=12))


def test_a_model_without_mtp_is_refused():
    model = build_model(model_config_from_dict({"preset": "lm-tiny", "vocab_size": 8}))
    with pytest.raises(ValueError, match=r"\[model.mtp\]"):
        speculative_generate(model, prompts(1, 3, 8), max_new_tokens=4)


@pytest.mark.parametrize("asked", [0, 3])
def test_more_drafts_than_modules_are_refused(asked):
    with pytest.raises(ValueError, match=f"draft_tokens={asked}: .* 1 to 2 tokens"):
        speculative_generate(model_with_mtp(8, depth=2), prompts(1, 3, 8), max_new_tokens=4, draft_tokens=asked)


def test_discarded_slots_are_padding_and_give_back_their_position():
    cache = DecoderCache([], capacity=0)
    cache.length, cache.next_position = 4, torch.tensor([4, 4])
    cache.forget_last(1, torch.tensor([0, 1]))
    assert cache.padding_mask.tolist() == [[False, False, False, True], [False] * 4]
    assert cache.next_position.tolist() == [3, 4]


def test_slots_no_row_keeps_are_cut_and_padding_gives_no_position_back():
    cache = DecoderCache([], capacity=0)
    cache.length, cache.next_position = 5, torch.tensor([4, 5, 3])
    cache.padding_mask = torch.tensor([[0, 0, 0, 0, 1], [0] * 5, [1, 1, 0, 0, 0]], dtype=torch.bool)
    cache.forget_last(3, torch.tensor([1, 2, 0]))  # of slots 2-4: row 0 keeps 2, row 1 keeps 2-3, row 2 none
    assert cache.length == 4  # slot 4: kept by no row
    assert cache.padding_mask.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert cache.next_position.tolist() == [3, 4, 0]  # slot 4 of row 0 was padding already


TINY_MTP = """
[model]
preset = "lm-tiny"
vocab_size = 64
n_layers = 2
max_seq_len = 48

[model.mtp]
depth = 2
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
    assert "drafts accepted" in fast.err and "by depth: " in fast.err and "passes of the main model" in fast.err
    assert main([*args, "--speculative", "--draft-tokens", "1"]) == 0
    one = capsys.readouterr()
    assert one.out == plain and "by depth" not in one.err
    assert main([*args, "--speculative", "--draft-tokens", "3"]) != 0
    assert "draft_tokens=3: this model's MTP modules draft 1 to 2 tokens per pass" in capsys.readouterr().err
    assert main([*args, "--draft-tokens", "1"]) != 0  # without --speculative nothing drafts
    assert "ask for it too (speculative=True, --speculative)" in capsys.readouterr().err
