"""``moeformer upcycle``: a trained dense checkpoint -> an MoE checkpoint to continue training from.

The weights come from :func:`moeformer.models.upcycle.upcycle` (sparse or fine-grained, see there
for which is exact at initialisation). The output is an ordinary checkpoint (``model.safetensors``
+ ``checkpoint.json`` with the MoE config and the source's tokenizer, step 0, no optimiser state);
``moeformer train CONFIG --set train.init_from=OUT`` starts a run from it, with CONFIG's
``[model]`` (``[model.moe]`` included) equal to the checkpoint's (:func:`moe_overrides` gives
the ``--set`` lines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch

from moeformer.checkpoint_io import SIDECAR, WEIGHTS, load_checkpoint, paths_overlap
from moeformer.model_config import MoEConfig, config_to_dict
from moeformer.models.upcycle import UpcycleError, logit_gap, upcycle
from moeformer.moe.layer import segment_experts
from moeformer.publish import check_replaceable, staged_dir


@dataclass
class Upcycled:
    out: Path
    moe: MoEConfig
    parameters: tuple[int, int]  # (dense, upcycled) parameter counts
    gap: dict[str, float]  # max |logit difference| and mean KL on a check batch


def moe_for(kind: Literal["topk", "deepseek"], d_ff: int, *, experts: int, top_k: int, granularity: int = 1,
            shared: int = 0, balance_loss: float = 0.01) -> MoEConfig:  # fmt: skip
    """The MoE layer an upcycling makes from FFNs of hidden size ``d_ff``.

    ``topk``: ``experts`` copies of the FFN, top-``top_k`` renormalised (exact at initialisation).
    ``deepseek``: the same coarse layer segmented DeepSeekMoE's way (:func:`segment_experts`:
    m * experts - shared routed pieces of d_ff / m, m * top_k - shared of them per token, plus
    ``shared`` always-on pieces), gates not renormalised, as DeepSeekMoE."""
    if kind == "topk":
        if granularity != 1 or shared:
            raise UpcycleError("--to topk copies the whole FFN: --granularity and --shared are for --to deepseek")
        return MoEConfig(kind="topk", n_experts=experts, top_k=top_k, expert_hidden=d_ff, balance_loss=balance_loss)
    numbers = segment_experts(n_experts=experts, top_k=top_k, d_ff=d_ff, granularity=granularity, n_shared=shared)
    return MoEConfig(kind="deepseek", normalize=False, balance_loss=balance_loss, **numbers)


def upcycle_checkpoint(
    source: str | Path, out: str | Path, kind: Literal["topk", "deepseek"], *, experts: int, top_k: int,
    granularity: int = 1, shared: int = 0, seed: int = 0, force: bool = False,
) -> Upcycled:  # fmt: skip
    """Read the dense checkpoint (or a run's best), upcycle it, write ``out`` as one directory."""
    if paths_overlap(source, out):
        raise UpcycleError(f"--out {out} overlaps the source {source}; the source is never modified")
    check_replaceable(Path(out), force=force)
    loaded = load_checkpoint(source)
    dense = loaded.model
    moe = moe_for(kind, dense.config.ffn.d_ff, experts=experts, top_k=top_k, granularity=granularity, shared=shared)
    new = upcycle(dense, moe, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, dense.config.vocab_size, (4, min(32, dense.config.max_seq_len)), generator=g)
    gap = logit_gap(dense, new, (tokens, tokens) if dense.config.arch == "seq2seq" else tokens)
    meta = {
        "config": {"model": config_to_dict(new.config)},
        "step": 0,
        "upcycled_from": {"path": str(source), "step": loaded.meta.get("step"), "kind": kind, "seed": seed},
    }
    if "tokenizer" in loaded.meta:
        meta["tokenizer"] = loaded.meta["tokenizer"]
    with staged_dir(out, force=force) as tmp:
        safetensors.torch.save_model(new, str(tmp / WEIGHTS))
        (tmp / SIDECAR).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    count = sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in new.parameters())
    return Upcycled(Path(out), moe, count, gap)


def moe_overrides(moe: MoEConfig) -> list[str]:
    """``model.moe.KEY=VALUE`` overrides that give a config this MoE layer (for ``--set``)."""
    fields = ("kind", "n_experts", "top_k", "expert_hidden", "n_shared", "normalize", "balance_loss")
    values = {k: getattr(moe, k) for k in fields}
    return [f"model.moe.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
