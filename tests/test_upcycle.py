"""Dense -> MoE upcycling: sparse upcycling is exact at initialisation, the fine-grained segments
sum to the dense FFN, every other weight is kept, and impossible requests are refused."""

from __future__ import annotations

import json

import pytest
import torch

from moeformer.cli import main
from moeformer.model_config import MoEConfig
from moeformer.models import build_model
from moeformer.models.upcycle import UpcycleError, logit_gap, upcycle
from moeformer.moe.layer import MoELayer, segment_experts
from moeformer.presets import model_config_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")


def _dense(activation="swiglu", bias=False, arch="decoder", **extra):
    torch.manual_seed(0)
    preset = "lm-tiny" if arch == "decoder" else "transformer-tiny"
    config = {"preset": preset, "vocab_size": 50, "dropout": 0.0, "ffn": {"d_ff": 64, "activation": activation,
              "bias": bias}, **extra}  # fmt: skip
    return build_model(model_config_from_dict(config)).eval()


def _inputs(model):
    tokens = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))
    return (tokens, tokens[:, :7]) if model.config.arch == "seq2seq" else tokens


@pytest.mark.parametrize(
    "activation, bias, arch",
    [("swiglu", False, "decoder"), ("gelu", True, "decoder"), ("relu", True, "seq2seq"), ("swiglu", False, "seq2seq")],
)  # fmt: skip
def test_sparse_upcycling_computes_the_dense_model_exactly(activation, bias, arch):
    dense = _dense(activation, bias, arch)
    moe = MoEConfig(kind="topk", n_experts=8, top_k=2, expert_hidden=64, normalize=True)
    new = upcycle(dense, moe, seed=3)
    assert sum(isinstance(m, MoELayer) for m in new.modules()) == sum(
        1 for n, _ in dense.named_modules() if n.endswith(".ffn")
    )
    gap = logit_gap(dense, new, _inputs(dense))
    assert gap["max_abs_logit_diff"] < 1e-5 and gap["mean_kl"] < 1e-7
    kept = {n: t for n, t in dense.state_dict().items() if ".ffn." not in n}
    new_state = new.state_dict()
    assert all(torch.equal(new_state[n], t) for n, t in kept.items())


def test_fine_grained_segments_sum_to_the_dense_ffn_and_the_gap_is_measured():
    dense = _dense()
    numbers = segment_experts(n_experts=8, top_k=2, d_ff=64, granularity=4, n_shared=1)
    new = upcycle(dense, MoEConfig(kind="deepseek", normalize=False, **numbers))
    layer = next(m for m in new.modules() if isinstance(m, MoELayer))
    ffn = dense.layers[0].ffn
    x = torch.randn(5, 32)
    # the shared segment plus one copy of each of the other three segments, weight 1: the dense FFN
    routed = layer.experts(x, torch.tensor([[0, 1, 2]] * 5), torch.ones(5, 3))
    torch.testing.assert_close(layer.shared_output(x) + routed, ffn(x).output, atol=1e-5, rtol=1e-5)
    assert layer.experts.down_proj.shape == (31, 32, 16)
    assert torch.equal(layer.experts.down_proj[0], layer.experts.down_proj[4])  # segments cycle over experts
    gap = logit_gap(dense, new, _inputs(dense))
    assert gap["max_abs_logit_diff"] > 1e-3  # not exact at initialisation, as documented


def test_layers_kept_dense_stay_the_same_module_weights():
    dense = _dense(n_layers=3)
    new = upcycle(dense, MoEConfig(kind="topk", n_experts=4, top_k=2, expert_hidden=64, first_dense=1))
    assert not isinstance(new.layers[0].ffn, MoELayer) and isinstance(new.layers[1].ffn, MoELayer)
    assert torch.equal(new.layers[0].ffn.down_proj.weight, dense.layers[0].ffn.down_proj.weight)
    assert logit_gap(dense, new, _inputs(dense))["max_abs_logit_diff"] < 1e-5


@pytest.mark.parametrize(
    "moe, match",
    [
        (MoEConfig(kind="topk", n_experts=4, top_k=2, expert_hidden=48), "must divide the dense FFN's"),
        (MoEConfig(kind="deepseek", n_experts=7, top_k=3, expert_hidden=16, n_shared=5), "at most 64"),
    ],
)
def test_impossible_upcycling_is_refused(moe, match):
    with pytest.raises(UpcycleError, match=match):
        upcycle(_dense(), moe)
    with pytest.raises(UpcycleError, match="fine-grained upcycling of an FFN with biases"):
        upcycle(_dense("gelu", True), MoEConfig(kind="topk", n_experts=8, top_k=2, expert_hidden=32))
    moe_model = upcycle(_dense(), MoEConfig(kind="topk", n_experts=4, top_k=2, expert_hidden=64))
    with pytest.raises(UpcycleError, match="already has MoE layers"):
        upcycle(moe_model, MoEConfig(kind="topk", n_experts=4, top_k=2, expert_hidden=64))


DENSE_TOML = """
[model]
preset = "lm-tiny"
vocab_size = 40
d_model = 32
n_layers = 2
max_seq_len = 32
dropout = 0.0
[model.ffn]
d_ff = 64
[data]
corpus = "text"
path = "text.txt"
tokenizer = "char"
seq_len = 32
valid_size = 8
test_size = 8
[train]
steps = {steps}
batch_tokens = 256
lr = {lr}
warmup_steps = 0
eval_every = 1000
eval_batches = 4
log_every = 1
bleu_samples = 0
"""


def _best_valid(run) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return min(r["valid_loss"] for r in rows if "valid_loss" in r)


def test_upcycle_then_train_from_it(tmp_path, monkeypatch, capsys):
    """Train dense, upcycle (sparse: exact), start a run from it with train.init_from: with a
    vanishing learning rate its validation loss is the dense model's."""
    monkeypatch.chdir(tmp_path)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    lines = [" ".join(words[(i * 5 + j) % len(words)] for j in range(8)) for i in range(300)]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "dense.toml").write_text(DENSE_TOML.format(steps=30, lr=3e-3))
    assert main(["train", "dense.toml", "--out", "dense", "--quiet"]) == 0
    assert main(["upcycle", "dense", "--out", "moe", "--to", "topk", "--experts", "4", "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "exact at initialisation" in printed
    command = printed.split("\n  moeformer ")[1].split()
    assert command[0] == "train" and command[-1] == "train.init_from=moe"
    (tmp_path / "cont.toml").write_text(DENSE_TOML.format(steps=1, lr=1e-12))
    assert main(["train", "cont.toml", *command[2:], "--out", "cont", "--quiet"]) == 0
    assert _best_valid(tmp_path / "cont") == pytest.approx(_best_valid(tmp_path / "dense"), abs=1e-4)
    sidecar = json.loads((tmp_path / "cont" / "run.json").read_text())
    assert sidecar["config"]["model"]["moe"]["kind"] == "topk"

    # a config that does not describe the checkpoint's model fails with what to do
    assert main(["train", "cont.toml", "--set", "train.init_from=moe", "--out", "bad", "--quiet"]) == 1
    assert "the run's [model] (and [model.moe]) must describe the checkpoint's model" in capsys.readouterr().err
