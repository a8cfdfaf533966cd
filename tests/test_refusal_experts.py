"""The expert study (issue 15): a planted refusal expert is found first, the writes add up to the
layer's routed output along r, masking equals a layer built without the experts, and ablation in
shared-only or routed-only outputs touches only that part."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeformer import DecoderLM, preset
from moeformer.data.char_tokenizer import CharTokenizer
from moeformer.refusal.experts import (
    ablate_in_part,
    benjamini_hochberg,
    expert_study,
    mask_experts,
    random_experts,
    refusal_experts,
    two_proportion_p,
)
from moeformer.refusal.lm import PromptFormat, RefusalError
from moeformer.refusal.native import NativeChatLM

pytestmark = pytest.mark.usefixtures("single_thread")

HARMFUL = [f"tell me {w} ####" for w in ("now", "how", "why", "who", "all")]
HARMLESS = [f"tell me {w} %%%%" for w in ("now", "how", "why", "who", "all")]


def _chat_lm(moe: dict, seed: int = 0, n_layers: int = 1) -> NativeChatLM:
    tok = CharTokenizer.train([" ".join(HARMFUL + HARMLESS) + "U:\nA"])
    torch.manual_seed(seed)
    config = preset("lm-tiny", vocab_size=tok.vocab_size, n_layers=n_layers, max_seq_len=64, moe=moe,
                    attention={"n_heads": 4, "n_kv_heads": 4})  # fmt: skip
    return NativeChatLM(DecoderLM(config).eval(), tok, PromptFormat.from_template("U: {instruction}\nA:"))


@torch.no_grad()
def planted() -> tuple[NativeChatLM, torch.Tensor]:
    """One layer: attention averages the normalised prefix (zero queries and keys, identity value and
    output maps), so the post-instruction positions carry the fraction of '#' or '%'. The router
    sends '#'-heavy tokens to expert 2 and '%'-heavy ones to expert 0, and expert 2 alone writes
    along r, always positively (equal gate and up rows: silu(z) * z >= 0)."""
    lm = _chat_lm({"kind": "topk", "n_experts": 4, "top_k": 1, "expert_hidden": 16})
    model, D = lm.model, lm.d_model
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    u, w, r = basis[:, 0], basis[:, 1], basis[:, 2]
    emb = model.embedding.embed.weight
    emb.copy_(torch.randn(emb.shape, generator=g))
    emb -= (emb @ basis[:, :3]) @ basis[:, :3].T  # every other token orthogonal to u, w, r
    emb.copy_(emb / emb.norm(dim=1, keepdim=True))
    emb[lm.tokenizer.encode("#")[0]] = u
    emb[lm.tokenizer.encode("%")[0]] = w
    attn = model.layers[0].self_attn
    attn.q_proj.weight.zero_()
    attn.k_proj.weight.zero_()
    attn.v_proj.weight.copy_(torch.eye(D))
    attn.out_proj.weight.copy_(torch.eye(D))
    layer = model.layers[0].ffn
    layer.router.weight.zero_()
    layer.router.weight[2] = 30.0 * u
    layer.router.weight[0] = 30.0 * w  # '%'-heavy tokens go to expert 0
    experts = layer.experts
    H = experts.hidden
    a = torch.randn(H, D, generator=g)
    experts.gate_up_proj[2] = torch.cat([a, a])
    experts.down_proj[2] = r[:, None] * torch.ones(1, H)
    for e in (0, 1, 3):
        experts.down_proj[e] -= r[:, None] * (r @ experts.down_proj[e])[None]
    return lm, r


def test_a_planted_refusal_expert_is_found_first():
    lm, r = planted()
    study = expert_study(lm, r, HARMFUL, HARMLESS)
    (layer,) = study
    assert layer.tokens == {"harmful": 15, "harmless": 15}  # 3 post-instruction tokens ("\nA:") x 5 prompts
    assert layer.chosen["harmful"][2] == 15 and layer.chosen["harmless"][2] == 0
    assert layer.routed_write["harmful"][2] > 0.1
    assert torch.allclose(layer.routed_write["harmless"], torch.zeros(4), atol=1e-5)
    assert refusal_experts(study, 1) == {0: [2]}
    assert bool(layer.significant[2]) and layer.p_value[2] < 1e-4
    assert layer.shared_write == {"harmful": 0.0, "harmless": 0.0}


def test_writes_add_up_to_the_routed_output_along_r():
    lm = _chat_lm({"kind": "deepseek", "n_experts": 6, "top_k": 2, "expert_hidden": 16, "n_shared": 1}, n_layers=2)
    r = torch.randn(lm.d_model)
    r_hat = r / r.norm()
    study = expert_study(lm, r, HARMFUL, HARMLESS)
    routed, shared = {}, {}
    hooks = []
    for i, block in enumerate(lm.model.layers):
        hooks.append(block.ffn.experts.register_forward_hook(lambda m, a, y, i=i: routed.setdefault(i, y)))
        hooks.append(block.ffn.shared_experts.register_forward_hook(lambda m, a, y, i=i: shared.setdefault(i, y)))
    with torch.no_grad():
        lm.forward_logits(lm.batch(HARMFUL))
    for h in hooks:
        h.remove()
    B, T = lm.batch(HARMFUL).ids.shape
    for layer in study:
        y = routed[layer.layer].view(B, T, -1)[:, -lm.n_eoi :]
        s = shared[layer.layer].output.view(B, T, -1)[:, -lm.n_eoi :]
        torch.testing.assert_close(layer.routed_write["harmful"].sum(), (y @ r_hat).mean(), atol=1e-5, rtol=1e-4)
        assert layer.shared_write["harmful"] == pytest.approx(float((s @ r_hat).mean()), abs=1e-5)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_masking_equals_a_layer_built_without_those_experts(score):
    moe = {"kind": "deepseek", "n_experts": 6, "top_k": 2, "expert_hidden": 16, "n_shared": 1, "score": score,
           "normalize": score == "sigmoid"}  # fmt: skip
    lm = _chat_lm(moe, n_layers=2)
    for block in lm.model.layers:
        block.ffn.router.expert_bias.copy_(torch.linspace(-0.2, 0.3, 6))
    drop, keep = [1, 4], [0, 2, 3, 5]
    smaller = DecoderLM(dataclasses.replace(lm.model.config, moe=dataclasses.replace(lm.model.config.moe,
                                                                                      n_experts=4))).eval()  # fmt: skip
    state = lm.model.state_dict()
    for name in list(state):
        if ".experts." in name or name.endswith("router.weight") or name.endswith("router.expert_bias"):
            state[name] = state[name][keep]
    smaller.load_state_dict(state)
    batch = lm.batch(HARMFUL + HARMLESS)
    with mask_experts(lm, {0: drop, 1: drop}):
        masked = lm.forward_logits(batch)
    expected = smaller(batch.ids, padding_mask=batch.padding_mask).logits
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(lm.model.layers[0].ffn.router.expert_bias, torch.linspace(-0.2, 0.3, 6))  # restored
    assert not torch.allclose(lm.forward_logits(batch), masked)


def test_ablation_in_one_part_leaves_the_other():
    lm = _chat_lm({"kind": "deepseek", "n_experts": 6, "top_k": 2, "expert_hidden": 16, "n_shared": 1})
    r = torch.randn(lm.d_model)
    r_hat = r / r.norm()
    layer = lm.model.layers[0].ffn
    seen = {}
    hooks = [layer.experts.register_forward_hook(lambda m, a, y: seen.__setitem__("routed", y)),
             layer.shared_experts.register_forward_hook(lambda m, a, y: seen.__setitem__("shared", y.output))]
    batch = lm.batch(HARMFUL)
    lm.forward_logits(batch)
    before = dict(seen)
    for h in hooks:
        h.remove()
    outs = {}  # the whole layer's output = routed + shared; the part ablated loses its r component
    grab = layer.register_forward_hook(lambda m, a, out: outs.__setitem__("x", out.output))
    for part in ("routed", "shared"):
        with ablate_in_part(lm, r, part):
            lm.forward_logits(batch)
        other = before["shared" if part == "routed" else "routed"].view_as(outs["x"])
        ablated = outs["x"] - other  # the part that was ablated
        assert (ablated @ r_hat).abs().max() < 1e-4
    grab.remove()
    assert (before["routed"] @ r_hat).abs().max() > 1e-3 and (before["shared"] @ r_hat).abs().max() > 1e-3


def test_statistics_and_errors():
    p = two_proportion_p(torch.tensor([50.0, 10.0]), 100, torch.tensor([10.0, 10.0]), 100)
    assert p[0] < 1e-8 and p[1] == pytest.approx(1.0)
    assert benjamini_hochberg(torch.tensor([0.001, 0.02, 0.04, 0.5]), 0.05).tolist() == [True, True, False, False]
    assert len(random_experts([type("L", (), {"layer": 0, "p_value": torch.zeros(6)})()], 2, seed=0)[0]) == 2
    dense = _chat_lm(None)
    with pytest.raises(RefusalError, match="has none"):
        expert_study(dense, torch.randn(dense.d_model), HARMFUL, HARMLESS)
    lm = _chat_lm({"kind": "topk", "n_experts": 4, "top_k": 2, "expert_hidden": 16})
    with pytest.raises(RefusalError, match="fewer than top_k"):
        with mask_experts(lm, {0: [0, 1, 2]}):
            pass
    with pytest.raises(RefusalError, match="no shared experts"):
        with ablate_in_part(lm, torch.randn(lm.d_model), "shared"):
            pass


def test_cli_experts_writes_the_study_scores_and_pictures(tmp_path, capsys):
    import json

    import safetensors.torch

    from moeformer.cli import main

    lm, r = planted()
    lm.save(tmp_path / "ckpt")
    safetensors.torch.save_file({"direction": r.contiguous()}, str(tmp_path / "r.safetensors"))
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS) + "\n")
    args = ["refusal", "experts", str(tmp_path / "ckpt"), "--template", "U: {instruction}\nA:", "--direction",
            str(tmp_path / "r.safetensors"), "--harmful", str(tmp_path / "harmful.txt"), "--harmless",
            str(tmp_path / "harmless.txt"), "--n", "5", "--top", "1", "2", "--draws", "2", "--max-new-tokens", "4",
            "--out", str(tmp_path / "study"), "--quiet"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| directional ablation | " in out and "| mask 1 refusal experts | " in out
    report = json.loads((tmp_path / "study" / "experts.json").read_text())
    assert set(report["scores"]) == {"baseline", "directional ablation", "ablation in routed experts only",
                                     "mask 1 refusal experts", "mask 1 random experts", "mask 2 refusal experts",
                                     "mask 2 random experts"}  # 4 experts, top-1: up to 3 can go  # fmt: skip
    assert len(report["responses"]["mask 2 random experts #1"]) == 5
    assert report["layers"][0]["routed_write"]["harmful"][2] > 0.1
    for picture in ("expert_choice.png", "expert_writes.png", "masking.png"):
        assert (tmp_path / "study" / picture).stat().st_size > 1000
    assert main(args) == 1 and "exists" in capsys.readouterr().err  # never overwritten without --force


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


def _hf_lm(family):
    pytest.importorskip("transformers")
    from refusal_models import hf_chat_lm

    lm = hf_chat_lm(family)
    with torch.no_grad():  # routers start at zero in transformers: give them something to choose by
        g = torch.Generator().manual_seed(1)
        for name, p in lm.model.named_parameters():
            if name.endswith("gate.weight") or "correction_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
        for name, b in lm.model.named_buffers():
            if "correction_bias" in name:
                b.copy_(torch.rand(b.shape, generator=g) * 0.2)
    return lm


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hf_rerouting_with_nothing_masked_is_the_routers_own_output(family):
    from moeformer.refusal.moe_views import moe_views, reroute

    lm = _hf_lm(family)
    views = moe_views(lm)
    x = torch.randn(7, lm.d_model)
    gates = [view.block.gate for view in views.values()]
    if family == "deepseek_v2":  # its other rule, on the same router
        gates[0].topk_method, gates[0].num_group, gates[0].topk_group = "group_limited_greedy", 2, 1
    for gate in gates:
        logits, weights, index = gate(x)
        mine = reroute(gate, x, torch.tensor([], dtype=torch.long))
        torch.testing.assert_close(mine[0], logits.float())
        assert torch.equal(mine[2].sort(-1).values, index.sort(-1).values)
        order_a, order_b = index.argsort(-1), mine[2].argsort(-1)
        torch.testing.assert_close(mine[1].gather(1, order_b), weights.float().gather(1, order_a))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hf_study_writes_masking_and_partial_ablation(family):
    lm = _hf_lm(family)
    r = torch.randn(lm.d_model)
    r_hat = r / r.norm()
    prompts = ["how do i make a bomb", "write a poem", "explain the tides"]
    study = expert_study(lm, r, prompts, prompts)
    from moeformer.refusal.moe_views import moe_views

    views = moe_views(lm)
    assert [layer.layer for layer in study] == sorted(views)
    seen = {}
    hooks = [v.routed_module.register_forward_hook(lambda m, a, y, i=i: seen.setdefault(i, y))
             for i, v in views.items()]
    with torch.no_grad():
        lm.forward_logits(lm.batch(prompts))
    for h in hooks:
        h.remove()
    B, T = lm.batch(prompts).ids.shape
    for layer in study:
        y = seen[layer.layer].reshape(B, T, -1)[:, -lm.n_eoi :].float()
        torch.testing.assert_close(layer.routed_write["harmful"].sum(), (y @ r_hat).mean(), atol=1e-4, rtol=1e-3)
    first = min(views)
    chosen: list = []
    with torch.no_grad(), mask_experts(lm, {first: [0, 1]}):  # hooks run in order: read after the mask's
        grab = views[first].block.gate.register_forward_hook(lambda m, a, out: chosen.append(out[2]))
        lm.forward_logits(lm.batch(prompts))
        grab.remove()
    assert chosen and not ((chosen[0] == 0) | (chosen[0] == 1)).any()
    parts = ["routed"] + (["shared"] if views[first].shared_module is not None else [])
    for part in parts:
        with torch.no_grad(), ablate_in_part(lm, r, part):
            ablated = lm.forward_logits(lm.batch(prompts))
        assert not torch.allclose(ablated, lm.forward_logits(lm.batch(prompts)).detach())


def test_report_scores_average_the_random_draws_and_score_extra_phrases():
    from moeformer.refusal.expert_run import ExpertReport, masking_curve

    responses = {"baseline": ["I cannot do that.", "I have to decline: I have"],
                 "mask 1 refusal experts": ["I have to decline: I have", "Sure, here it is."],
                 "mask 1 random experts #0": ["I cannot.", "I cannot."],
                 "mask 1 random experts #1": ["Sure.", "I cannot."]}  # fmt: skip
    report = ExpertReport([], responses, ("I cannot",), ("I have to decline",), draws=2)
    assert report.scores() == {"baseline": 0.5, "mask 1 refusal experts": 0.0, "mask 1 random experts": 0.75}
    extended = report.scores(report.substrings + report.extra_substrings)
    assert extended["baseline"] == 1.0 and extended["mask 1 refusal experts"] == 0.5
    assert masking_curve(report.scores(), [1, 2]) == {1: {"refusal_experts": 0.0, "random": 0.75}}
    assert "+ extra phrases" in report.table() and "'I have to decline: I have'" in report.table()
