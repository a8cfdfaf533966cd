"""Weight names and layouts: moeformer's DecoderLM <-> Hugging Face checkpoints, as one table of rules.

A :class:`Rule` ties one of our tensors to one or more of theirs, with the function that joins
theirs into ours (import) and its inverse that splits ours into theirs (export), so both
directions read the same table and cannot drift apart.

Their names are the ones ``save_pretrained`` writes and the Hub holds: one tensor per expert
(``mlp.experts.{i}.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.{i}.w1/w3/w2``).
Ours stack the experts: ``gate_up_proj`` (E, 2H, D) is every expert's gate rows then its up
rows, ``down_proj`` (E, D, H).

DeepSeek-V3 checkpoints store the RoPE part of q and k_pe with interleaved pairs (x0, x1), (x2, x3)
... (``rope_interleave``); our rotary uses the two-halves layout. A linear map followed by a
fixed permutation is a linear map with its output rows permuted, so the import permutes those
rows once (evens first, then odds) and the attention runs unchanged; the export undoes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeformer.model_config import ModelConfig

Join = Callable[[list[Tensor]], Tensor]
Split = Callable[[Tensor], list[Tensor]]


def _one(tensors: list[Tensor]) -> Tensor:
    return tensors[0]


def _as_list(tensor: Tensor) -> list[Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    join: Join = _one
    split: Split = _as_list


@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)

    def add(self, ours: str, *theirs: str, join: Join = _one, split: Split = _as_list) -> None:
        self.rules.append(Rule(ours, theirs, join, split))

    def linear(self, ours: str, theirs: str, bias: bool) -> None:
        self.add(f"{ours}.weight", f"{theirs}.weight")
        if bias:
            self.add(f"{ours}.bias", f"{theirs}.bias")


def rope_permutation(rope_dim: int) -> Tensor:
    """Row order that turns interleaved RoPE pairs into the two-halves layout: evens, then odds."""
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def _permute_tail(rows_per_group: int, tail: int, groups: int, inverse: bool) -> Callable[[Tensor], Tensor]:
    """Permute the last ``tail`` of every ``rows_per_group`` rows (dim 0) of a weight or bias."""
    perm = rope_permutation(tail)
    if inverse:
        perm = torch.argsort(perm)

    def apply(t: Tensor) -> Tensor:
        grouped = t.reshape(groups, rows_per_group, *t.shape[1:]).clone()
        grouped[:, rows_per_group - tail :] = grouped[:, rows_per_group - tail :][:, perm]
        return grouped.reshape(t.shape)

    return apply


def build_rules(config: ModelConfig, family: str, *, rope_interleave: bool = True) -> RuleSet:
    """Every tensor of a DecoderLM built from ``config``, paired with its ``family`` checkpoint names."""
    rules = RuleSet()
    rules.add("embedding.embed.weight", "model.embed_tokens.weight")
    rules.add("norm.weight", "model.norm.weight")
    if not config.tie_embeddings:
        rules.add("lm_head.weight", "lm_head.weight")
    for i in range(config.n_layers):
        _block_rules(rules, config, family, f"layers.{i}.", f"model.layers.{i}.", i, rope_interleave)
    for k in range(0 if config.mtp is None else config.mtp.depth):
        # DeepSeek-V3 stores MTP module k as layer num_hidden_layers + k (its own copies of the shared
        # embedding and head are :func:`mtp_shared_names`, checked and written by the converter)
        index = config.n_layers + k
        ours, theirs = f"mtp.{k}.", f"model.layers.{index}."
        for name in ("enorm", "hnorm", "eh_proj"):
            rules.add(f"{ours}{name}.weight", f"{theirs}{name}.weight")
        rules.add(ours + "norm.weight", theirs + "shared_head.norm.weight")
        _block_rules(rules, config, family, ours + "block.", theirs, index, rope_interleave)
    return rules


def mtp_shared_names(config: ModelConfig) -> dict[str, str]:
    """The MTP layers' stored copies of the shared tensors -> our one tensor (DeepSeek-V3's layout)."""
    out = {}
    for k in range(0 if config.mtp is None else config.mtp.depth):
        theirs = f"model.layers.{config.n_layers + k}."
        out[theirs + "embed_tokens.weight"] = "embedding.embed.weight"
        out[theirs + "shared_head.head.weight"] = "lm_head.weight"
    return out


def _block_rules(
    rules: RuleSet, config: ModelConfig, family: str, ours: str, theirs: str, index: int, interleave: bool
) -> None:
    rules.add(ours + "attn_norm.weight", theirs + "input_layernorm.weight")
    rules.add(ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight")
    if config.attention.kind == "mla":
        _mla_rules(rules, config, ours + "self_attn.", theirs + "self_attn.", interleave)
    else:
        _mha_rules(rules, config, ours + "self_attn.", theirs + "self_attn.")
    if config.moe is not None and config.moe.is_moe_layer(index):
        _moe_rules(rules, config, family, ours + "ffn.", theirs)
    else:
        for name in ("gate_proj", "up_proj", "down_proj"):
            rules.linear(f"{ours}ffn.{name}", f"{theirs}mlp.{name}", config.ffn.bias)


def _mha_rules(rules: RuleSet, config: ModelConfig, ours: str, theirs: str) -> None:
    a = config.attention
    qkv_bias = a.bias if a.qkv_bias is None else a.qkv_bias
    for name in ("q_proj", "k_proj", "v_proj"):
        rules.linear(ours + name, theirs + name, qkv_bias)
    rules.linear(ours + "out_proj", theirs + "o_proj", a.bias)
    if a.qk_norm:
        rules.add(ours + "q_norm.weight", theirs + "q_norm.weight")
        rules.add(ours + "k_norm.weight", theirs + "k_norm.weight")


def _mla_rules(rules: RuleSet, config: ModelConfig, ours: str, theirs: str, interleave: bool) -> None:
    a = config.attention
    rope, qk = a.qk_rope_head_dim, a.qk_nope_head_dim + a.qk_rope_head_dim
    q_name = "q_proj" if a.q_lora_rank is None else "q_b_proj"
    if a.q_lora_rank is not None:
        rules.linear(ours + "q_a_proj", theirs + "q_a_proj", a.bias)
        rules.add(ours + "q_a_layernorm.weight", theirs + "q_a_layernorm.weight")
    q_in, q_out = _permute_tail(qk, rope, a.n_heads, False), _permute_tail(qk, rope, a.n_heads, True)
    kv_rows = a.kv_lora_rank + rope
    kv_in, kv_out = _permute_tail(kv_rows, rope, 1, False), _permute_tail(kv_rows, rope, 1, True)
    if not interleave:
        q_in = q_out = kv_in = kv_out = lambda t: t  # noqa: E731 - the identity, for non-interleaved files
    rules.add(f"{ours}{q_name}.weight", f"{theirs}{q_name}.weight", join=_mapped(q_in), split=_mapped_split(q_out))
    kv_a = "kv_a_proj_with_mqa"
    rules.add(f"{ours}{kv_a}.weight", f"{theirs}{kv_a}.weight", join=_mapped(kv_in), split=_mapped_split(kv_out))
    if a.bias:
        rules.add(f"{ours}{kv_a}.bias", f"{theirs}{kv_a}.bias", join=_mapped(kv_in), split=_mapped_split(kv_out))
    rules.add(ours + "kv_a_layernorm.weight", theirs + "kv_a_layernorm.weight")
    rules.add(ours + "kv_b_proj.weight", theirs + "kv_b_proj.weight")
    rules.linear(ours + "out_proj", theirs + "o_proj", a.bias)


def _mapped(fn: Callable[[Tensor], Tensor]) -> Join:
    return lambda tensors: fn(tensors[0])


def _mapped_split(fn: Callable[[Tensor], Tensor]) -> Split:
    return lambda tensor: [fn(tensor)]


def _moe_rules(rules: RuleSet, config: ModelConfig, family: str, ours: str, theirs: str) -> None:
    moe = config.moe
    n = moe.routed_experts
    if family == "mixtral":
        block, gate, up, down = theirs + "block_sparse_moe.", "w1", "w3", "w2"
    else:
        block, gate, up, down = theirs + "mlp.", "gate_proj", "up_proj", "down_proj"
    rules.add(ours + "router.weight", block + "gate.weight")
    if family == "deepseek_v3":
        rules.add(ours + "router.expert_bias", block + "gate.e_score_correction_bias")
    expert = [f"{block}experts.{e}." for e in range(n)]
    rules.add(
        ours + "experts.gate_up_proj",
        *[f"{p}{gate}.weight" for p in expert],
        *[f"{p}{up}.weight" for p in expert],
        join=lambda ts: torch.cat([torch.stack(ts[:n]), torch.stack(ts[n:])], dim=1),
        split=lambda t: [*t[:, : t.shape[1] // 2].unbind(0), *t[:, t.shape[1] // 2 :].unbind(0)],
    )
    rules.add(
        ours + "experts.down_proj",
        *[f"{p}{down}.weight" for p in expert],
        join=torch.stack,
        split=lambda t: list(t.unbind(0)),
    )
    if moe.n_shared:
        shared = block + ("shared_expert." if family == "qwen2_moe" else "shared_experts.")
        for name in ("gate_proj", "up_proj", "down_proj"):
            rules.linear(f"{ours}shared_experts.{name}", shared + name, False)
        if moe.shared_gate:
            rules.add(ours + "shared_expert_gate.weight", block + "shared_expert_gate.weight")
