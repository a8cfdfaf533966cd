"""The training loop: micro-batches -> loss (+ MoE auxiliary losses) -> AdamW -> schedule.

One optimiser update accumulates ``grad_accum`` micro-batches, clips the global gradient norm,
steps AdamW and the schedule, then applies the MoE auxiliary-loss-free bias update from the
expert loads of exactly those micro-batches. Every ``eval_every`` updates it measures the
validation loss (and, for translation, BLEU on a sample, decoded greedily) and keeps the best
checkpoint; every ``save_every`` updates, and at the end, it saves the latest.

Resuming restores weights (balancing biases included), optimiser, schedule, the torch RNG and
the position in the data, so that on a CPU the losses after ``--resume`` equal those of an
uninterrupted run. A NaN or inf loss stops the run with the step and the last good checkpoint.

With several processes the model is laid out by :class:`~moeformer.train.layout.Layout` (DDP,
FSDP2, expert parallelism, or both: forward wrapper, gradient reduction and clipping, checkpoints
that any layout resumes), each rank takes its shard of every epoch's batches, and rank 0 alone
logs and writes files; under FSDP or expert parallelism every rank runs the evaluation forwards.

``train.compile`` runs the training forward (and its backward) through ``torch.compile``, applied
to the DDP or FSDP2 wrapper where there is one (:class:`~moeformer.compiled.CompiledModel`);
evaluation, decoding and checkpoints use the model itself, so state-dict names do not change.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moeformer.compiled import CompiledModel
from moeformer.moe.balancing import LoadTracker
from moeformer.train.board import board_write, open_board
from moeformer.train.budget import ESTIMATE_AFTER, TimeBudget
from moeformer.train.checkpoint import Checkpoint, load_trainer_state
from moeformer.train.config import TrainConfig
from moeformer.train.distributed import Distributed, reduce_loads
from moeformer.train.layout import Layout
from moeformer.train.loss import mtp_loss, smoothed_cross_entropy
from moeformer.train.optim import build_optimizer
from moeformer.train.rundir import append_line
from moeformer.train.schedule import lr_multiplier, noam_peak
from moeformer.train.signals import StopSignals, signal_name


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


@dataclass
class Batch:
    inputs: dict[str, Tensor]  # keyword arguments of the model's forward
    target: Tensor  # (B, T) next-token targets, pad_id where there is none
    n_tokens: int  # real target tokens


@dataclass
class TrainResult:
    step: int
    metrics: list[dict[str, float]] = field(default_factory=list)  # one per logged step
    evals: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    stopped_by: str = "steps"  # "steps", "max_minutes", or the signal that stopped it: "SIGINT", "SIGTERM"
    signal: int | None = None  # the number of that signal


@dataclass
class TrainingTask:
    """What the loop needs to know about the data, independent of how it was built."""

    train_batches: Callable[[int], list[Batch]]  # epoch -> that epoch's batches, deterministic
    valid_batches: list[Batch]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # extra metrics, e.g. BLEU
    meta: dict[str, Any] = field(default_factory=dict)  # written to every checkpoint sidecar
    pad_id: int = 0


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        task: TrainingTask,
        config: TrainConfig,
        run_dir: Path,
        *,
        progress: bool = True,
        distributed: Distributed | None = None,
        deadline: float | None = None,
        reserve: Callable[[float], float] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        """deadline: ``time.monotonic()`` by which the whole command must be done (from
        ``max_minutes``); reserve: seconds that the caller needs after training, given the
        duration of one evaluation (e.g. test-set decoding); echo: where notes for the user go."""
        self.model, self.task, self.config, self.run_dir = model, task, config, Path(run_dir)
        self.clock = TimeBudget(deadline, 60 * config.max_minutes if config.max_minutes else None, reserve)
        self._signals: StopSignals | None = None  # while train() runs
        self.dist = distributed
        self.main = distributed is None or distributed.main
        self.echo = echo if echo is not None and self.main else (lambda _: None)  # one voice under torchrun
        self.progress = progress and self.main
        self.device = next(model.parameters()).device
        self.layout = Layout(model, config, distributed)  # shards the model in place where asked
        self.shards, self.fsdp, self.collective = self.layout.shards, self.layout.fsdp, self.layout.collective
        self.forward = self.layout.forward
        if config.compile:  # after wrapping, as torch recommends; self.model stays eager (eval, saving)
            self.forward = CompiledModel(self.forward)
        peak = noam_peak(model.config.d_model, config.warmup_steps) if config.schedule == "noam" else config.lr
        self.optimizer = build_optimizer(
            model, lr=peak, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2), eps=config.adam_eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_multiplier(
                config.schedule, warmup=config.warmup_steps, total=config.steps, min_ratio=config.min_lr_ratio
            ),
        )
        self.step = 0
        self.position = (0, 0)  # (epoch, index of the next batch in that epoch)
        self.best_loss = math.inf
        self.last_checkpoint: Path | None = None
        self._last_loads: dict[str, Tensor] = {}  # tokens per expert in the last update, by layer
        self.mtp = getattr(model.config, "mtp", None)  # DeepSeek-V3 multi-token prediction, if configured
        self._last_mtp: list[float] = []  # each MTP depth's NLL in the last update, for the log

    # -- state ------------------------------------------------------------------------------
    def resume(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``, saved under this layout or any other (DCP re-shards)."""
        state = load_trainer_state(ckpt)
        self.layout.load(self.model, self.optimizer, ckpt, state)
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.position = int(state["step"]), self.layout.local_position(state)
        self.best_loss = float(state["best_loss"])
        self.last_checkpoint = ckpt.path

    def save(self, *, best: bool = False, metrics: dict[str, float] | None = None) -> Path | None:
        """Write a checkpoint (rank 0); in sharded layouts every rank calls this and writes its shards."""
        state = {
            "optimizer": self.layout.optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": self.step,
            "position": list(self.position),  # (epoch, index among this rank's batches)
            "world_size": self.layout.world_size,
            "best_loss": self.best_loss,
        }
        meta = {**self.task.meta, "metrics": metrics or {}}
        path = self.layout.save(self.model, self.optimizer, self.run_dir, self.step, meta, state,
                                best=best, keep_last=self.config.keep_last)  # fmt: skip
        if path is not None:
            self.last_checkpoint = path
        return path

    # -- data -------------------------------------------------------------------------------
    def _stream(self) -> Iterator[Batch]:
        epoch, index = self.position
        while True:
            batches = self.task.train_batches(epoch)
            if self.dist is not None:
                batches = self.dist.shard(batches)
            if not batches:
                raise ValueError("the training set produced no batches: is it empty after cleaning?")
            while index < len(batches):
                index += 1
                self.position = (epoch, index)
                yield batches[index - 1]
            epoch, index = epoch + 1, 0

    # -- loop -------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run updates until ``steps``, the deadline, or SIGINT/SIGTERM (which save and return)."""
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        result = TrainResult(step=self.step)
        stream, tracker = self._stream(), LoadTracker()
        timed = self.clock.deadline is not None
        bar = tqdm(total=None if timed else self.config.steps, initial=self.step, desc="training",
                   disable=not self.progress, unit="step", dynamic_ncols=True)  # fmt: skip
        board = open_board(self.run_dir, self.step) if self.main else None
        with StopSignals() as self._signals:
            try:
                self._loop(result, stream, tracker, bar, board)
            finally:
                self._signals = None
                bar.close()
                if board is not None:
                    board.close()
        result.step = self.step
        return result

    def _loop(self, result: TrainResult, stream: Iterator[Batch], tracker: LoadTracker, bar, board) -> None:  # noqa: ANN001
        cfg = self.config
        log_path = self.run_dir / "metrics.jsonl"
        window = {"tokens": 0, "start": time.monotonic()}
        first_step = self.step
        while self.step < cfg.steps:
            began = time.monotonic()
            loss, nll, aux, n_tokens = self._update(stream, tracker)
            self.step += 1
            self.clock.step_took(time.monotonic() - began)
            window["tokens"] += n_tokens
            bar.update(1)
            if self.step == first_step + ESTIMATE_AFTER and (estimate := self.clock.estimate(cfg.steps - self.step)):
                self.echo(estimate)
            if cfg.log_every and self.step % cfg.log_every == 0:
                row = self._log_row(loss, nll, aux, window)
                result.metrics.append(row)
                if self.main:
                    append_line(log_path, json.dumps(row))
                board_write(board, "train", row, self.step)
                bar.set_postfix(self._postfix(loss, row), refresh=False)
            out_of_time, eval_due, signum = self._after_step()
            if signum:
                self.echo(f"{signal_name(signum)} received: saving a checkpoint at step {self.step}, then stopping")
                self._checkpoint()
                result.stopped_by, result.signal = signal_name(signum), signum
                return
            evaluate = self.step % cfg.eval_every == 0 or self.step == cfg.steps or out_of_time
            evaluate = evaluate or eval_due
            if evaluate and (self.main or self.collective):
                self._evaluate_and_save(result, log_path, board)
            elif self.step % cfg.save_every == 0:
                self._checkpoint()
            if out_of_time:
                result.stopped_by = "max_minutes"
                return

    def _log_row(self, loss: float, nll: float, aux: float, window: dict) -> dict[str, Any]:
        elapsed = time.monotonic() - window["start"]
        row = {"step": self.step, "loss": loss, "nll": nll, "aux_loss": aux, "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": window["tokens"] / max(elapsed, 1e-9), **self._balance()}  # fmt: skip
        row.update({f"mtp_nll_{k}": value for k, value in enumerate(self._last_mtp, start=1)})
        window["tokens"], window["start"] = 0, time.monotonic()
        return row

    def _postfix(self, loss: float, row: dict[str, Any]) -> dict[str, str]:
        postfix = {"loss": f"{loss:.3f}", "lr": f"{row['lr']:.2e}", "tok_s": f"{row['tokens_per_s']:.0f}",
                   "load": f"{row.get('max_over_mean_load', 1.0):.2f}"}  # fmt: skip
        if (left := self.clock.left()) is not None:
            postfix["left"] = left
        return postfix

    def _evaluate_and_save(self, result: TrainResult, log_path: Path, board) -> None:  # noqa: ANN001
        began = time.monotonic()
        evaluation = self._evaluate()
        self.clock.eval_seconds = time.monotonic() - began
        improved = evaluation["valid_loss"] < self.best_loss
        if improved:
            self.best_loss = evaluation["valid_loss"]
            result.best = evaluation
        if self.main:
            result.evals.append(evaluation)
            append_line(log_path, json.dumps({"step": self.step, **evaluation}))
            board_write(board, "valid", evaluation, self.step)
        self._checkpoint(best=improved, metrics=evaluation)

    def _checkpoint(self, *, best: bool = False, metrics: dict[str, float] | None = None) -> None:
        """Rank 0 saves; in sharded runs (FSDP, expert parallelism) every rank writes its shards."""
        if self.main or self.collective:
            self.save(best=best, metrics=metrics)

    def _after_step(self) -> tuple[bool, bool, int]:
        """(out of time, first timed evaluation due, signal number or 0), agreed by every rank:
        rank 0's clock decides both times (ranks that evaluate together must agree), and a signal
        received by any rank stops all of them at the same step."""
        clock = [float(self.main and self.clock.out_of_time()), float(self.main and self.clock.first_eval_due())]
        flags = torch.tensor([*clock, float(self._signals_received())], device=self.device)
        if self.dist is not None:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1]), int(flags[2])

    def _signals_received(self) -> int:
        return (self._signals.received or 0) if self._signals is not None else 0

    def _update(self, stream: Iterator[Batch], tracker: LoadTracker) -> tuple[float, float, float, int]:
        """One optimiser update over ``grad_accum`` micro-batches; returns mean loss terms."""
        cfg = self.config
        self.model.train()
        depth = self.mtp.depth if self.mtp else 0
        totals, n_tokens = torch.zeros(4 + depth), 0
        extra = {"mtp": True} if self.mtp else {}
        for _ in range(cfg.grad_accum):
            batch = next(stream)
            share = self._token_share(batch.n_tokens)
            with self._autocast():
                out = self.forward(**batch.inputs, **extra)
                loss, nll = smoothed_cross_entropy(
                    out.logits, batch.target, pad_id=self.task.pad_id, eps=cfg.label_smoothing
                )
                total = loss * share + out.aux_loss
                ahead: list[Tensor] = []
                if self.mtp:
                    lam = self.mtp.weight_at(self.step, cfg.steps)
                    weighted, ahead = mtp_loss(out.mtp_logits, batch.target, pad_id=self.task.pad_id,
                                               eps=cfg.label_smoothing, weight=lam)  # fmt: skip
                    total = total + weighted * share
            self._check_finite(total)
            (total / cfg.grad_accum).backward()
            tracker.add(out.reports.stats)
            terms = [loss.item() * share, nll.item() * share, out.aux_loss.detach().item(), 1.0]
            totals += torch.tensor(terms + [float(a) * share for a in ahead])
            n_tokens += batch.n_tokens
        if self.dist is not None:  # the global means, for the log
            totals = self.dist.sum(totals) / self.dist.world_size
            n_tokens = int(self.dist.sum(torch.tensor(n_tokens)))
            tracker.loads = reduce_loads(tracker.loads, self.dist)
        self.layout.finish_gradients(self.model, cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._last_loads = dict(tracker.loads)
        tracker.update_biases(self.model)
        loss, nll, aux = (totals[:3] / cfg.grad_accum).tolist()
        self._last_mtp = (totals[4:] / cfg.grad_accum).tolist()
        return loss, nll, aux, n_tokens

    def _token_share(self, n_tokens: int) -> float:
        """world_size * this rank's share of the micro-batch's tokens: DDP's gradient average then
        weighs every token of the global batch equally, as one process would (1.0 on one process)."""
        if self.dist is None:
            return 1.0
        total = float(self.dist.sum(torch.tensor(float(n_tokens))))
        return n_tokens * self.dist.world_size / max(total, 1.0)

    def _check_finite(self, total: Tensor) -> None:
        bad = torch.tensor(float(not torch.isfinite(total)))
        if self.dist is not None:  # every rank stops together, none waits for a dead peer
            bad = self.dist.sum(bad)
        if bad > 0:
            where = self.last_checkpoint or "none saved yet"
            raise TrainingDiverged(f"loss is {total.item()} at step {self.step + 1}; last good checkpoint: {where}")

    def _balance(self) -> dict[str, Any]:
        """max / mean tokens per expert over the MoE layers of the last update (1.0 = balanced),
        and each layer's share of the assignments per expert (``expert_load``, for the report)."""
        loads = self._last_loads
        if not loads:
            return {}
        ratios = [float(v.max() / v.mean().clamp_min(1e-9)) for v in loads.values()]
        shares = {k: [round(x, 5) for x in (v / v.sum().clamp_min(1)).tolist()] for k, v in loads.items()}
        return {"max_over_mean_load": max(ratios), "expert_load": shares}

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        depth = self.mtp.depth if self.mtp else 0
        totals, count = torch.zeros(1 + depth, dtype=torch.float64), 0
        extra = {"mtp": True} if self.mtp else {}
        batches = self.task.valid_batches[: self.config.eval_batches]
        for batch in tqdm(batches, desc="validation", leave=False, disable=not self.progress, unit="batch"):
            with self._autocast():
                out = self.model(**batch.inputs, **extra)
            _, nll = smoothed_cross_entropy(out.logits, batch.target, pad_id=self.task.pad_id, eps=0.0)
            ahead: list[Tensor] = []
            if self.mtp:
                _, ahead = mtp_loss(out.mtp_logits, batch.target, pad_id=self.task.pad_id, eps=0.0, weight=0.0)
            totals += torch.tensor([float(nll), *map(float, ahead)], dtype=torch.float64) * batch.n_tokens
            count += batch.n_tokens
        means = (totals / max(count, 1)).tolist()
        loss = means[0]
        metrics = {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}
        metrics.update({f"valid_mtp_nll_{k}": value for k, value in enumerate(means[1:], start=1)})
        if self.task.evaluate is not None:
            metrics.update(self.task.evaluate(self.model))
        self.model.train()
        return metrics

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
