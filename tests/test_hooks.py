"""Named hook points: names, editing activations, clean removal, recording."""

from __future__ import annotations

import copy

import pytest
import torch

from moeformer import add_hooks, hook_points, record

pytestmark = pytest.mark.usefixtures("single_thread")

SUBLAYERS = ("resid_pre", "attn_out", "mlp_out", "resid_post")


def tokens(batch: int, length: int, seed: int, vocab: int = 37) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def attached(model) -> int:
    """How many forward hooks are attached to the model's hook points."""
    return sum(len(point._forward_hooks) for point in hook_points(model).values())


def test_decoder_lm_hook_point_names(make_lm):
    """A DecoderLM has resid_pre, attn_out, mlp_out, resid_post in every layer, in forward order."""
    model = make_lm()
    names = list(hook_points(model))
    expected = [f"layers.{i}.{s}" for i in range(model.config.n_layers) for s in SUBLAYERS]
    assert set(expected) <= set(names)
    assert [n for n in names if n in expected] == expected
    assert not any("cross_attn_out" in n for n in names)


def test_seq2seq_hook_point_names(make_seq2seq):
    """A Seq2SeqTransformer names encoder.i.* and decoder.i.* points; only the decoder has cross-attention."""
    model = make_seq2seq()
    names = set(hook_points(model))
    for i in range(model.config.encoder_layers):
        assert {f"encoder.{i}.{s}" for s in SUBLAYERS} <= names
        assert f"encoder.{i}.cross_attn_out" not in names
    for i in range(model.config.n_layers):
        assert {f"decoder.{i}.{s}" for s in SUBLAYERS} | {f"decoder.{i}.cross_attn_out"} <= names
    assert {"encoder.0.attn_out", "decoder.0.cross_attn_out"} <= names


@torch.no_grad()
def test_zeroing_mlp_out_equals_a_model_without_ffn_output(make_lm):
    """A glob hook that zeroes layers.*.mlp_out gives the logits of a model whose FFNs output zero."""
    model = make_lm()
    ids = tokens(2, 6, 1)
    base = model(ids).logits
    seen = []

    def zero(x, name):
        seen.append(name)
        return torch.zeros_like(x)

    with add_hooks(model, {"layers.*.mlp_out": zero}):
        hooked = model(ids).logits
    assert seen == ["layers.0.mlp_out", "layers.1.mlp_out"]
    assert not torch.allclose(hooked, base, atol=1e-3)
    silent = copy.deepcopy(model)
    for block in silent.layers:
        block.ffn.down_proj.weight.zero_()  # lm-tiny's FFN has no bias: output is exactly zero
    torch.testing.assert_close(hooked, silent(ids).logits, atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("identity", [lambda x, name: x, lambda x, name: None], ids=["return-x", "return-none"])
def test_identity_hook_changes_nothing(make_seq2seq, identity):
    """A hook returning its input (or None) on every hook point leaves the logits bit-identical."""
    model = make_seq2seq()
    src, tgt = tokens(2, 5, 1), tokens(2, 4, 2)
    base = model(src, tgt).logits
    with add_hooks(model, {"*": identity}):
        assert attached(model) == len(hook_points(model))
        hooked = model(src, tgt).logits
    assert torch.equal(hooked, base)


@torch.no_grad()
def test_hooks_are_removed_on_exit(make_lm):
    """After the with-block every hook is detached and the logits are back to normal."""
    model = make_lm()
    ids = tokens(2, 6, 1)
    base = model(ids).logits
    with add_hooks(model, {"layers.*.attn_out": lambda x, name: 2 * x}):
        assert attached(model) == model.config.n_layers
        assert not torch.allclose(model(ids).logits, base, atol=1e-3)
    assert attached(model) == 0
    assert torch.equal(model(ids).logits, base)


def test_hooks_are_removed_when_the_body_raises(make_lm):
    """An exception inside the with-block propagates and still detaches every hook."""
    model = make_lm()
    with pytest.raises(RuntimeError, match="boom"):
        with add_hooks(model, {"layers.*.resid_post": lambda x, name: x}):
            assert attached(model) == model.config.n_layers
            raise RuntimeError("boom")
    assert attached(model) == 0


def test_unknown_pattern_raises_before_attaching(make_lm):
    """A pattern that matches nothing raises KeyError naming it, and no hook is left attached."""
    model = make_lm()
    calls = []
    hooks = {"layers.*.mlp_out": lambda x, name: calls.append(name), "layers.*.mlp_in": lambda x, name: None}
    with pytest.raises(KeyError, match="layers.\\*.mlp_in"):
        with add_hooks(model, hooks):
            pytest.fail("the body must not run")
    assert attached(model) == 0
    model(tokens(1, 3, 1))
    assert calls == []


@torch.no_grad()
def test_record_captures_residual_stream(make_lm):
    """record() keeps every layer's resid_post with shape (B, T, D); resid_post[i] == resid_pre[i+1]."""
    model = make_lm()
    n, d = model.config.n_layers, model.config.d_model
    ids = tokens(2, 6, 1)
    with record(model, ["layers.*.resid_post", "layers.*.resid_pre"]) as acts:
        out = model(ids)
    assert set(acts) == {f"layers.{i}.{s}" for i in range(n) for s in ("resid_pre", "resid_post")}
    for i in range(n):
        assert acts[f"layers.{i}.resid_post"].shape == (2, 6, d)
    for i in range(n - 1):
        assert torch.equal(acts[f"layers.{i}.resid_post"], acts[f"layers.{i + 1}.resid_pre"])
    final = model.lm_head(model.norm(acts[f"layers.{n - 1}.resid_post"]))
    torch.testing.assert_close(final, out.logits, atol=1e-6, rtol=0)
    assert attached(model) == 0


def test_record_detaches_by_default(make_lm):
    """Recorded activations carry no graph unless detach=False is asked for."""
    model = make_lm()
    ids = tokens(1, 4, 1)
    with record(model, ["layers.0.mlp_out"]) as kept:
        model(ids)
    assert not kept["layers.0.mlp_out"].requires_grad
    with record(model, ["layers.0.mlp_out"], detach=False) as kept:
        model(ids)
    assert kept["layers.0.mlp_out"].requires_grad
