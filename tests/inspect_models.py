"""Tiny translation and language models with a character tokenizer over a few English/Chinese
pairs, for the inspection tests: in memory (a LoadedModel) or saved as a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeformer import build_model, preset
from moeformer.config import config_to_dict
from moeformer.data.char_tokenizer import CharTokenizer
from moeformer.data.tokenizer import TokenizerPair
from moeformer.inference import LoadedModel
from moeformer.train.checkpoint import Checkpoint, save_checkpoint

PAIRS = [
    ("Are you OK?", "你好吗？"),
    ("I have three books.", "我有三本书。"),
    ("Tom is here.", "汤姆在这里。"),
    ("Go home.", "回家。"),
    ("It is raining.", "下雨了。"),
    ("I like tea.", "我喜欢茶。"),
]
MOE = {"kind": "deepseek", "n_experts": 6, "top_k": 2, "n_shared": 1, "expert_hidden": 16}


def tiny_loaded(arch: str = "seq2seq", moe: dict | None = MOE, seed: int = 0, name: str | None = None) -> LoadedModel:
    """A randomly initialised tiny model (eval mode) with a shared character tokenizer; ``name``: a preset."""
    tok = CharTokenizer.train(text for pair in PAIRS for text in pair)
    name = name or ("transformer-tiny" if arch == "seq2seq" else "lm-tiny")
    torch.manual_seed(seed)
    config = preset(name, vocab_size=tok.vocab_size, moe=moe) if moe else preset(name, vocab_size=tok.vocab_size)
    model = build_model(config).eval()
    pair = TokenizerPair(tok, tok)
    meta = {"step": 7, "config": {"model": config_to_dict(config)}, "tokenizer": pair.to_dict()}
    return LoadedModel(model, pair, Checkpoint(Path("in-memory"), meta))


def save_run(run_dir: Path, loaded: LoadedModel, *, log_rows: int = 5) -> Path:
    """``loaded`` as a run directory (checkpoint + best/latest + a metrics.jsonl of ``log_rows`` steps)."""
    meta = {k: v for k, v in loaded.meta.items() if k != "step"}
    save_checkpoint(run_dir, 7, loaded.model, {**meta, "metrics": {"valid_loss": 2.5}}, {}, best=True)
    moe = any(hasattr(m, "router") for m in loaded.model.modules())
    loads = {"max_over_mean_load": 1.5, "expert_load": {"decoder.0": [0.5, 0.25, 0.25]}} if moe else {}
    rows = [{"step": s, "loss": 4.0 / s, "nll": 3.9 / s, "aux_loss": 0.01, "lr": 1e-3, **loads}
            for s in range(1, log_rows + 1)]  # fmt: skip
    rows.append({"step": log_rows, "valid_loss": 2.5, "bleu": 1.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return run_dir


def write_pairs(path: Path, pairs: list[tuple[str, str]] = PAIRS) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path
