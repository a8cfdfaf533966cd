"""Data-parallel training over 2 CPU processes (gloo, DistributedDataParallel) equals one process
training on the same global batches: losses, weights and the aux-loss-free balancing biases."""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from spawn import free_port, spawn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moeformer import DecoderLM, preset
from moeformer.model_config import MoEConfig
from moeformer.train.checkpoint import read_checkpoint, resolve
from moeformer.train.config import TrainConfig
from moeformer.train.distributed import (
    Distributed,
    check_layout,
    close_distributed,
    init_distributed,
    process_group,
    reduce_loads,
)
from moeformer.train.layout import Layout
from moeformer.train.sharded import expert_parallel_full_weights, full_weights
from moeformer.train.trainer import Batch, Trainer, TrainingTask
from moeformer.validation import ConfigError

VOCAB, STEPS = 29, 4


def _batches(n: int = 2 * STEPS) -> list[Batch]:
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        tokens = torch.randint(1, VOCAB, (2, 12), generator=g)
        target = torch.randint(1, VOCAB, (2, 12), generator=g)
        target[:, : i % 5] = 0  # padding: the ranks see different numbers of real tokens
        out.append(Batch({"tokens": tokens}, target, n_tokens=int((target != 0).sum())))
    return out


def _merged(size: int = 2, batches: list[Batch] | None = None) -> list[Batch]:
    """Every ``size`` consecutive batches as one: what one process sees of ``size`` ranks' steps."""
    b = _batches() if batches is None else batches
    return [
        Batch({"tokens": torch.cat([x.inputs["tokens"] for x in b[i : i + size]])},
              torch.cat([x.target for x in b[i : i + size]]), sum(x.n_tokens for x in b[i : i + size]))
        for i in range(0, len(b), size)
    ]  # fmt: skip


def _model() -> DecoderLM:
    torch.manual_seed(0)
    moe = {"kind": "deepseek", "n_experts": 4, "top_k": 2, "expert_hidden": 16, "n_shared": 1,
           "bias_update_rate": 0.01, "score": "sigmoid"}  # fmt: skip
    return DecoderLM(preset("lm-tiny", vocab_size=VOCAB, dropout=0.0, moe=moe))


def _train(batches: list[Batch], run_dir, ctx: Distributed | None, mode: str = "ddp", resume_step: int = 0,
           source: str | None = None, merged: bool = False):  # fmt: skip
    """Train STEPS updates in ``run_dir``; resume_step: first resume from that checkpoint of ``source``
    (default: ``run_dir``). merged: ``batches`` joins the batches of several of the saving run's
    ranks (the tests' way of keeping the global batch equal on fewer ranks), so each rank resumes
    at its own index ``resume_step`` (the trainer, resuming on fewer ranks with one batch list,
    continues at the saving run's global position instead: test_resume_position_...)."""
    model = _model()
    task = TrainingTask(train_batches=lambda epoch: batches, valid_batches=batches[:1], meta={"config": {}})
    config = TrainConfig(steps=STEPS, lr=1e-2, warmup_steps=1, log_every=1, eval_every=100, save_every=2,
                         label_smoothing=0.1, clip_grad=0.5, expert_parallel=2 if mode.endswith("+ep") else 1,
                         parallel="fsdp" if mode.startswith(("fsdp", "hsdp")) else "ddp",
                         dp_replicate=2 if mode.startswith("hsdp") else 1,  # HSDP: 2 replicas of the shards
                         compile=mode.endswith("+compile"))  # fmt: skip
    trainer = Trainer(model, task, config, run_dir, progress=False, distributed=ctx)
    if resume_step:
        where = os.path.join(source or run_dir, "checkpoints", f"step-{resume_step:08d}")
        trainer.resume(read_checkpoint(where))
        if merged:
            trainer.position = (0, resume_step)
    result = trainer.train()
    return trainer, [row["loss"] for row in result.metrics]


SHARDED = ("ddp+ep", "fsdp", "fsdp+ep")  # layouts whose checkpoints hold DCP shards


def _layouts(world: int) -> tuple[str, ...]:
    """Every layout of ``world`` ranks to resume on (HSDP x EP needs 2 replicas of 2 shards: 4 ranks)."""
    return ("ddp", *SHARDED, *(("hsdp+ep",) if world == 4 else ()))


def _worker(rank: int, world: int, port: int, tmp: str, mode: str) -> None:
    """Train ``mode`` on ``world`` ranks, check it against one process, then resume its step-2
    checkpoint on every layout of this world and, on rank 0, in one process."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    ctx = init_distributed(expected_world_size=world, timeout_s=60)
    batches = _batches(world * STEPS)
    try:
        losses = _check(rank, world, tmp, mode, ctx)
        if mode in _layouts(world):  # DDP's plain checkpoint and the sharded ones resume on every layout
            for layout in _layouts(world):
                _, resumed = _train(batches, os.path.join(tmp, f"resumed-{layout}"), ctx, layout, resume_step=2,
                                    source=os.path.join(tmp, "ddp"))  # fmt: skip
                torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses[2:]), atol=1e-5, rtol=0,
                                           msg=lambda m, lay=layout: f"{mode} resumed as {lay}: {m}")  # fmt: skip
        # The DDP/FSDP wrappers made in _check hold the process group; freed (with their gloo work)
        # here, while every rank's group is alive, not after it is destroyed (teardown order, issue 13).
        gc.collect()
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0 and (mode.startswith("fsdp") or mode in _layouts(world)):  # step 2, in one process
        _, resumed = _train(_merged(world, batches), os.path.join(tmp, "ddp"), None, resume_step=2, merged=True)
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses[2:]), atol=1e-5, rtol=0)
        (Path(tmp) / "losses.json").write_text(json.dumps(losses))


def _full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trained model's whole weights on every rank (a collective under sharding)."""
    if trainer.shards is not None:
        return expert_parallel_full_weights(trainer.model, trainer.shards, fsdp=trainer.fsdp)
    if trainer.fsdp:
        return full_weights(trainer.model)
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _check(rank: int, world: int, tmp: str, mode: str, ctx: Distributed | None) -> list[float]:
    """The distributed run equals one process on the global batch; returns its losses."""
    batches = _batches(world * STEPS)
    trainer, losses = _train(batches, os.path.join(tmp, "ddp"), ctx, mode)
    if mode.endswith("+ep"):
        experts = trainer.model.layers[0].ffn.experts
        assert experts.n_experts == 2  # of 4: this rank's expert-parallel slice
        if mode in ("fsdp+ep", "hsdp+ep"):  # the slice sharded again over the world // 2 replicas
            assert isinstance(experts.down_proj, DTensor)
            assert experts.down_proj.to_local().shape[0] == 2 // (world // 2)
    if mode == "hsdp+ep":  # the rest: 2 replicas of shards over 2 ranks
        assert trainer.model.lm_head.weight.placements == (Replicate(), Shard(0))
    state = _full_state(trainer)
    if rank == 0:
        ref_trainer, ref_losses = _train(_merged(world, batches), os.path.join(tmp, "single"), None)
        ref_model = ref_trainer.model
        assert len(losses) == STEPS
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=0)
        ref = ref_model.state_dict()
        for name, value in state.items():
            torch.testing.assert_close(value, ref[name], atol=2e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert ref_model.layers[0].ffn.router.expert_bias.abs().sum() > 0  # the biases did move
        assert os.path.exists(os.path.join(tmp, "ddp", "metrics.jsonl"))  # written by rank 0 only
        ckpt = resolve(os.path.join(tmp, "ddp"), "latest")
        saved = safetensors.torch.load_file(str(ckpt / "model.safetensors"))  # the full experts
        assert set(saved) <= set(ref) and len(saved) >= len(ref) - 1  # tied weights are stored once
        for name, value in saved.items():
            torch.testing.assert_close(value, ref[name], atol=2e-5, rtol=0)
    return losses


COMPILED = pytest.mark.slow  # torch.compile in two processes: a minute or two on a cold cache


@pytest.mark.parametrize(
    "mode",
    ["ddp", "ddp+ep", "fsdp", "fsdp+ep", *(pytest.param(m, marks=COMPILED) for m in ("ddp+compile", "fsdp+compile"))],
)
def test_ddp_equals_one_process_on_the_global_batch(tmp_path, mode):
    args = (2, free_port(), str(tmp_path), mode)
    spawn(_worker, args)


def _resume_worker(rank: int, world: int, port: int, tmp: str, losses: list[float]) -> None:
    """Resume a 4-rank run's step-2 checkpoint on ``world`` ranks, on every sharded layout."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    ctx = init_distributed(expected_world_size=world, timeout_s=60)
    batches = _merged(4 // world, _batches(4 * STEPS))  # the same global batch per step as the 4 ranks had
    try:
        for layout in SHARDED:
            _, resumed = _train(batches, os.path.join(tmp, f"resumed-{world}-{layout}"), ctx, layout,
                                resume_step=2, source=os.path.join(tmp, "ddp"), merged=True)  # fmt: skip
            torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses[2:]), atol=1e-5, rtol=0,
                                       msg=lambda m, lay=layout: f"resumed on {world} ranks as {lay}: {m}")  # fmt: skip
        gc.collect()
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp+ep", "fsdp+ep", "hsdp+ep"])
def test_four_ranks_in_two_expert_groups_equal_one_process_and_resume_on_two(tmp_path, mode):
    """World 4 = 2 data-parallel replicas x expert parallelism 2 (under FSDP each expert slice is
    sharded again over the 2 replicas; under HSDP the rest of the model is sharded over 2 ranks and
    replicated twice): losses and weights equal one process; its step-2 checkpoint resumes on 4
    ranks (every layout), on 2 ranks (EP 2, FSDP + EP 2, FSDP) and on 1."""
    spawn(_worker, (4, free_port(), str(tmp_path), mode), nprocs=4, timeout_s=600)
    losses = json.loads((tmp_path / "losses.json").read_text())
    spawn(_resume_worker, (2, free_port(), str(tmp_path), losses), nprocs=2, timeout_s=300)


@pytest.mark.parametrize(
    ("ep", "world", "moe", "message"),
    [
        (2, 1, {"n_experts": 4}, "needs a multiple of 2 processes"),
        (3, 4, {"n_experts": 6}, "does not divide the 4 processes started"),
        (2, 4, None, "no MoE layers"),
        (4, 8, {"n_experts": 6}, "cannot split the 6 routed experts"),
        (4, 8, {"n_experts": 3, "granularity": 2}, "cannot split the 6 routed experts"),
    ],
)
def test_a_layout_that_cannot_be_built_fails_with_its_numbers(ep, world, moe, message):
    config = None if moe is None else MoEConfig(kind="deepseek", top_k=1, expert_hidden=8, **moe)
    with pytest.raises(ConfigError, match=message):
        check_layout(ep, world, config)
    check_layout(1, world, config)  # off: nothing to check


def test_hybrid_sharding_needs_fsdp_and_a_divisor_of_the_world():
    with pytest.raises(ConfigError, match="dp_replicate: replicates FSDP2 shards"):
        TrainConfig(dp_replicate=2)
    with pytest.raises(ConfigError, match="3 does not divide the 4 processes"):
        check_layout(1, 4, None, dp_replicate=3)
    check_layout(2, 4, MoEConfig(kind="deepseek", n_experts=4, top_k=1, expert_hidden=8), dp_replicate=2)


@pytest.mark.parametrize(("saved_world", "index", "world", "expected"),
                         [(2, 3, 2, 3), (2, 3, 1, 6), (4, 3, 2, 6), (2, 3, 4, 2), (4, 5, 3, 7)])  # fmt: skip
def test_resume_position_on_another_number_of_ranks_continues_the_shared_order(saved_world, index, world, expected):
    """Saved after ``index`` batches per rank by saved_world ranks: index * saved_world batches of
    the shared order are used; on ``world`` ranks each continues at that batch, rounded up."""
    layout = Layout.__new__(Layout)  # only the data position is under test: no model to shard
    layout.dist = Distributed(0, world, 0) if world > 1 else None
    state = {"position": [1, index], "world_size": saved_world}
    assert layout.local_position(state) == (1, expected)
    assert layout.local_position({"position": [1, index]}) == (1, index)  # older checkpoints: as saved


def test_shards_do_not_overlap_and_have_equal_length():
    batches = list(range(11))
    shards = [Distributed(r, 3, r).shard(batches) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_world_size_mismatch_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="asks for 2 processes but 1 were started"):
        init_distributed(expected_world_size=2)
    assert init_distributed() is None
    assert reduce_loads({"a": torch.ones(2)}, None)["a"].tolist() == [1.0, 1.0]


def _dead_peer_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    # The survivor destroys its group in the with block's exit: left to the interpreter's exit,
    # the failed collective's pending work made rank 0 abort with SIGABRT some of the times.
    with process_group(timeout_s=5):
        if rank == 1:
            os._exit(0)  # dies without a word
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            dist.all_reduce(torch.ones(1))
        assert time.monotonic() - start < 60  # an error after the timeout, not a hang


def test_a_dead_rank_ends_the_collective_with_an_error():
    spawn(_dead_peer_worker, (2, free_port()), timeout_s=120)


def _failing_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    with pytest.raises(ValueError, match="boom"), process_group(expected_world_size=2, timeout_s=60) as ctx:
        assert ctx is not None and dist.is_initialized()
        assert float(ctx.sum(torch.ones(()))) == 2.0
        raise ValueError("boom")
    assert not dist.is_initialized()  # destroyed by the exception's way out, on every rank
    close_distributed()  # idempotent


def test_the_process_group_is_destroyed_also_when_the_block_raises():
    spawn(_failing_worker, (2, free_port()), timeout_s=120)


def _forgetful_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    init_distributed(timeout_s=60)  # a caller (e.g. the torchrun CLI path) that never destroys it
    atexit._run_exitfuncs()  # what the interpreter runs first on its way out
    assert not dist.is_initialized()  # destroyed there, before Py_FinalizeEx


def test_a_group_the_caller_forgets_is_destroyed_at_exit_before_finalization():
    spawn(_forgetful_worker, (2, free_port()), timeout_s=120)


def _leaking_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    init_distributed(timeout_s=60)  # and never destroyed


def test_a_worker_that_leaves_its_process_group_fails_with_its_rank_named():
    with pytest.raises(Exception, match=r"rank \d returned with its process group alive"):
        spawn(_leaking_worker, (2, free_port()), timeout_s=120)
