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


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data.startswith(b"\x89PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_long_input_draws_a_bounded_figure(monkeypatch):
    """Each token widens a grid by 0.2 inch; 512 of them drew 11,748 x 8,800 px. Capped, aspect kept
    (shown with a small cap, so that the test draws a small picture)."""
    from moeformer.inspect import plots
    from moeformer.inspect.attention import AttentionMaps

    assert plots.bounded(10.0, 5.0) == ((10.0, 5.0), 1.0)
    assert plots.bounded(4 * plots.MAX_INCHES, plots.MAX_INCHES) == ((plots.MAX_INCHES, plots.MAX_INCHES / 4), 0.25)
    assert plots.MAX_INCHES * 110 < 6000  # pixels a side at the dpi the pictures use
    monkeypatch.setattr(plots, "MAX_INCHES", 6.0)
    T = 40  # uncapped: 2 heads of 8.8 inches + the colour bar, 18.8 x 9.6 inches
    maps = AttentionMaps({"layers.0.self_attn": np.full((2, T, T), 1.0 / T, dtype=np.float32)}, ["t"] * T)
    width, height = _png_size(plots.attention_grid(maps, "layers.self_attn"))
    assert width <= 6.0 * 110 + 1 and height <= 6.0 * 110 + 1
    assert width / height == pytest.approx(18.8 / 9.6, rel=0.05)


def _no_pictures(monkeypatch):
    """Skip drawing (seconds per grid on a busy CPU) where a test checks what is around it."""
    from moeformer.inspect import run

    monkeypatch.setattr(run, "attention_pictures", lambda maps, font: {"layers.self_attn": b"\x89PNG"})


def test_without_max_tokens_the_cli_cuts_each_side_to_the_default(tmp_path, monkeypatch):
    from moeformer.cli import build_parser
    from moeformer.inspect.run import DEFAULT_MAX_TOKENS

    _no_pictures(monkeypatch)
    run = save_run(tmp_path / "run", tiny_loaded())
    text = " ".join(s for s, _ in PAIRS) * 3  # ~250 characters: 250 tokens of the character tokenizer
    assert main(["inspect", "attention", str(run), "--text", text, "--target", "你好吗？" * 20,
                 "--out", str(tmp_path / "att")]) == 0  # fmt: skip
    arrays = np.load(tmp_path / "att" / "attention.npz")
    assert len(arrays["source_tokens"]) == len(arrays["target_tokens"]) == DEFAULT_MAX_TOKENS
    inspect = build_parser()._subparsers._group_actions[0].choices["inspect"]
    attention = inspect._subparsers._group_actions[0].choices["attention"]
    help_text = next(a.help for a in attention._actions if "--max-tokens" in a.option_strings)
    assert f"(default {DEFAULT_MAX_TOKENS})" in help_text


def test_no_warning_reaches_the_terminal_and_the_font_problem_is_said_once(tmp_path, monkeypatch, capsys):
    """Without a Chinese font every Han label is a missing glyph (one matplotlib warning each) and
    every picture warns about the font: the command says it once, as a note, and nothing else."""
    import warnings

    from moeformer.inspect import fonts

    monkeypatch.setattr(fonts, "package_font_path", lambda: None)
    monkeypatch.setattr(fonts, "SYSTEM_FAMILIES", ())
    fonts.find_cjk_font.cache_clear()
    run = save_run(tmp_path / "run", tiny_loaded("decoder"))  # an LM: one kind of grid to draw
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["inspect", "attention", str(run), "--text", "你好吗？", "--out", str(tmp_path / "att")]) == 0
    finally:
        fonts.find_cjk_font.cache_clear()
    assert [str(w.message) for w in caught] == []
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "no font with Chinese glyphs" in err, err
    assert all(ch in err.split("boxes in the pictures:")[1] for ch in "你好吗？")


def test_out_is_published_whole_and_replaced_only_with_force(tmp_path, monkeypatch, capsys):
    from moeformer.publish import MARKER

    _no_pictures(monkeypatch)
    run = save_run(tmp_path / "run", tiny_loaded())
    out = tmp_path / "att"
    argv = ["inspect", "attention", str(run), "--text", "Are you OK?", "--target", "你好吗？", "--out", str(out)]
    assert main(argv) == 0 and (out / MARKER).is_file()
    (out / "mine.txt").write_text("an old file of the old output\n")
    assert main(argv) == 1 and "--force" in capsys.readouterr().err  # refused: nothing replaced
    assert (out / "mine.txt").is_file()
    assert main([*argv, "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / "attention.npz").is_file()  # the old directory is gone whole
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"jpeg")
    for target, message in ((foreign, "does not look like"), (run, "source model")):
        assert main([*argv[:-1], str(target), "--force"]) == 1
        assert message in capsys.readouterr().err
    assert (foreign / "cat.jpg").read_bytes() == b"jpeg" and (run / "metrics.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att", "photos", "run"]  # no temporary left
