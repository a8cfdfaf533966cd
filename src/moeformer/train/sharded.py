"""Sharded training state: fully sharded data parallelism (FSDP2, ``fully_shard``), and the
checkpoints of sharded runs (FSDP2 and expert parallelism) through ``torch.distributed.checkpoint``.

FSDP2: each block (and then the whole model) is wrapped by ``fully_shard``: parameters,
gradients and AdamW moments are split over the ranks and gathered block by block when needed.

A sharded run's checkpoint holds, besides the usual ``model.safetensors`` (the full weights,
gathered, for inference on any machine) and ``trainer.pt`` (schedule, RNG, position), a ``dcp/``
directory with model and optimizer state in the layout of ``get_state_dict`` (keys are parameter
names, the same for every layout). Under expert parallelism each rank holds a slice of every
routed expert tensor and of its AdamW moments; they are saved as DTensors sharded on the expert
dimension of the device mesh, so DCP records their global shape. DCP re-shards on load: a run
saved under one layout (FSDP over N ranks, expert parallelism over N, one process) resumes under
another, or in one process without any process group.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from moeformer.models import build_model
from moeformer.train.checkpoint import DCP_DIR, Checkpoint, load_weights, save_checkpoint, staging_dir
from moeformer.train.distributed import ExpertShards
from moeformer.train.optim import build_optimizer


def apply_fsdp(model: nn.Module, shards: ExpertShards | None = None, replicate: int = 1) -> None:
    """fully_shard every block of the model, then the model itself (its embeddings and head).

    replicate > 1: hybrid sharding (HSDP): the model is sharded over world / replicate ranks and
    replicated ``replicate`` times (a 2-D mesh ``("replicate", "shard")``); gradients are
    reduce-scattered within a replica, then all-reduced across replicas.

    With expert parallelism (``shards``), as torchtitan does: each layer's routed-expert slice is
    first sharded on its own over the ranks that hold the same slice (the mesh's ``dp``
    dimension), everything else over the whole world. Expert gradients arrive summed over the
    expert-parallel group by the all-to-all's backward and FSDP's reduce-scatter divides them by
    the ``dp`` size; :func:`to_world_mean` then divides by the expert-parallel size, so every
    parameter gets the world-mean gradient. (FSDP's own ``set_gradient_divide_factor`` would do it
    in the reduction, but needs ``ReduceOp.PREMUL_SUM``, which gloo lacks.)
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device.type
    world = dist.get_world_size()
    if shards is not None:
        for experts in shards.expert_modules(model):
            fully_shard(experts, mesh=shards.mesh["dp"])
    if replicate > 1:
        mesh = init_device_mesh(device, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device, (world,))
    for name in ("layers", "encoder", "decoder"):
        for block in getattr(model, name, []):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


@torch.no_grad()
def to_world_mean(model: nn.Module, shards: ExpertShards) -> None:
    """FSDP + EP, after backward: expert gradients from the dp-mean to the world mean (see apply_fsdp)."""
    for experts in shards.expert_modules(model):
        for p in experts.parameters():
            if p.grad is not None:
                p.grad.to_local().div_(shards.ep_size)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (a collective: every rank must call it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shards of model and optimizer state to ``directory/dcp``."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / DCP_DIR))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_dir: Path) -> None:
    """Load model and optimizer state saved by any number of ranks into this (sharded or plain) model."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(checkpoint_dir / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def save_fsdp_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_dir: Path,
    step: int,
    meta: dict[str, Any],
    state: dict[str, Any],
    *,
    main: bool,
    best: bool,
    keep_last: int,
) -> Path | None:
    """One checkpoint of an FSDP run from every rank (a collective): see :func:`save_with_shards`."""
    full = full_weights(model)
    write = lambda tmp: save_sharded(model, optimizer, tmp)  # noqa: E731
    return save_with_shards(model.config, full, write, run_dir, step, meta, state,
                            main=main, best=best, keep_last=keep_last)  # fmt: skip


def save_with_shards(
    config: Any,
    full: dict[str, torch.Tensor] | None,
    write_shards: Callable[[Path], None],
    run_dir: Path,
    step: int,
    meta: dict[str, Any],
    state: dict[str, Any],
    *,
    main: bool,
    best: bool,
    keep_last: int,
) -> Path | None:
    """One checkpoint from every rank: the full weights ``full`` (rank 0) and every rank's DCP shards.

    A collective: every rank calls it. Rank 0 stages the checkpoint directory; the other ranks
    write their shards into that staging directory before rank 0 publishes it, so a checkpoint
    is either whole or absent. Returns the published directory on rank 0, None elsewhere.
    """

    def write(tmp: Path) -> None:
        dist.barrier()  # rank 0 has created the staging directory
        write_shards(tmp)
        dist.barrier()

    if not main:
        write(staging_dir(run_dir, step))
        return None
    plain = build_model(config)
    plain.load_state_dict(full)
    return save_checkpoint(run_dir, step, plain, meta, state, best=best, keep_last=keep_last, before_publish=write)


# -- expert parallelism ------------------------------------------------------------------------
def _expert_dtensors(state: dict[str, Any], shards: ExpertShards) -> dict[str, Any]:
    """``get_state_dict``'s (model, optim) pair with every expert tensor made a DTensor of the full
    expert dimension, so that DCP records its global shape: dim 0 (the expert index) sharded over
    the mesh's ``ep`` dimension and, under FSDP, each slice sharded again over ``dp`` (else
    replicated there). Scalars (AdamW's ``step``) and everything else stay as they are."""

    def wrap(name: str, value: Any) -> Any:
        if name not in shards.names or not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        if not isinstance(value, DTensor):  # DDP + EP: this rank holds the whole slice
            return DTensor.from_local(value, shards.mesh, [Replicate(), Shard(0)], run_check=False)
        # FSDP + EP: a dp-shard of this rank's slice; ep splits dim 0 first, then dp splits each part
        shape = (value.shape[0] * shards.ep_size, *value.shape[1:])
        mesh, placements = shards.ep_major_mesh(), [Shard(0), Shard(0)]
        return DTensor.from_local(value.to_local(), mesh, placements, run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())  # fmt: skip

    model, optim = _map_named(state["model"], state["optim"], wrap)
    return {"model": model, "optim": optim}


def _map_named(model_state: dict[str, Any], optim_state: dict[str, Any],
               fn: Callable[[str, Any], Any]) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """``fn(parameter name, value)`` applied to every model entry and every optimizer moment."""
    model = {k: fn(k, v) for k, v in model_state.items()}
    moments = {k: {m: fn(k, v) for m, v in per.items()} for k, per in optim_state["state"].items()}
    return model, {**optim_state, "state": moments}


def _restored(loaded: Any, original: Any) -> Any:
    """Undo :func:`_expert_dtensors` after a load: DDP + EP entries become this rank's slice;
    FSDP + EP ones the original FSDP DTensors (the load wrote into their shared local storage)."""
    if isinstance(loaded, dict):
        return {k: _restored(v, original[k]) for k, v in loaded.items()}
    if isinstance(loaded, DTensor) and loaded is not original:
        return original if isinstance(original, DTensor) else loaded.to_local()
    return loaded


def save_expert_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, shards: ExpertShards,
                        directory: Path) -> None:  # fmt: skip
    """Every rank writes model and optimizer state, expert slices included, to ``directory/dcp``."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = _expert_dtensors({"model": model_state, "optim": optim_state}, shards)
    dcp.save(state, checkpoint_id=str(directory / DCP_DIR))


def load_expert_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, shards: ExpertShards,
                        checkpoint_dir: Path) -> None:  # fmt: skip
    """Load model and optimizer state saved under any layout into this rank's expert slices."""
    model_state, optim_state = get_state_dict(model, optimizer)
    original = {"model": model_state, "optim": optim_state}
    state = _expert_dtensors(original, shards)
    dcp.load(state, checkpoint_id=str(checkpoint_dir / DCP_DIR))
    state = _restored(state, original)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def expert_parallel_full_weights(model: nn.Module, shards: ExpertShards, *, fsdp: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights, every routed expert included, on every rank (a collective)."""
    if not fsdp:
        with shards.full(model):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # experts: this ep slice
    for name in shards.names:
        parts = [torch.empty_like(state[name]) for _ in range(shards.ep_size)]
        dist.all_gather(parts, state[name].contiguous(), group=shards.ep_group)
        state[name] = torch.cat(parts)
    return state


def clip_sharded_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm when the gradients are DTensors on different meshes (FSDP
    with expert parallelism, HSDP): each rank's squares, divided by how many ranks hold the same
    values (the mesh dimensions the gradient is replicated over), summed over the world."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.zeros((), dtype=torch.float32, device=local[0].device if local else None)
    for g, values in zip(grads, local):
        sq += values.float().pow(2).sum() / _copies(g)
    dist.all_reduce(sq)
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(scale.to(g.dtype))
    return norm


def _copies(grad: torch.Tensor) -> int:
    """How many ranks hold each value of ``grad``: the world for a plain tensor (replicated
    everywhere), the product of its mesh's replicated dimensions for a DTensor."""
    if not isinstance(grad, DTensor):
        return dist.get_world_size()
    mesh, copies = grad.device_mesh, 1
    for dim, placement in enumerate(grad.placements):
        copies *= mesh.size(dim) if placement.is_replicate() else 1
    return copies


def load_plain_into_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Checkpoint,
                            optimizer_state: dict[str, Any], shards: ExpertShards | None) -> None:  # fmt: skip
    """A checkpoint of one process or DDP (full weights, ``optimizer.state_dict()``) into a sharded
    run (FSDP2, EP, or both): rebuilt as the plain model and optimizer that wrote it, read as
    named full state, cut to this rank's expert slices, and handed to ``set_state_dict``, which
    shards it as the model is sharded."""
    plain = build_model(model.config)
    load_weights(plain, ckpt)
    group, defaults = optimizer.param_groups[0], optimizer.defaults
    plain_optimizer = build_optimizer(plain, lr=defaults["lr"], weight_decay=group["weight_decay"],
                                      betas=defaults["betas"], eps=defaults["eps"])  # fmt: skip
    plain_optimizer.load_state_dict(optimizer_state)
    model_state, optim_state = get_state_dict(plain, plain_optimizer)
    if shards is not None:
        model_state, optim_state = _map_named(model_state, optim_state, lambda k, v: _expert_slice(k, v, shards))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))  # fmt: skip


def _expert_slice(name: str, value: Any, shards: ExpertShards) -> Any:
    """This rank's experts of a full expert tensor (dim 0 = expert index); anything else unchanged."""
    if name not in shards.names or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    n_local = value.shape[0] // shards.ep_size
    first = shards.mesh.get_local_rank("ep") * n_local
    return value[first : first + n_local].clone()
