"""``moeformer train``: config file (+ ``--set`` overrides) -> data -> model -> trainer -> scores.

The run directory receives the checkpoints, ``metrics.jsonl``, ``run.json`` (the resolved config
and the data report) and ``summary.json`` (best validation metrics, and for translation the BLEU
and chrF of the best checkpoint on the held-out test split).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moeformer.checkpoint_io import checkpoint_tokenizers
from moeformer.data.report import format_data_report
from moeformer.data.tokenizer import TokenizerPair
from moeformer.evaluate.translation import evaluate_translation
from moeformer.model_config import config_to_dict
from moeformer.models import build_model
from moeformer.publish import write_text
from moeformer.train.checkpoint import (
    SIDECAR,
    Checkpoint,
    CheckpointError,
    load_weights,
    read_checkpoint,
    remove_partial,
)
from moeformer.train.distributed import Distributed, check_layout, process_group
from moeformer.train.pipeline import PreparedData, prepare
from moeformer.train.run_config import Config, apply_overrides, config_from_dict
from moeformer.train.rundir import RunLock, claim_run_dir, trim_metrics
from moeformer.train.trainer import Trainer, TrainResult
from moeformer.validation import ConfigError

Note = Callable[[str], None]
TEST_CHUNK = 128  # test pairs decoded between two looks at the clock


@dataclass
class RunOutcome:
    result: TrainResult
    data_report: dict[str, Any]
    test_scores: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (source, reference, hypothesis)
    main: bool = True  # False on the ranks other than 0 of a distributed run (they report nothing)


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; ``exit_code`` is 128 + signal."""

    def __init__(self, run_dir: Path, step: int, checkpoint: Path | None, signum: int, main: bool = True) -> None:
        saved = f"saved {checkpoint}" if checkpoint is not None else "no checkpoint saved"
        super().__init__(f"interrupted at step {step}; {saved}; continue with: moeformer train --resume {run_dir}")
        self.step, self.checkpoint, self.exit_code, self.main = step, checkpoint, 128 + signum, main


def resume_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config a run was started with (its run.json), with ``KEY=VALUE`` overrides applied."""
    file = Path(run_dir) / "run.json"
    try:
        table = json.loads(file.read_text(encoding="utf-8"))["config"]
    except FileNotFoundError:
        raise ConfigError(str(file), "missing: is this a run directory? give its config file too") from None
    except (ValueError, KeyError):
        raise ConfigError(str(file), "unreadable (no 'config' entry): give the run's config file too") from None
    return config_from_dict(apply_overrides(table, overrides or []))


def run_training(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Train as one process, or as one rank of a torchrun launch (rank 0 writes every file).

    The run directory is locked while this runs (:mod:`moeformer.train.rundir`); a new run in a
    directory holding one needs ``force``. With ``train.max_minutes`` the whole call, final
    evaluation and test decoding included, ends within that time. SIGINT/SIGTERM save a checkpoint
    and raise :class:`TrainingInterrupted`. echo: receives notes for the user (data report, warnings).
    """
    began = time.monotonic()
    deadline = began + 60 * config.train.max_minutes if config.train.max_minutes else None
    echo = echo or (lambda _: None)
    with process_group(expected_world_size=config.train.world_size, timeout_s=config.train.dist_timeout_s) as ctx:
        main = ctx is None or ctx.main
        lock = RunLock(run_dir, echo=echo) if main else contextlib.nullcontext()

        def claim() -> None:
            claim_run_dir(run_dir, resume=resume, force=force)
            remove_partial(run_dir)

        with _agreed(lock, ctx, claim if main else None):
            return _run(config, run_dir, ctx, resume, progress, echo, deadline)


@contextlib.contextmanager
def _agreed(lock: contextlib.AbstractContextManager, ctx: Distributed | None,
            claim: Callable[[], None] | None) -> Iterator[None]:  # fmt: skip
    """Enter ``lock`` and ``claim`` the run directory on rank 0; the other ranks learn whether that
    failed and stop too, instead of waiting in their first collective until the timeout."""
    failed = None
    try:
        lock.__enter__()
        try:
            if claim is not None:
                claim()
        except BaseException:
            lock.__exit__(None, None, None)
            raise
    except Exception as err:  # noqa: BLE001  re-raised below, after the other ranks are told
        failed = err
    if ctx is not None and bool(ctx.sum(torch.tensor(float(failed is not None)))) and failed is None:
        raise RuntimeError("rank 0 could not take the run directory (see its error)")
    if failed is not None:
        raise failed
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _run(config: Config, run_dir: Path, ctx: Distributed | None, resume: bool, progress: bool,
         echo: Callable[[str], None], deadline: float | None) -> RunOutcome:  # fmt: skip
    main = ctx is None or ctx.main
    torch.manual_seed(config.train.seed)  # every rank builds the same initial weights
    ckpt = read_checkpoint(run_dir, which="latest") if resume else None
    start = read_checkpoint(config.train.init_from) if config.train.init_from and ckpt is None else None
    tokenizers = _resume_tokenizers(ckpt or start) if (ckpt or start) else None
    if main:
        for warning in config_warnings(config):
            echo(f"warning: {warning}")
    world = ctx.world_size if ctx is not None else 1
    check_layout(config.train.expert_parallel, world, config.model.moe, config.train.dp_replicate)
    prepared = prepare(config, tokenizers)
    if main:
        echo(format_data_report(prepared.report))
    device = _device(config.train.device, ctx)
    model = build_model(prepared.model_config)
    if start is not None:  # weights only: the optimiser, schedule and step start afresh
        _init_weights(model, start, config.train.init_from)
    model = model.to(device)
    n_test = len(prepared.test_pairs)

    def reserve(eval_seconds: float) -> float:  # test decoding, estimated from validation decoding
        return eval_seconds * n_test / max(min(config.train.bleu_samples, len(prepared.test_pairs) or 1), 1)

    trainer = Trainer(
        model, _to_device(prepared, device), config.train, run_dir, progress=progress, distributed=ctx,
        deadline=deadline, reserve=reserve, echo=echo,
    )  # fmt: skip
    if ckpt is not None:
        trainer.resume(ckpt)
        if main and trim_metrics(run_dir / "metrics.jsonl", trainer.step):
            echo(f"note: dropped metrics.jsonl rows logged after step {trainer.step} by the interrupted run")
    if main:
        run_info = {"config": prepared.task.meta["config"], "data": prepared.report}
        write_text(run_dir / "run.json", json.dumps(run_info, ensure_ascii=False, indent=1))
    result = trainer.train()
    if result.signal is not None:
        raise TrainingInterrupted(run_dir, result.step, trainer.last_checkpoint, result.signal, main)
    outcome = RunOutcome(result, prepared.report, main=main)
    if not main:
        return outcome
    if prepared.test_pairs:
        _score_test(outcome, prepared, model, run_dir, config, deadline, progress, echo)
    summary = {
        "step": result.step,
        "stopped_by": result.stopped_by,
        "best": result.best,
        "test": outcome.test_scores,
        "config": config_to_dict(config.model),
    }
    write_text(run_dir / "summary.json", json.dumps(summary, ensure_ascii=False, indent=1))
    return outcome


def _init_weights(model: torch.nn.Module, start: Checkpoint, source: str) -> None:
    try:
        load_weights(model, start)
    except CheckpointError as err:
        raise CheckpointError(
            f"train.init_from = {source}: {err}; the run's [model] (and [model.moe]) must describe the checkpoint's "
            f"model, whose config is in its {SIDECAR}"
        ) from None


def _resume_tokenizers(ckpt: Checkpoint) -> TokenizerPair:
    tokenizers = checkpoint_tokenizers(ckpt)
    if tokenizers is None:  # a new tokenizer would not match the trained embeddings
        raise CheckpointError(
            f"{ckpt.path} holds no tokenizer (a weights-only checkpoint): a run cannot resume or start from it, "
            "since a new tokenizer would not match its embeddings"
        )
    return tokenizers


def config_warnings(config: Config) -> list[str]:
    """Settings that are allowed but almost certainly not meant."""
    t = config.train
    warnings = []
    if t.warmup_steps > t.steps:
        warnings.append(
            f"train.warmup_steps = {t.warmup_steps} is more than train.steps = {t.steps}: the learning rate "
            "never reaches its peak"
        )
    return warnings


def _score_test(outcome: RunOutcome, prepared: PreparedData, model: torch.nn.Module, run_dir: Path,
                config: Config, deadline: float | None, progress: bool, echo: Note) -> None:  # fmt: skip
    """BLEU and chrF of the best checkpoint on the test split, decoded in chunks with a progress bar;
    with a deadline, decoding stops when it comes and the scores cover the pairs decoded."""
    load_weights(model, read_checkpoint(run_dir, which="best"))
    pairs = prepared.test_pairs
    with tqdm(total=len(pairs), desc="test decoding", disable=not progress, unit="pair", leave=False) as bar:
        # references as given and, with data.zh_script, in that script: test_bleu_simplified, ...
        result = evaluate_translation(
            model, prepared.tokenizers, pairs, target_lang=config.data.target_lang, zh_script=config.data.zh_script,
            overlong="cut", note=echo, chunk_size=TEST_CHUNK, deadline=deadline, progress=bar.update,
        )  # fmt: skip
    decoded = pairs[: len(result.hypotheses)]
    if not decoded:
        return
    outcome.test_scores = {**result.as_dict("test_"), "test_pairs": float(len(decoded))}
    if len(decoded) < len(pairs):
        outcome.test_scores["test_pairs_skipped_for_time"] = float(len(pairs) - len(decoded))
    outcome.samples = [(s, t, h) for (s, t), h in zip(decoded, result.hypotheses)][:10]


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
