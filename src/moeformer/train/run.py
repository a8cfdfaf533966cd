"""``moeformer train``: config file (+ ``--set`` overrides) -> data -> model -> trainer -> scores.

The run directory receives the checkpoints, ``metrics.jsonl``, ``run.json`` (the resolved config
and the data report) and ``summary.json`` (best validation metrics, and for translation the BLEU
and chrF of the best checkpoint on the held-out test split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeformer.config import Config, ConfigError, config_to_dict
from moeformer.data.pipeline import PreparedData, prepare
from moeformer.data.tokenizer import TokenizerPair
from moeformer.models import build_model
from moeformer.train.checkpoint import load_weights, read_checkpoint, write_atomic
from moeformer.train.distributed import Distributed, init_distributed
from moeformer.train.trainer import Trainer, TrainResult


@dataclass
class RunOutcome:
    result: TrainResult
    data_report: dict[str, Any]
    test_scores: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (source, reference, hypothesis)
    main: bool = True  # False on the ranks other than 0 of a distributed run (they report nothing)


def run_training(config: Config, run_dir: Path, *, resume: bool = False, progress: bool = True) -> RunOutcome:
    """Train as one process, or as one rank of a torchrun launch (rank 0 writes every file)."""
    ctx = init_distributed(expected_world_size=config.train.world_size, timeout_s=config.train.dist_timeout_s)
    torch.manual_seed(config.train.seed)  # every rank builds the same initial weights
    ckpt = read_checkpoint(run_dir, which="latest") if resume else None
    tokenizers = TokenizerPair.from_dict(ckpt.meta["tokenizer"]) if ckpt else None
    prepared = prepare(config, tokenizers)
    device = _device(config.train.device, ctx)
    model = build_model(prepared.model_config).to(device)
    trainer = Trainer(
        model, _to_device(prepared, device), config.train, run_dir, progress=progress, distributed=ctx
    )
    if ckpt is not None:
        trainer.resume(ckpt)
    main = ctx is None or ctx.main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_info = {"config": prepared.task.meta["config"], "data": prepared.report}
        write_atomic(run_dir / "run.json", json.dumps(run_info, ensure_ascii=False, indent=1))
    result = trainer.train()
    outcome = RunOutcome(result, prepared.report, main=main)
    if not main:
        return outcome
    if prepared.test_pairs:
        _score_test(outcome, prepared, model, run_dir, config)
    summary = {
        "step": result.step,
        "stopped_by": result.stopped_by,
        "best": result.best,
        "test": outcome.test_scores,
        "config": config_to_dict(config.model),
    }
    write_atomic(run_dir / "summary.json", json.dumps(summary, ensure_ascii=False, indent=1))
    return outcome


def _score_test(
    outcome: RunOutcome, prepared: PreparedData, model: torch.nn.Module, run_dir: Path, config: Config
) -> None:
    from moeformer.evaluate.metrics import bleu, chrf
    from moeformer.inference import translate

    load_weights(model, read_checkpoint(run_dir, which="best"))
    sources = [s for s, _ in prepared.test_pairs]
    refs = [t for _, t in prepared.test_pairs]
    hyps = translate(model, prepared.tokenizers, sources, batch_size=64)
    lang = config.data.target_lang
    outcome.test_scores = {
        "test_bleu": bleu(hyps, refs, target_lang=lang),
        "test_chrf": chrf(hyps, refs),
        "test_pairs": float(len(refs)),
    }
    outcome.samples = list(zip(sources, refs, hyps))[:10]


def _device(name: str, ctx: Distributed | None = None) -> torch.device:
    if name == "auto" and ctx is not None and torch.cuda.is_available():
        return torch.device("cuda", ctx.local_rank)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "'cuda' was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


def _to_device(prepared: PreparedData, device: torch.device):  # noqa: ANN202
    if device.type == "cpu":
        return prepared.task
    task = prepared.task

    def move(batches):  # noqa: ANN001, ANN202
        for b in batches:
            b.inputs = {k: v.to(device) for k, v in b.inputs.items()}
            b.target = b.target.to(device)
        return batches

    original = task.train_batches
    task.train_batches = lambda epoch: move(original(epoch))
    task.valid_batches = move(task.valid_batches)
    return task
