"""Hugging Face interop: import tiny random checkpoints of five families with equal logits, export ours
back to transformers with equal logits, and refuse what has no counterpart, naming why."""

from __future__ import annotations

import json
import math

import pytest
import safetensors
import safetensors.torch
import torch

from moeformer import DecoderLM
from moeformer.interop import InteropError, export_hf, family_for, import_hf
from moeformer.publish import OutputExistsError

transformers = pytest.importorskip("transformers", reason="interop tests compare logits with transformers' models")

from hf_models import HF_CONFIGS, hf_model, lm_config, our_model, token_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4


def hf_logits(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=attention_mask).logits


def our_logits(model: DecoderLM, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, padding_mask=padding_mask).logits


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_import_gives_transformers_logits(name, tmp_path):
    theirs = hf_model(HF_CONFIGS[name]())
    theirs.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    tokens = token_batch(theirs.config.vocab_size)
    expected = hf_logits(theirs, tokens)
    assert expected.std() > 0.05  # random weights, not an all-zero model
    assert (our_logits(ours, tokens) - expected).abs().max() < ATOL
    # built on the meta device and filled in place: a trainable model, tied where the config says
    assert all(p.requires_grad and p.device.type == "cpu" for p in ours.parameters())
    assert (ours.lm_head.weight is ours.embedding.embed.weight) == ours.config.tie_embeddings


def test_import_maps_qwen3_norms_and_head_width(tmp_path):
    hf_model(HF_CONFIGS["qwen3_moe"]()).save_pretrained(tmp_path)
    config = import_hf(tmp_path).config
    assert config.attention.qk_norm and config.head_dim == 6 and config.d_model == 32
    assert (config.moe.kind, config.moe.n_shared, config.moe.normalize, config.moe.first_dense) == ("topk", 0, True, 1)


def test_import_reads_sharded_and_bfloat16_checkpoints(tmp_path):
    theirs = hf_model(HF_CONFIGS["mixtral"]())
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = token_batch(theirs.config.vocab_size)
    assert (our_logits(import_hf(tmp_path / "sharded"), tokens) - hf_logits(theirs, tokens)).abs().max() < ATOL
    ours = import_hf(tmp_path / "sharded")
    with torch.no_grad():  # the weights are the model's own memory: training writes never reach the files
        ours.norm.weight.add_(1.0)
    assert torch.equal(import_hf(tmp_path / "sharded").norm.weight, theirs.model.norm.weight)
    theirs.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ours = import_hf(tmp_path / "bf16")  # float32 by default: the bf16 values, exactly
    assert torch.equal(ours.layers[0].ffn.router.weight, theirs.model.layers[0].mlp.gate.weight.float())
    assert import_hf(tmp_path / "bf16", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_import_maps_each_family_to_its_parts(tmp_path):
    hf_model(HF_CONFIGS["qwen2_moe"]()).save_pretrained(tmp_path)
    config = import_hf(tmp_path).config
    assert config.attention.qkv_bias is True and config.attention.bias is False
    moe = config.moe
    assert (moe.kind, moe.n_experts, moe.top_k, moe.n_shared, moe.shared_hidden) == ("deepseek", 6, 2, 1, 40)
    assert moe.shared_gate and not moe.normalize and moe.first_dense == 1


def test_import_left_padded_batch_matches_transformers(tmp_path):
    theirs = hf_model(HF_CONFIGS["mixtral"]())
    theirs.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    tokens = token_batch(theirs.config.vocab_size)
    padding = torch.zeros_like(tokens, dtype=torch.bool)
    padding[0, :3] = True
    position_ids = ((~padding).long().cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = theirs(input_ids=tokens, attention_mask=(~padding).long(), position_ids=position_ids).logits
    got = our_logits(ours, tokens, padding)
    assert (got[~padding] - expected[~padding]).abs().max() < ATOL


MLA = {"kind": "mla", "n_kv_heads": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8}
MLA.update(qk_rope_head_dim=4, v_head_dim=8)
EXPORTABLE = {
    "mla-dense": ({"norm_eps": 1e-6, "attention": {**MLA, "q_lora_rank": 12}}, "deepseek_v3"),
    "mla-deepseek-v3": (
        {
            "norm_eps": 1e-6,
            "attention": MLA,
            "moe": {
                "kind": "deepseek",
                "n_experts": 8,
                "top_k": 2,
                "n_shared": 1,
                "score": "sigmoid",
                "n_group": 4,
                "topk_group": 2,
                "routed_scaling": 2.5,
                "first_dense": 1,
            },
        },
        "deepseek_v3",
    ),
    "dense": ({}, "llama"),
    "dense-tied-biases": ({"tie_embeddings": True, "attention": {"bias": True}, "ffn": {"bias": True}}, "llama"),
    "llama3-rope-scaling": (
        {"attention": {"rope_theta": 5e5, "rope_scaling": {"factor": 8.0, "original_max_seq_len": 4}}},
        "llama",
    ),
    "qwen2": ({"attention": {"qkv_bias": True}}, "qwen2"),
    "qwen3": ({"tie_embeddings": True, "attention": {"qk_norm": True, "head_dim": 16}}, "qwen3"),
    "qwen3_moe": (
        {
            "attention": {"qk_norm": True},
            "moe": {"kind": "topk", "n_experts": 4, "top_k": 2, "normalize": False, "placement": "every_other"},
        },
        "qwen3_moe",
    ),
    "llama-head-dim": ({"attention": {"head_dim": 12}}, "llama"),
    "mla-deepseek-v2": (
        {
            "norm_eps": 1e-6,
            "attention": {**MLA, "q_lora_rank": 12},
            "moe": {"kind": "deepseek", "n_experts": 6, "top_k": 2, "n_shared": 2, "normalize": False}
            | {"routed_scaling": 1.5, "first_dense": 1},
        },
        "deepseek_v2",
    ),
    "mla-yarn": (
        {
            "norm_eps": 1e-6,
            "attention": {
                **MLA,
                "rope_scaling": {"kind": "yarn", "factor": 16.0, "original_max_seq_len": 4, "mscale_all_dim": 1.0},
            },
        },
        "deepseek_v3",
    ),
    "topk": ({"moe": {"kind": "topk", "n_experts": 4, "top_k": 2, "expert_hidden": 16}}, "mixtral"),
    "deepseek-fine-grained-shared": (
        {
            "attention": {"qkv_bias": True},
            "moe": {"kind": "deepseek", "n_experts": 4, "top_k": 2, "granularity": 2, "n_shared": 2, "first_dense": 1},
        },
        "qwen2_moe",
    ),
    "deepseek-gated-every-other": (
        {
            "moe": {
                "kind": "deepseek",
                "n_experts": 4,
                "top_k": 1,
                "n_shared": 1,
                "shared_hidden": 24,
                "shared_gate": True,
                "normalize": False,
                "placement": "every_other",
            }
        },
        "qwen2_moe",
    ),
}


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_export_loads_in_transformers_with_equal_logits(name, tmp_path):
    overrides, family = EXPORTABLE[name]
    ours = our_model(lm_config(**overrides))
    assert export_hf(ours, tmp_path / "hf") == family
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.model_type == family
    tokens = token_batch(ours.config.vocab_size)
    expected = our_logits(ours, tokens)
    assert expected.std() > 0.05
    assert (hf_logits(theirs, tokens) - expected).abs().max() < ATOL


@pytest.mark.parametrize("name", ["dense", "topk", "deepseek-gated-every-other", "mla-deepseek-v3", "mla-deepseek-v2"])
def test_export_then_import_is_the_same_model(name, tmp_path):
    ours = our_model(lm_config(**EXPORTABLE[name][0]))
    export_hf(ours, tmp_path / "hf")
    back = import_hf(tmp_path / "hf")
    assert back.state_dict().keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    tokens = token_batch(ours.config.vocab_size)
    assert torch.equal(our_logits(back, tokens), our_logits(ours, tokens))


def test_export_writes_a_tokenizer_transformers_reads(tmp_path):
    from moeformer.data.bpe_tokenizer import BPETokenizer

    tok = BPETokenizer.train(["Are you OK? 你好吗？"] * 20, vocab_size=300)
    ours = our_model(lm_config(vocab_size=tok.vocab_size))
    export_hf(ours, tmp_path / "hf", tokenizer=tok)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs("Are you OK? 你好吗？", add_special_tokens=False)["input_ids"] == tok.encode("Are you OK? 你好吗？")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == tok.eos_id


REFUSED = {
    "soft": ({"moe": {"kind": "soft", "n_experts": 4}}, "kind 'soft'"),
    "post-norm": ({"norm_position": "post"}, "pre-norm"),
    "sinusoidal": ({"position": "sinusoidal"}, "position"),
    "relu": ({"ffn": {"activation": "relu"}}, "swiglu"),
    "sigmoid-without-mla": (
        {"moe": {"kind": "deepseek", "n_experts": 4, "top_k": 2, "n_shared": 1, "score": "sigmoid"}},
        "MLA",
    ),
    "mla-eps": ({"attention": MLA}, "norm_eps"),
    "qwen2-head-dim": ({"attention": {"qkv_bias": True, "head_dim": 12}}, "head_dim"),
    "qk-norm-shared": ({"attention": {"qk_norm": True}, "moe": {"kind": "deepseek", "n_shared": 1}}, "Qwen3-MoE"),
    "mla-softmax-renormalised": (
        {"norm_eps": 1e-6, "attention": MLA, "moe": {"kind": "deepseek", "n_experts": 4, "n_shared": 1}},
        "DeepSeek-V2",
    ),
    "capacity": ({"moe": {"kind": "topk", "n_experts": 4, "top_k": 2, "capacity_factor": 1.0}}, "capacity"),
    "topk-unnormalised": ({"moe": {"kind": "topk", "n_experts": 4, "top_k": 2, "normalize": False}}, "Mixtral"),
    "mixtral-with-biases": ({"attention": {"qkv_bias": True}, "moe": {"kind": "topk", "n_experts": 4}}, "biases"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_export_refuses_what_transformers_cannot_compute(name, tmp_path):
    overrides, words = REFUSED[name]
    with pytest.raises(InteropError, match=words):
        export_hf(DecoderLM(lm_config(**overrides)), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_trained_balancing_bias_without_sigmoid_routing(tmp_path):
    ours = our_model(lm_config(moe={"kind": "topk", "n_experts": 4, "top_k": 2}))
    with torch.no_grad():
        ours.layers[1].ffn.router.expert_bias[0] = 0.01
    with pytest.raises(InteropError, match="layers.1.ffn.router.expert_bias"):
        export_hf(ours, tmp_path / "hf")


def test_export_never_overwrites_without_force_nor_a_foreign_directory(tmp_path):
    ours = our_model(lm_config())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists; .* pass --force"):
        export_hf(ours, tmp_path / "hf")
    with pytest.raises(OutputExistsError, match="does not look like a directory this tool wrote"):
        export_hf(ours, tmp_path / "hf", force=True)
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
    (tmp_path / "hf" / "keep.txt").unlink()
    export_hf(ours, tmp_path / "hf", force=True)
    other = our_model(lm_config(), seed=4)
    export_hf(other, tmp_path / "hf", force=True)  # our own output: replaced
    assert import_hf(tmp_path / "hf").lm_head.weight.equal(other.lm_head.weight)


@pytest.mark.parametrize("moe", [
    {"kind": "deepseek", "n_experts": 4, "top_k": 2, "n_shared": 1, "expert_hidden": 22},  # -> Qwen2-MoE
    {"kind": "topk", "n_experts": 4, "top_k": 2, "expert_hidden": 22},  # -> Mixtral
])  # fmt: skip
def test_export_with_an_odd_expert_width_runs_after_a_plain_from_pretrained(moe, tmp_path):
    """transformers' default grouped_mm kernel needs 16-byte strides; the saved config asks for eager."""
    ours = our_model(lm_config(moe=moe))
    export_hf(ours, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["experts_implementation"] == "eager"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = token_batch(ours.config.vocab_size)
    assert (hf_logits(theirs, tokens) - our_logits(ours, tokens)).abs().max() < ATOL
    export_hf(our_model(lm_config(moe={**moe, "expert_hidden": 24})), tmp_path / "wide")
    assert "experts_implementation" not in json.loads((tmp_path / "wide" / "config.json").read_text())


def test_family_is_chosen_from_the_config():
    assert family_for(lm_config()) == "llama"
    assert family_for(lm_config(moe={"kind": "topk", "n_experts": 4})) == "mixtral"


def test_import_errors_name_the_problem(tmp_path):
    with pytest.raises(InteropError, match="no such checkpoint directory"):
        import_hf(tmp_path / "absent")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(InteropError, match="no config.json"):
        import_hf(tmp_path / "empty")
    hf_model(HF_CONFIGS["llama"]()).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for change, words in [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 4}, r"self_attn.q_proj.weight has shape \(32, 32\), but config.json implies \(16, 32\)"),
    ]:
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(InteropError, match=words):
            import_hf(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(InteropError, match="tensors the llama config needs are missing"):
        import_hf(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(InteropError, match="have no place in the model"):
        import_hf(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InteropError, match="unreadable or truncated"):
        import_hf(tmp_path / "m")


def test_a_hub_style_deepseek_v3_config_maps_field_by_field():
    """The field names and legacy RoPE layout of the published DeepSeek-V3 config.json (sizes shrunk)."""
    from moeformer.interop import config_from_hf

    hub = {
        "model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 16, "num_hidden_layers": 4, "num_nextn_predict_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 16,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 8,
        "v_head_dim": 16, "qk_nope_head_dim": 16, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
    }  # fmt: skip
    config = config_from_hf(hub)
    a, moe = config.attention, config.moe
    assert (a.kind, a.q_lora_rank, a.kv_lora_rank, a.qk_rope_head_dim) == ("mla", 48, 32, 8)
    assert (a.rope_scaling.kind, a.rope_scaling.factor, a.rope_scaling.original_max_seq_len) == ("yarn", 40.0, 4096)
    assert a.rope_scaling.softmax_scale_factor() == pytest.approx((0.1 * math.log(40) + 1) ** 2)
    assert (moe.score, moe.n_group, moe.topk_group, moe.routed_scaling, moe.first_dense) == ("sigmoid", 8, 4, 2.5, 3)
    with pytest.raises(InteropError, match="quantized"):
        config_from_hf({**hub, "quantization_config": {"quant_method": "fp8"}})


def _v3_with_mtp(depth=1):
    overrides = dict(EXPORTABLE["mla-deepseek-v3"][0])
    return our_model(lm_config(**overrides, mtp={"depth": depth}))


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_layers_round_trip_bit_for_bit_and_transformers_ignores_them(depth, tmp_path):
    """DeepSeek-V3 keeps MTP module k as layer num_hidden_layers + k; transformers does not run it."""
    ours = _v3_with_mtp(depth)
    assert export_hf(ours, tmp_path / "hf") == "deepseek_v3"
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == depth
    with safetensors.safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    last = f"model.layers.{3 + depth - 1}."
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias"):  # fmt: skip
        assert last + part in names, part
    back = import_hf(tmp_path / "hf")
    assert back.config.mtp.depth == depth
    assert back.state_dict().keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    tokens = token_batch(ours.config.vocab_size)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (hf_logits(theirs, tokens) - our_logits(ours, tokens)).abs().max() < ATOL
    torch.testing.assert_close(back(tokens, mtp=True).mtp_logits[-1], ours(tokens, mtp=True).mtp_logits[-1])


def test_mtp_import_checks_the_shared_copies_and_skips_announced_but_absent_layers(tmp_path):
    ours = _v3_with_mtp()
    export_hf(ours, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    tensors["model.layers.3.shared_head.head.weight"] += 1.0
    safetensors.torch.save_file(tensors, str(weights))
    with pytest.raises(InteropError, match="shared_head.head.weight differs from the main model's lm_head"):
        import_hf(tmp_path / "hf")
    # what transformers saves: config.json announces one MTP layer, the file has none
    safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.3.")}, str(weights))
    assert import_hf(tmp_path / "hf").config.mtp is None


def test_mtp_export_is_refused_outside_deepseek_v3(tmp_path):
    with pytest.raises(InteropError, match="only in deepseek_v3"):
        export_hf(our_model(lm_config(mtp={"depth": 1})), tmp_path / "hf")
