"""Ctrl-C / SIGTERM inside the training loop: the step finishes, a checkpoint is saved, and with
several ranks every rank stops at the same step even when only one of them got the signal."""

from __future__ import annotations

import gc
import os
import signal

import torch
import torch.distributed as dist
from spawn import free_port, spawn

from moeformer import DecoderLM, preset
from moeformer.train.checkpoint import read_checkpoint
from moeformer.train.config import TrainConfig
from moeformer.train.distributed import init_distributed
from moeformer.train.signals import StopSignals
from moeformer.train.trainer import Batch, Trainer, TrainingTask

VOCAB = 23


class SignalOnFetch(list):
    """Training batches that send ``sig`` to this process when batch ``at`` is fetched."""

    def __init__(self, batches: list[Batch], at: int | None, sig: int) -> None:
        super().__init__(batches)
        self.at, self.sig = at, sig

    def __getitem__(self, index):  # noqa: ANN001, ANN204
        if index == self.at:
            os.kill(os.getpid(), self.sig)
        return super().__getitem__(index)


def _task(at: int | None, sig: int) -> TrainingTask:
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(8):
        seq = torch.randint(1, VOCAB, (2, 9), generator=g)
        batches.append(Batch({"tokens": seq[:, :-1]}, seq[:, 1:], n_tokens=16))
    return TrainingTask(train_batches=lambda epoch: SignalOnFetch(batches, at if epoch == 0 else None, sig),
                        valid_batches=batches[:1], meta={"config": {}})  # fmt: skip


def _trainer(run_dir, at: int | None, sig: int, ctx=None) -> Trainer:  # noqa: ANN001
    torch.manual_seed(0)
    model = DecoderLM(preset("lm-tiny", vocab_size=VOCAB, dropout=0.0))
    config = TrainConfig(steps=50, warmup_steps=1, eval_every=100, save_every=100, log_every=1)
    return Trainer(model, _task(at, sig), config, run_dir, progress=False, distributed=ctx)


def test_a_signal_finishes_the_step_and_saves(tmp_path):
    result = _trainer(tmp_path, at=2, sig=signal.SIGTERM).train()  # fetched for step 3
    assert (result.stopped_by, result.signal, result.step) == ("SIGTERM", signal.SIGTERM, 3)
    assert read_checkpoint(tmp_path, which="latest").meta["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_a_second_signal_while_stopping_changes_nothing():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.received == signal.SIGINT


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))  # fmt: skip
    ctx = init_distributed(expected_world_size=2, timeout_s=60)
    try:
        _stop_together(rank, tmp, ctx)
        gc.collect()  # the DDP wrapper holds the group: freed while every rank's group is alive
        dist.barrier()
        if rank == 0:
            assert read_checkpoint(tmp, which="latest").meta["step"] == 3
    finally:
        dist.destroy_process_group()


def _stop_together(rank: int, tmp: str, ctx) -> None:  # noqa: ANN001
    trainer = _trainer(tmp, at=None, sig=signal.SIGINT, ctx=ctx)
    if rank == 1:  # only rank 1 is signalled, during its forward of step 3
        calls = []

        def hook(*_: object) -> None:
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)

        trainer.model.register_forward_hook(hook)
    result = trainer.train()
    assert (result.stopped_by, result.step) == ("SIGINT", 3), (rank, result.stopped_by, result.step)


def test_every_rank_stops_at_the_step_one_rank_was_signalled(tmp_path):
    spawn(_worker, (free_port(), str(tmp_path)), timeout_s=240)
