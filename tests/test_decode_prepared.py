"""Weights prepared for decoding: every kernel computes the same products as the original layers,
a prepared model gives the original's logits and greedy tokens (eagerly and through a traced
fixed-shape step), and the original model is left as it was."""

from __future__ import annotations

import pytest
import torch
from decode_models import MODELS, decode_steps, left_padded_prompt, tiny
from torch import nn

from moeformer.decode import beam_generate, greedy_generate, sample_generate, speculative_generate
from moeformer.decode.prepared import (
    EXPERT_KERNELS,
    KERNELS,
    PreparedLinear,
    available_kernels,
    prepare_for_decoding,
    prepared_experts,
)
from moeformer.models import build_model
from moeformer.moe.experts import Experts
from moeformer.presets import model_config_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")


@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("batch", [1, 8])
def test_every_kernel_equals_the_linear(batch, bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    x = torch.randn(2, 3, 24)  # more rows than the batch it was prepared for: any row count works
    assert "onednn" in available_kernels(linear.weight)  # the CPU build these tests run on has mkldnn
    for kernel in available_kernels(linear.weight):
        torch.testing.assert_close(PreparedLinear(linear, kernel, batch)(x), linear(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu"])
@pytest.mark.parametrize("kernel", EXPERT_KERNELS)
@pytest.mark.parametrize("batch", [5, 2], ids=["decoding-rows", "prompt-rows"])
def test_every_expert_kernel_equals_the_grouped_experts(batch, kernel, activation):
    """Random routing of 5 tokens to 2 of 6 experts, two assignments dropped (index E); with more
    rows than the batch prepared for (a prompt), the grouped experts take them."""
    torch.manual_seed(0)
    experts = Experts(6, 16, 8, activation=activation)
    x = torch.randn(5, 16)
    index = torch.rand(5, 6).argsort(-1)[:, :2]
    index[1, 0] = index[3, 1] = 6
    weights = torch.rand(5, 2)
    expected = experts.forward_reference(x, index, weights)
    got = prepared_experts(experts, kernel, batch=batch)(x, index, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("kernel", ["auto", *KERNELS])
@pytest.mark.parametrize("name", list(MODELS))
def test_prepared_model_gives_the_original_logits(name, kernel):
    model = tiny(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = left_padded_prompt()
    expert_kernel = {"linear": "grouped", "transposed": "chosen", "onednn": "dense"}.get(kernel, "auto")
    # prepared for all the prompt's rows, so that its pass runs the chosen kernels, experts included
    prepared, plan = prepare_for_decoding(model, batch=ids.numel(), kernel=kernel, expert_kernel=expert_kernel)
    torch.testing.assert_close(
        prepared(ids, padding_mask=mask).logits, model(ids, padding_mask=mask).logits, atol=1e-5, rtol=1e-5
    )
    assert all(type(m) is not PreparedLinear for m in model.modules())  # the original keeps its layers
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert prepared.embedding is not model.embedding  # a structural copy ...
    assert prepared.embedding.embed.weight is model.embedding.embed.weight  # ... sharing the parameters
    assert set(plan.linear.values()) <= set(KERNELS)
    has_experts = any(type(m) is Experts for m in model.modules())
    assert (plan.experts in EXPERT_KERNELS) if has_experts else plan.experts is None
    if kernel != "auto":
        assert set(plan.linear.values()) == {kernel}
        assert plan.experts == (expert_kernel if has_experts else None)
    assert str(plan.batch) in plan.summary()


@torch.no_grad()
@pytest.mark.parametrize("name", list(MODELS))
def test_prepared_decoding_gives_the_same_greedy_tokens(name):
    """Eagerly and through the traced fixed-shape step (aot_eager: the custom ops' fake kernels)."""
    model = tiny(name)
    ids, mask = left_padded_prompt()
    expected = greedy_generate(model, ids, max_new_tokens=8, padding_mask=mask)
    prepared, _ = prepare_for_decoding(model, batch=3)
    assert torch.equal(greedy_generate(prepared, ids, max_new_tokens=8, padding_mask=mask), expected)
    assert torch.equal(decode_steps(prepared, ids, mask, 8, backend="aot_eager")[0], expected)


def test_bad_arguments_are_named():
    model = tiny("dense")
    with pytest.raises(ValueError, match=r"kernel must be 'auto' or one of .*linear.*got 'fast'"):
        prepare_for_decoding(model, batch=1, kernel="fast")
    with pytest.raises(ValueError, match=r"expert_kernel must be 'auto' or one of .*chosen.*got 'loop'"):
        prepare_for_decoding(model, batch=1, expert_kernel="loop")
    with pytest.raises(ValueError, match="batch and rounds must be >= 1, got batch=0"):
        prepare_for_decoding(model, batch=0)
    with pytest.raises(ValueError, match="expert kernel must be one of"):
        prepared_experts(Experts(2, 4, 4), "loop", batch=1)
    linear = nn.Linear(4, 4).double()
    with pytest.raises(ValueError, match="kernel 'onednn' cannot run here; allowed: .*transposed"):
        PreparedLinear(linear, "onednn", 1)


@torch.no_grad()
def test_compiled_steps_of_several_models_in_one_process_keep_apart():
    """Later steps skip dynamo's full guard check (decode.compiled): generations alternating
    between models whose graphs differ still each run their own graph."""
    ids, mask = left_padded_prompt()
    models = [tiny("dense"), tiny("deepseek"), tiny("mla")]
    # same structure, kernels differ: a graph traced for one layout would be wrong for the other
    for kernel in ("linear", "transposed"):
        models.append(prepare_for_decoding(models[0], batch=3, kernel=kernel)[0])
    models.append(prepare_for_decoding(models[1], batch=3, kernel="transposed", expert_kernel="chosen")[0])
    expected = [greedy_generate(m, ids, max_new_tokens=6, padding_mask=mask) for m in models]
    for _ in range(2):
        for model, tokens in zip(models, expected):
            assert torch.equal(decode_steps(model, ids, mask, 6, backend="aot_eager")[0], tokens)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("expert_kernel", ["dense", "chosen"])
def test_prepared_model_compiled_by_inductor_gives_the_same_tokens(expert_kernel):
    """The custom ops (oneDNN's linear, the chosen experts) inside inductor's C++-wrapped graph."""
    model = tiny("deepseek")
    ids, mask = left_padded_prompt()
    expected = greedy_generate(model, ids, max_new_tokens=8, padding_mask=mask)
    prepared, _ = prepare_for_decoding(model, batch=3, kernel="onednn", expert_kernel=expert_kernel)
    assert torch.equal(greedy_generate(prepared, ids, max_new_tokens=8, padding_mask=mask, compile=True), expected)


@torch.no_grad()
def test_hooks_added_later_stay_with_their_model():
    """The copy's hook registries are its own: a hook added to the original after preparing does
    not run in the prepared copy (and the other way round)."""
    model = tiny("dense")
    prepared, _ = prepare_for_decoding(model, batch=3, kernel="linear")
    ids, _ = left_padded_prompt()
    calls = []
    handle = model.norm.register_forward_hook(lambda *_: calls.append("original"))
    prepared(ids)
    assert calls == []
    model(ids)
    assert calls == ["original"]
    handle.remove()


@torch.no_grad()
@pytest.mark.parametrize("expert_kernel", ["dense", "chosen"])
def test_every_decoding_method_takes_the_prepared_model(expert_kernel):
    """Beam search, seeded sampling and speculative decoding with two MTP modules (MLA, DeepSeekMoE):
    the prepared copy gives the original's tokens (its passes of several rows per sequence go to
    the grouped experts)."""
    torch.manual_seed(0)
    config = {"preset": "lm-tiny", "vocab_size": 37, "n_layers": 2, "dropout": 0.0, "mtp": {"depth": 2},
              "attention": {"kind": "mla", "n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                            "qk_rope_head_dim": 4, "v_head_dim": 8},
              "moe": {"kind": "deepseek", "n_experts": 6, "top_k": 2, "n_shared": 1}}  # fmt: skip
    model = build_model(model_config_from_dict(config)).eval()
    ids, _ = left_padded_prompt()
    ids = ids[2:]  # one unpadded row
    prepared, _ = prepare_for_decoding(model, batch=1, kernel="transposed", expert_kernel=expert_kernel)
    for decode in (
        lambda m: beam_generate(m, ids, beam_size=3, max_new_tokens=6, eos_id=1),
        lambda m: sample_generate(m, ids, max_new_tokens=6, generator=torch.Generator().manual_seed(0)),
        lambda m: speculative_generate(m, ids, max_new_tokens=10).tokens,
    ):
        assert torch.equal(torch.as_tensor(decode(prepared)), torch.as_tensor(decode(model)))
