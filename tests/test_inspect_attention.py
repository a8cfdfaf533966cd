"""Attention maps: equal to a recomputation from the projections, proper distributions, causal
where they must be, the right shapes; files written by `moeformer inspect attention`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from inspect_models import PAIRS, save_run, tiny_loaded

from moeformer.cli import main
from moeformer.inspect.attention import (
    attention_maps,
    attention_modules,
    capture_attention,
    collect_attention,
    sentence_item,
)
from moeformer.inspect.corpus import InspectError, Item, encode_item

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(model, names):
    """The (query, key) each named attention module receives in a forward."""
    seen, handles = {}, []
    for name in names:

        def keep(module, args, kwargs, name=name):  # noqa: ANN001, ANN202
            seen[name] = (args[0].detach(), args[1].detach())

        handles.append(model.get_submodule(name).register_forward_pre_hook(keep, with_kwargs=True))
    return seen, handles


@torch.no_grad()
def _recompute(module, query, key, causal):
    B, T, _ = query.shape
    H, Dh = module.n_heads, module.head_dim
    q = module.q_proj(query).view(B, T, H, Dh).transpose(1, 2)
    k = module.k_proj(key).view(B, key.shape[1], H, Dh).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)[0].numpy()


def test_weights_equal_a_recomputation_from_the_projections():
    loaded = tiny_loaded()
    model = loaded.model
    example = encode_item(Item(*PAIRS[1]), loaded.tokenizers, "seq2seq", 64)
    names = ["encoder.1.self_attn", "decoder.0.self_attn", "decoder.1.cross_attn"]
    seen, handles = _inputs(model, names)
    try:
        maps = collect_attention(model, example)
    finally:
        for h in handles:
            h.remove()
    for name in names:
        expected = _recompute(model.get_submodule(name), *seen[name], causal=name.startswith("decoder.0.self"))
        np.testing.assert_allclose(maps[name], expected, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("arch, preset", [("seq2seq", None), ("decoder", None), ("decoder", "lm-tiny-mla")])
def test_maps_are_distributions_causal_where_masked_with_the_right_shapes(arch, preset):
    loaded = tiny_loaded(arch, name=preset)  # lm-tiny-mla: latent attention, found by its name self_attn
    source, target = PAIRS[0]
    maps = attention_maps(loaded, Item(source, target if arch == "seq2seq" else None))
    H = loaded.model.config.attention.n_heads
    S = len(source) + (1 if arch == "seq2seq" else 0)  # characters (+ <eos> on the encoder side)
    T = len(target) + 1  # <bos> + characters
    expected = {"encoder.self_attn": (H, S, S), "decoder.self_attn": (H, T, T), "decoder.cross_attn": (H, T, S),
                "layers.self_attn": (H, S, S)}  # fmt: skip
    kinds = maps.kinds()
    assert set(kinds) == ({"encoder.self_attn", "decoder.self_attn", "decoder.cross_attn"} if arch == "seq2seq"
                          else {"layers.self_attn"})  # fmt: skip
    for kind, names in kinds.items():
        assert len(names) == loaded.model.config.n_layers
        for name in names:
            w = maps.maps[name]
            assert w.shape == expected[kind], name
            np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
            if kind.endswith("self_attn") and not kind.startswith("encoder"):
                assert np.all(np.triu(w, k=1) == 0.0), f"{name} attends to the future"
            queries, keys = maps.axes(name)
            assert (len(queries), len(keys)) == w.shape[1:]


def test_reading_weights_leaves_the_outputs_and_the_hooks_as_they_were():
    loaded = tiny_loaded()
    model = loaded.model
    example = encode_item(Item(*PAIRS[2]), loaded.tokenizers, "seq2seq", 64)
    src, tgt = torch.tensor([example.source]), torch.tensor([example.target])
    with torch.no_grad():
        plain = model(src, tgt).logits
        with capture_attention(model) as store:
            hooked = model(src, tgt).logits
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    assert set(store) == set(attention_modules(model)) and len(store) == len(model.encoder) + 2 * len(model.decoder)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_without_a_target_the_decoder_reads_the_greedy_translation():
    loaded = tiny_loaded()
    item = sentence_item(loaded, "Are you OK?")
    assert item.source == "Are you OK?" and isinstance(item.target, str)
    maps = attention_maps(loaded, item)
    assert maps.target_tokens[0] == "<bos>" and len(maps.target_tokens) == len(item.target) + 1


def test_bad_requests_fail_with_a_clear_message():
    with pytest.raises(InspectError, match="empty"):
        sentence_item(tiny_loaded(), "   ")
    with pytest.raises(InspectError, match="decoder-only"):
        sentence_item(tiny_loaded("decoder"), "hello", target="你好")


def test_cli_writes_a_png_grid_per_kind_and_the_arrays(tmp_path, capsys):
    run = save_run(tmp_path / "run", tiny_loaded())
    out = tmp_path / "att"
    args = ["inspect", "attention", str(run), "--text", "Are you OK?", "--target", "你好吗？", "--out", str(out)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    for png in ("encoder_self_attn.png", "decoder_self_attn.png", "decoder_cross_attn.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    arrays = np.load(out / "attention.npz")
    n = tiny_loaded().model.config.n_layers
    expected = {f"encoder.{i}.self_attn" for i in range(n)} | {f"decoder.{i}.{k}" for i in range(n)
                                                               for k in ("self_attn", "cross_attn")}  # fmt: skip
    assert set(arrays.files) == expected | {"source_tokens", "target_tokens"}
    assert list(arrays["target_tokens"]) == ["<bos>", "你", "好", "吗", "？"]
    assert arrays["decoder.0.cross_attn"].shape[1:] == (5, len("Are you OK?") + 1)
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"


def test_cli_names_a_missing_checkpoint(tmp_path, capsys):
    assert main(["inspect", "attention", str(tmp_path / "nope"), "--text", "hi", "--out", str(tmp_path / "o")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
