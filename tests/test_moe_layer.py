"""MoE layers: soft/dense equivalence, outputs, padding, capacity, placement, hooks, config errors, dtype."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from moeformer import ConfigError, DecoderLM, Seq2SeqTransformer, add_hooks, hook_points, preset
from moeformer.config import MoEConfig, model_config_from_dict
from moeformer.layers.feedforward import FeedForward, FFNOutput
from moeformer.moe import MoELayer, build_moe

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
D = 16


def inputs(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def tokens(batch: int, length: int, seed: int, vocab: int = 37) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def randomise_biases(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def act(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h) if name == "gelu" else F.relu(h)


# --- 1, 2: soft MoE ---------------------------------------------------------------------------


@pytest.mark.parametrize(("activation", "bias"), [("swiglu", False), ("swiglu", True), ("gelu", True)])
def test_soft_with_one_expert_equals_dense(activation, bias):
    """A soft MoE with a single expert (gate weight 1) is the dense FFN with the same weights."""
    torch.manual_seed(0)
    dense = build_moe(kind="dense", d_model=D, expert_hidden=24, activation=activation, bias=bias)
    soft = build_moe(kind="soft", d_model=D, n_experts=1, top_k=1, expert_hidden=24, activation=activation, bias=bias)
    assert isinstance(dense, FeedForward) and isinstance(soft, MoELayer)
    randomise_biases(dense, 1)
    with torch.no_grad():
        e = soft.experts
        if activation == "swiglu":
            e.gate_up_proj[0].copy_(torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))
            if bias:
                e.up_bias[0].copy_(torch.cat([dense.gate_proj.bias, dense.up_proj.bias]))
        else:
            e.up_proj[0].copy_(dense.up_proj.weight)
            if bias:
                e.up_bias[0].copy_(dense.up_proj.bias)
        e.down_proj[0].copy_(dense.down_proj.weight)
        if bias:
            e.down_bias[0].copy_(dense.down_proj.bias)
    x = inputs(2, 5, D)
    want = dense(x).output
    torch.testing.assert_close(soft(x).output, want, atol=ATOL, rtol=0)
    assert want.abs().max() > 0.05


@pytest.mark.parametrize(("activation", "bias"), [("swiglu", False), ("relu", True), ("gelu", True)])
def test_soft_equals_softmax_weighted_sum_of_every_expert(activation, bias):
    """soft(x) = sum_e softmax(x W_g^T)_e * expert_e(x), written out by hand."""
    torch.manual_seed(0)
    E = 4
    soft = build_moe(kind="soft", d_model=D, n_experts=E, top_k=2, expert_hidden=12, activation=activation, bias=bias)
    randomise_biases(soft, 2)
    x = inputs(2, 5, D).view(-1, D)
    ex = soft.experts
    with torch.no_grad():
        gates = (x @ soft.router.weight.t()).softmax(-1)
        want = torch.zeros_like(x)
        for e in range(E):
            h = x @ ex.first_weight[e].t() + (ex.up_bias[e] if bias else 0)
            y = act(activation, h) @ ex.down_proj[e].t() + (ex.down_bias[e] if bias else 0)
            want += gates[:, e, None] * y
        got = soft(x.view(2, 5, D)).output.view(-1, D)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (gates.max(-1).values < 0.999).all()  # every expert really contributes


# --- 3: FFNOutput -----------------------------------------------------------------------------


def test_output_holds_enabled_weighted_losses_and_detached_stats():
    """FFNOutput: (B,T,D) output; aux_losses only for enabled coefficients, weighted; stats detached."""
    torch.manual_seed(0)
    E, K, B, T = 8, 2, 2, 6
    layer = build_moe(kind="topk", d_model=D, n_experts=E, top_k=K, expert_hidden=12, balance_loss=0.01, z_loss=0.002)
    x = inputs(B, T, D)
    out = layer(x)
    assert isinstance(out, FFNOutput) and out.output.shape == (B, T, D)
    assert set(out.aux_losses) == {"balance", "z"}
    assert set(out.stats) == {"tokens_per_expert", "dropped_fraction", "router_entropy", "loss_balance", "loss_z"}
    assert all(not v.requires_grad for v in out.stats.values())
    assert all(v.requires_grad for v in out.aux_losses.values())  # they train the router
    # independent recomputation of the unweighted terms
    flat = x.view(-1, D)
    with torch.no_grad():
        logits = flat @ layer.router.weight.t()
        probs = logits.softmax(-1)
        index = probs.topk(K, dim=-1).indices
        counts = torch.bincount(index.reshape(-1), minlength=E).float()
        f = counts / (B * T * K)
        balance = E * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(out.stats["tokens_per_expert"], counts)
    assert out.stats["tokens_per_expert"].shape == (E,) and out.stats["tokens_per_expert"].sum() == B * T * K
    assert out.stats["dropped_fraction"].item() == 0.0
    torch.testing.assert_close(out.stats["router_entropy"], entropy)
    torch.testing.assert_close(out.stats["loss_balance"], balance)
    torch.testing.assert_close(out.stats["loss_z"], z)
    torch.testing.assert_close(out.aux_losses["balance"], 0.01 * balance)
    torch.testing.assert_close(out.aux_losses["z"], 0.002 * z)
    sum(out.aux_losses.values()).backward()
    assert layer.router.weight.grad.abs().max() > 0


def test_output_without_coefficients_has_no_aux_losses():
    """All coefficients 0: aux_losses is empty, stats still report the (unweighted) balance term."""
    torch.manual_seed(0)
    out = build_moe(kind="deepseek", d_model=D, n_experts=4, top_k=2, expert_hidden=12, n_shared=1)(inputs(2, 3, D))
    assert out.aux_losses == {}
    assert "loss_balance" in out.stats and out.stats["tokens_per_expert"].shape == (4,)


def test_every_loss_term_reported_when_enabled():
    """Each enabled coefficient adds its weighted term, and the stats carry its unweighted value."""
    torch.manual_seed(0)
    coef = dict(balance_loss=0.1, device_loss=0.2, seq_balance_loss=0.3, z_loss=0.4)
    layer = build_moe(
        kind="deepseek", d_model=D, n_experts=4, top_k=2, expert_hidden=12, granularity=2, n_devices=2, **coef
    )
    out = layer(inputs(2, 5, D))
    names = {
        "balance_loss": "balance",
        "device_loss": "device_balance",
        "seq_balance_loss": "seq_balance",
        "z_loss": "z",
    }
    assert set(out.aux_losses) == set(names.values())
    for field, name in names.items():
        torch.testing.assert_close(out.aux_losses[name].detach(), coef[field] * out.stats[f"loss_{name}"])
    assert out.stats["tokens_per_expert"].shape == (8,)  # m * n_experts routed experts


# --- 4: padding -------------------------------------------------------------------------------


def padded_copy(x: torch.Tensor, pads: list[tuple[int, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert (left, right) garbage padding around each row of ``x`` (B, T, D)."""
    B, T, Dm = x.shape
    total = T + max(a + b for a, b in pads)
    out = inputs(B, total, Dm, seed=seed, scale=50.0)  # garbage, far from the real tokens
    mask = torch.ones(B, total, dtype=torch.bool)
    for i, (left, _) in enumerate(pads):
        out[i, left : left + T] = x[i]
        mask[i, left : left + T] = False
    return out, mask


PAD_LAYERS = {
    "topk-capacity": dict(
        kind="topk",
        n_experts=4,
        top_k=2,
        capacity_factor=0.75,
        balance_loss=0.01,
        z_loss=1e-3,
        seq_balance_loss=1e-2,
        device_loss=0.1,
        n_devices=2,
    ),
    "deepseek-v3": dict(
        kind="deepseek",
        n_experts=4,
        top_k=2,
        granularity=2,
        n_shared=1,
        score="sigmoid",
        n_group=2,
        topk_group=1,
        routed_scaling=2.5,
        balance_loss=0.01,
        seq_balance_loss=1e-2,
        z_loss=1e-3,
    ),
    "soft": dict(kind="soft", n_experts=3, top_k=2, balance_loss=0.01, z_loss=1e-3),
}


@pytest.mark.parametrize("name", list(PAD_LAYERS))
def test_padding_is_invisible(name):
    """Padded positions: zero routed output, no capacity, no effect on real outputs, losses or stats."""
    torch.manual_seed(0)
    layer = build_moe(d_model=D, expert_hidden=12, **PAD_LAYERS[name])
    x = inputs(2, 6, D, seed=1)
    xp, mask = padded_copy(x, [(3, 0), (1, 2)], seed=2)
    plain = layer(x)
    padded = layer(xp, padding_mask=mask)
    torch.testing.assert_close(padded.output[~mask].view(2, 6, D), plain.output, atol=ATOL, rtol=0)
    routed_at_pad = padded.output[mask]
    if layer.shared_experts is not None:
        routed_at_pad = routed_at_pad - layer.shared_experts(xp).output[mask]
    torch.testing.assert_close(routed_at_pad, torch.zeros_like(routed_at_pad), atol=ATOL, rtol=0)
    assert padded.aux_losses.keys() == plain.aux_losses.keys() and plain.aux_losses
    for key in plain.aux_losses:
        torch.testing.assert_close(padded.aux_losses[key], plain.aux_losses[key], atol=1e-6, rtol=1e-5)
    assert padded.stats.keys() == plain.stats.keys()
    for key in plain.stats:
        torch.testing.assert_close(padded.stats[key], plain.stats[key], atol=1e-6, rtol=1e-5)
    if name == "topk-capacity":
        assert plain.stats["dropped_fraction"] > 0  # capacity binds, so taking capacity would show


def test_padding_gets_no_gradient_from_the_routed_path():
    """The aux losses and the real outputs send no gradient to padded inputs (topk, no shared experts)."""
    torch.manual_seed(0)
    layer = build_moe(kind="topk", d_model=D, n_experts=4, top_k=2, expert_hidden=12, balance_loss=0.1, z_loss=0.1)
    xp, mask = padded_copy(inputs(2, 4, D, seed=1), [(2, 0), (0, 2)], seed=2)
    xp.requires_grad_(True)
    out = layer(xp, padding_mask=mask)
    (out.output.sum() + sum(out.aux_losses.values())).backward()
    assert xp.grad[mask].abs().max() == 0
    assert xp.grad[~mask].abs().max() > 0


# --- 5: capacity ------------------------------------------------------------------------------


def kept_by_hand(index: torch.Tensor, E: int, capacity: int) -> torch.Tensor:
    """GShard priority: every first choice before any second, earlier tokens first; (N, K) bool kept."""
    N, K = index.shape
    counts = [0] * E
    kept = torch.zeros(N, K, dtype=torch.bool)
    for k in range(K):
        for n in range(N):
            e = int(index[n, k])
            if counts[e] < capacity:
                counts[e] += 1
                kept[n, k] = True
    return kept


def test_capacity_drops_tokens_to_exactly_zero():
    """A small capacity drops assignments: they contribute exactly 0, fully dropped tokens output 0, no NaN."""
    torch.manual_seed(0)
    E, K, B, T, cf = 4, 2, 2, 16, 0.5
    layer = build_moe(kind="topk", d_model=D, n_experts=E, top_k=K, expert_hidden=12, capacity_factor=cf)
    with torch.no_grad():
        layer.router.weight[0] += 2.0 * layer.router.weight[1]  # make the load uneven
    x = inputs(B, T, D, seed=3).requires_grad_(True)
    out = layer(x)
    capacity = math.ceil(cf * B * T * K / E)
    flat = x.detach().view(-1, D)
    with torch.no_grad():
        routing = layer.router(flat)
    kept = kept_by_hand(routing.index, E, capacity)
    assert (~kept).any() and (~kept).all(1).any()  # some assignments and some whole tokens are dropped
    torch.testing.assert_close(out.stats["dropped_fraction"], (~kept).float().mean())
    want = layer.experts.forward_reference(
        flat, routing.index.masked_fill(~kept, E), routing.weights.masked_fill(~kept, 0.0)
    )
    got = out.output.view(-1, D)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want.detach(), atol=ATOL, rtol=0)
    assert torch.equal(got[(~kept).all(1)], torch.zeros_like(got[(~kept).all(1)]))
    counts = torch.bincount(routing.index[kept], minlength=E)
    assert counts.max() <= capacity
    torch.testing.assert_close(out.stats["tokens_per_expert"], counts.float())
    out.output.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_large_capacity_equals_dropless():
    """With capacity_factor large enough, nothing is dropped and the output is the dropless layer's."""
    torch.manual_seed(0)
    kw = dict(kind="topk", d_model=D, n_experts=4, top_k=2, expert_hidden=12)
    dropless = build_moe(**kw)
    roomy = build_moe(**kw, capacity_factor=4.0)
    roomy.load_state_dict(dropless.state_dict())
    x = inputs(2, 8, D, seed=4)
    a, b = dropless(x), roomy(x)
    torch.testing.assert_close(b.output, a.output, atol=0, rtol=0)
    assert b.stats["dropped_fraction"].item() == 0.0
    torch.testing.assert_close(b.stats["tokens_per_expert"], a.stats["tokens_per_expert"])


# --- 6: placement in models -------------------------------------------------------------------


MOE = {"kind": "topk", "n_experts": 4, "top_k": 2, "balance_loss": 0.01, "z_loss": 1e-3}


def moe_layers(stack) -> list[int]:
    return [i for i, block in enumerate(stack) if isinstance(block.ffn, MoELayer)]


def test_every_other_placement_and_first_dense_in_decoder_lm():
    """every_other puts MoE on layers 1, 3; first_dense=1 keeps layer 0 dense (decoder-only LM)."""
    torch.manual_seed(0)
    model = DecoderLM(preset("lm-tiny", vocab_size=37, n_layers=4, moe={**MOE, "placement": "every_other"}))
    assert moe_layers(model.layers) == [1, 3]
    assert all(isinstance(model.layers[i].ffn, FeedForward) for i in (0, 2))
    model = DecoderLM(preset("lm-tiny", vocab_size=37, n_layers=4, moe={**MOE, "first_dense": 1}))
    assert moe_layers(model.layers) == [1, 2, 3]


def test_every_other_placement_in_seq2seq():
    """every_other (and first_dense) apply to the encoder and the decoder stacks alike."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(
        preset("transformer-tiny", vocab_size=37, n_layers=4, moe={**MOE, "placement": "every_other"})
    )
    assert moe_layers(model.encoder) == [1, 3] and moe_layers(model.decoder) == [1, 3]
    model = Seq2SeqTransformer(preset("transformer-tiny", vocab_size=37, n_layers=3, moe={**MOE, "first_dense": 1}))
    assert moe_layers(model.encoder) == [1, 2] and moe_layers(model.decoder) == [1, 2]


def check_reports(out, layers: list[str]) -> None:
    """aux_loss is the sum of the per-layer weighted losses; one stats entry per MoE layer."""
    r = out.reports
    assert sorted(r.stats) == sorted(layers)
    assert sorted(r.aux_losses) == sorted(f"{layer}.{term}" for layer in layers for term in ("balance", "z"))
    for layer in layers:
        torch.testing.assert_close(r.aux_losses[f"{layer}.balance"].detach(), 0.01 * r.stats[layer]["loss_balance"])
        torch.testing.assert_close(r.aux_losses[f"{layer}.z"].detach(), 1e-3 * r.stats[layer]["loss_z"])
    torch.testing.assert_close(out.aux_loss, torch.stack(list(r.aux_losses.values())).sum())
    assert out.aux_loss > 0 and out.aux_loss.requires_grad


def test_decoder_lm_reports_per_moe_layer():
    """A DecoderLM's aux_loss sums layers.1 and layers.3 weighted losses; stats are keyed by layer."""
    torch.manual_seed(0)
    model = DecoderLM(preset("lm-tiny", vocab_size=37, n_layers=4, moe={**MOE, "placement": "every_other"}))
    out = model(tokens(2, 6, 1))
    check_reports(out, ["layers.1", "layers.3"])
    assert out.reports.stats["layers.1"]["tokens_per_expert"].sum() == 2 * 6 * 2


def test_seq2seq_reports_encoder_and_decoder_moe_layers():
    """A Seq2SeqTransformer reports encoder.i and decoder.i MoE layers; aux_loss sums all of them."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(
        preset("transformer-tiny", vocab_size=37, n_layers=4, moe={**MOE, "placement": "every_other"})
    )
    src, tgt = tokens(2, 7, 1), tokens(2, 5, 2)
    src_mask = torch.zeros(2, 7, dtype=torch.bool)
    src_mask[1, 5:] = True
    out = model(src, tgt, src_padding_mask=src_mask)
    check_reports(out, ["encoder.1", "encoder.3", "decoder.1", "decoder.3"])
    assert out.reports.stats["encoder.1"]["tokens_per_expert"].sum() == (2 * 7 - 2) * 2  # padding not routed
    assert out.reports.stats["decoder.3"]["tokens_per_expert"].sum() == 2 * 5 * 2


@torch.no_grad()
@pytest.mark.parametrize("kind", ["topk", "deepseek"])
def test_kv_cache_equals_full_forward_with_moe(make_lm, kind):
    """With dropless MoE layers, decoding through the KV cache gives the full forward's logits."""
    moe = {"kind": kind, "n_experts": 4, "top_k": 2}
    if kind == "deepseek":
        moe.update(n_shared=1, granularity=2, score="sigmoid", n_group=2, topk_group=1, routed_scaling=2.5)
    model = make_lm(moe=moe)
    ids = tokens(2, 8, 1)
    full = model(ids).logits
    cache = model.new_cache()
    pieces, start = [], 0
    for n in (3, 1, 4):
        pieces.append(model(ids[:, start : start + n], cache=cache).logits)
        start += n
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_padding_invariance_of_decoder_lm_with_deepseek_moe(make_lm):
    """A padded batch through a DeepSeek-MoE LM gives each unpadded sequence's logits at real positions."""
    model = make_lm(
        moe={
            "kind": "deepseek",
            "n_experts": 4,
            "top_k": 2,
            "n_shared": 1,
            "granularity": 2,
            "score": "sigmoid",
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling": 2.5,
            "balance_loss": 0.01,
            "seq_balance_loss": 1e-3,
        }
    )
    rows = [tokens(1, n, n)[0] for n in (6, 3, 8)]
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.ones(3, 8, dtype=torch.bool)
    for i, row in enumerate(rows):  # rows 0, 1 left-padded, row 2 full
        ids[i, 8 - len(row) :] = row
        mask[i, 8 - len(row) :] = False
    batched = model(ids, padding_mask=mask)
    assert torch.isfinite(batched.logits).all()
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(batched.logits[i][~mask[i]], alone, atol=ATOL, rtol=0)
    routed = model.config.moe.routed_top_k
    assert batched.reports.stats["layers.0"]["tokens_per_expert"].sum() == 17 * routed


# --- 7: router_logits hook --------------------------------------------------------------------


@torch.no_grad()
def test_router_logits_hook_can_force_an_expert():
    """A hook at layers.1.ffn.router_logits adding a large logit to expert 3 routes every token there."""
    torch.manual_seed(0)
    model = DecoderLM(
        preset("lm-tiny", vocab_size=37, n_layers=2, moe={"kind": "topk", "n_experts": 4, "top_k": 1})
    ).eval()
    points = hook_points(model)
    assert {"layers.0.ffn.router_logits", "layers.1.ffn.router_logits"} <= set(points)
    ids = tokens(2, 6, 1)
    before = model(ids).reports.stats["layers.1"]["tokens_per_expert"]
    assert before[3] < 12
    bump = torch.tensor([0.0, 0.0, 0.0, 1e4])
    seen = []

    def force(logits, name):
        seen.append((name, logits.shape, logits.dtype))
        return logits + bump

    with add_hooks(model, {"layers.1.ffn.router_logits": force}):
        out = model(ids)
    assert seen == [("layers.1.ffn.router_logits", (12, 4), torch.float32)]
    assert out.reports.stats["layers.1"]["tokens_per_expert"].tolist() == [0, 0, 0, 12]
    torch.testing.assert_close(
        out.reports.stats["layers.0"]["tokens_per_expert"], model(ids).reports.stats["layers.0"]["tokens_per_expert"]
    )


# --- 8: configuration errors ------------------------------------------------------------------


BAD_MOE = [
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(n_experts=8, n_group=2, topk_group=3), "topk_group"),
    (dict(n_experts=6, n_group=4, topk_group=1, top_k=1), "n_group"),
    (dict(balance_loss=-1.0), "balance_loss"),
    (dict(device_loss=-0.1), "device_loss"),
    (dict(seq_balance_loss=-1e-4), "seq_balance_loss"),
    (dict(z_loss=-1e-3), "z_loss"),
    (dict(bias_update_rate=-1e-3), "bias_update_rate"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(kind="topk", n_shared=1), "n_shared"),
    (dict(kind="deepseek", shared_gate=True), "shared_gate"),
    (dict(kind="deepseek", shared_hidden=24), "shared_hidden"),
    (dict(kind="deepseek", n_shared=1, shared_hidden=0), "shared_hidden"),
    (dict(kind="sparse"), "kind"),
]


@pytest.mark.parametrize(("kwargs", "key"), BAD_MOE, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD_MOE)])
def test_bad_moe_config_names_the_key(kwargs, key):
    """Each invalid MoE option raises ConfigError whose key is that option, from Python and from a dict."""
    with pytest.raises(ConfigError) as info:
        MoEConfig(**kwargs)
    assert info.value.key == key
    with pytest.raises(ConfigError) as info:
        model_config_from_dict({"vocab_size": 10, "d_model": 32, "attention": {"n_heads": 4}, "moe": kwargs})
    assert info.value.key == f"model.moe.{key}"


def test_build_moe_rejects_bad_options_with_the_key():
    """build_moe validates through MoEConfig: bad values and unknown kinds name their key."""
    with pytest.raises(ConfigError) as info:
        build_moe(kind="topk", d_model=D, n_experts=4, top_k=8, expert_hidden=8)
    assert info.value.key == "top_k"
    with pytest.raises(ConfigError) as info:
        build_moe(kind="switch", d_model=D, expert_hidden=8)
    assert info.value.key == "kind"


def test_unknown_moe_key_is_named():
    """An unknown key in the [model.moe] table is reported with its full dotted path."""
    with pytest.raises(ConfigError, match="unknown key") as info:
        model_config_from_dict({"vocab_size": 10, "moe": {"n_expert": 4}})
    assert info.value.key == "model.moe.n_expert"


# --- 9: router precision ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk", "deepseek"])
def test_router_runs_in_float32_for_bf16_layers(kind):
    """A bf16 layer with bf16 input computes router logits, scores and weights in float32."""
    torch.manual_seed(0)
    extra = dict(n_shared=1, score="sigmoid") if kind == "deepseek" else {}
    layer = build_moe(kind=kind, d_model=D, n_experts=4, top_k=2, expert_hidden=12, **extra).to(torch.bfloat16)
    x = inputs(2, 5, D).to(torch.bfloat16)
    routing = layer.router(x.view(-1, D))
    assert routing.logits.dtype == torch.float32
    assert routing.scores.dtype == torch.float32
    assert routing.weights.dtype == torch.float32
    want = x.view(-1, D).float() @ layer.router.weight.float().t()
    torch.testing.assert_close(routing.logits, want, atol=1e-5, rtol=1e-5)  # not bf16-rounded
    out = layer(x)
    assert out.output.dtype == torch.bfloat16 and torch.isfinite(out.output).all()
    assert all(v.dtype == torch.float32 for v in out.stats.values())


def test_expert_bias_stays_float32_under_bf16():
    """The balancing bias is kept in float32 when the layer moves to bf16, so 1e-3 steps are not lost."""
    torch.manual_seed(0)
    layer = build_moe(
        kind="deepseek", d_model=D, n_experts=4, top_k=2, expert_hidden=12, score="sigmoid", bias_update_rate=1e-3
    ).to(torch.bfloat16)
    assert layer.router.expert_bias.dtype == torch.float32
    load = torch.tensor([0.0, 10.0, 10.0, 10.0])  # expert 0 idle: its bias rises by gamma each step
    for _ in range(700):
        layer.router.update_bias(load)
    torch.testing.assert_close(layer.router.expert_bias[0].float(), torch.tensor(0.7), atol=1e-4, rtol=0)
