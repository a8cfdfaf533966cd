"""Routing seen through hooks: counts equal the layers' own statistics, the measures behave at
their known limits, and `moeformer inspect routing` writes its files or fails early."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from inspect_models import MOE, PAIRS, save_run, tiny_loaded, write_pairs

from moeformer.cli import main
from moeformer.inspect.corpus import InspectError, Item, batches, encode_item, read_items
from moeformer.inspect.measures import entropy, mutual_information
from moeformer.inspect.routing import corpus_routing, moe_layers, sentence_routing

pytestmark = pytest.mark.usefixtures("single_thread")
TOPK = {"kind": "topk", "n_experts": 4, "top_k": 2, "expert_hidden": 16}
ITEMS = [Item(s, t) for s, t in PAIRS]


def _stats_counts(loaded, items):
    """tokens_per_expert as the model itself reports it, for the same single padded batch."""
    examples = [encode_item(i, loaded.tokenizers, loaded.model.config.arch, 64) for i in items]
    batch = next(batches(examples, loaded.tokenizers.target.pad_id, len(examples)))
    with torch.no_grad():
        stats = loaded.model(**batch.inputs).reports.stats
    return {name: s["tokens_per_expert"].double() for name, s in stats.items()}


@pytest.mark.parametrize(
    "arch, moe",
    [("seq2seq", MOE), ("seq2seq", {**TOPK, "capacity_factor": 0.5}), ("decoder", MOE)],
    ids=["deepseek", "topk-capacity", "lm"],
)
def test_counts_equal_the_layers_tokens_per_expert(arch, moe):
    loaded = tiny_loaded(arch, moe)
    items = ITEMS if arch == "seq2seq" else [Item(s) for s, _ in PAIRS]
    layers = corpus_routing(loaded, items, batch_size=len(items))
    expected = _stats_counts(loaded, items)
    assert set(layers) == set(expected)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.counts, expected[name], msg=name)
        assert layer.n_tokens * layer.top_k == int(layer.counts.sum()) + layer.dropped
    if "capacity_factor" in moe:
        assert sum(layer.dropped for layer in layers.values()) > 0  # the capacity limit did drop some


def test_batching_does_not_change_the_totals():
    loaded = tiny_loaded()
    one = corpus_routing(loaded, ITEMS, batch_size=len(ITEMS))
    many = corpus_routing(loaded, ITEMS, batch_size=2)
    for name in one:
        torch.testing.assert_close(one[name].by_token, many[name].by_token)


def test_a_router_that_ignores_the_token_carries_no_information():
    loaded = tiny_loaded()
    for layer in moe_layers(loaded.model).values():
        layer.router.weight.data.zero_()  # equal scores: every token gets the same experts
    for layer in corpus_routing(loaded, ITEMS).values():
        s = layer.summary(loaded.tokenizers.source)
        assert s["mi_token"] == pytest.approx(0.0, abs=1e-12) and s["mi_script"] == pytest.approx(0.0, abs=1e-12)
        assert s["router_entropy"] == pytest.approx(math.log(layer.n_experts), rel=1e-6)  # uniform gate


def test_mutual_information_is_within_its_bounds():
    loaded = tiny_loaded()
    for layer in corpus_routing(loaded, ITEMS).values():
        s = layer.summary(loaded.tokenizers.source)
        assert 0.0 < s["mi_token"] <= s["load_entropy"] + 1e-9 <= math.log(layer.n_experts) + 1e-9
        assert 0.0 <= s["mi_script"] <= s["mi_token"] + 1e-9  # the script is a function of the token
        assert 0.0 <= s["router_entropy"] <= s["max_entropy"] + 1e-9


def test_measures_at_their_limits():
    assert float(entropy(torch.ones(8))) == pytest.approx(math.log(8))
    assert mutual_information(torch.outer(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0, 5.0]))) == pytest.approx(0)
    assert mutual_information(torch.eye(4) * 7) == pytest.approx(math.log(4))
    assert mutual_information(torch.zeros(3, 2)) == 0.0


@pytest.mark.parametrize("moe, shared", [(MOE, True), (TOPK, False)], ids=["shared", "none"])
def test_shared_share_is_a_fraction_and_zero_without_shared_experts(moe, shared):
    loaded = tiny_loaded(moe=moe)
    for layer in corpus_routing(loaded, ITEMS).values():
        share = layer.summary(loaded.tokenizers.source)["shared_share"]
        assert 0.0 < share < 1.0 if shared else share == 0.0


def test_sentence_routing_lists_each_tokens_experts_best_first():
    loaded = tiny_loaded()
    routing = sentence_routing(loaded, ITEMS[0])
    assert routing.tokens["decoder"][0] == "<bos>" and routing.tokens["encoder"][-1] == "<eos>"
    for name, index in routing.index.items():
        stack = name.split(".")[0]
        assert index.shape == (len(routing.tokens[stack]), MOE["top_k"])
        assert int(index.max()) < MOE["n_experts"]
        assert torch.all(routing.weights[name][:, :-1] >= routing.weights[name][:, 1:])


def test_an_lm_over_parallel_data_compares_the_two_sides(tmp_path):
    loaded = tiny_loaded("decoder")
    items = read_items(write_pairs(tmp_path / "pairs.txt"), "decoder")
    assert [i.side for i in items[:2]] == [0, 1] and len(items) == 2 * len(PAIRS)
    for layer in corpus_routing(loaded, items, batch_size=4).values():
        s = layer.summary(loaded.tokenizers.source)
        assert 0.0 <= s["mi_side"] <= math.log(2) + 1e-9
        assert s["script_load"]["han"] and sum(s["script_load"]["han"]) > 0


def test_a_dense_model_has_no_routing():
    with pytest.raises(InspectError, match="no MoE layer"):
        corpus_routing(tiny_loaded(moe=None), ITEMS)


def test_cli_writes_json_arrays_and_pictures(tmp_path, capsys):
    run = save_run(tmp_path / "run", tiny_loaded())
    out = tmp_path / "rt"
    assert main(["inspect", "routing", str(run), "--data", str(write_pairs(tmp_path / "p.tsv")), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    info = json.loads((out / "routing.json").read_text(encoding="utf-8"))
    assert info["items"] == len(PAIRS) and [s["layer"] for s in info["layers"]][:2] == ["encoder.0", "encoder.1"]
    arrays = np.load(out / "routing.npz")
    assert {"encoder.0/load", "decoder.1/by_token", "sentence/decoder.0/index", "sentence/decoder/tokens"} <= set(
        arrays.files
    )
    assert arrays["encoder.0/load"].sum() == arrays["encoder.0/by_token"].sum()
    for png in ("routing_sentence.png", "routing_load.png", "routing_measures.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")


def test_cli_fails_before_loading_on_empty_data_and_on_a_dense_model(tmp_path, capsys):
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    missing_run = tmp_path / "no-run"  # the data check comes first, so even a missing run says "empty"
    assert main(["inspect", "routing", str(missing_run), "--data", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "empty" in capsys.readouterr().err
    dense = save_run(tmp_path / "dense", tiny_loaded(moe=None))
    data = write_pairs(tmp_path / "p.tsv")
    assert main(["inspect", "routing", str(dense), "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    assert "no MoE layer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_corpus_sample_spans_a_sorted_file_and_the_example_is_typical():
    """Tatoeba is sorted by length: a limit takes items from the whole file, not its short head."""
    from moeformer.inspect.corpus import Item, example_item, spread

    values = list(range(100))
    assert spread(values, 4) == [0, 25, 50, 75] and spread(values, None) == values and spread(values, 500) == values
    items = [Item("x" * n) for n in (1, 9, 3, 7, 5)]
    assert example_item(items).source == "xxxxx"


def test_the_sentence_options_say_what_the_code_does(tmp_path, capsys):
    """--text's help names the median-length default that example_item picks; --target alone was ignored."""
    from moeformer.cli import build_parser

    inspect = build_parser()._subparsers._group_actions[0].choices["inspect"]
    routing = inspect._subparsers._group_actions[0].choices["routing"]
    helps = {a.option_strings[0]: a.help for a in routing._actions if a.option_strings}
    assert "median-length" in helps["--text"] and "first" not in helps["--text"]
    data = write_pairs(tmp_path / "p.tsv")
    for command in (["inspect", "routing"], ["report"]):
        assert main([*command, str(tmp_path / "no-run"), "--data", str(data), "--target", "你好",
                     "--out", str(tmp_path / "o")]) == 1  # fmt: skip
        assert "--target is the translation of --text" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
