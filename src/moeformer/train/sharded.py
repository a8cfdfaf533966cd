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

from collections.abc import Callable, Collection
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
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from moeformer.models import build_model
from moeformer.train.checkpoint import save_checkpoint, staging_dir

DCP_DIR = "dcp"


def apply_fsdp(model: nn.Module) -> None:
    """fully_shard every block of the model, then the model itself (its embeddings and head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for name in ("layers", "encoder", "decoder"):
        for block in getattr(model, name, []):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (a collective: every rank must call it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shards of model and optimizer state to ``directory/dcp``."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / DCP_DIR))


def has_sharded_state(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / DCP_DIR / ".metadata").is_file()


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
def _expert_dtensors(state: dict[str, Any], names: Collection[str], mesh: DeviceMesh) -> dict[str, Any]:
    """``get_state_dict``'s (model, optim) pair with every expert-sharded tensor made a DTensor:
    replicated over the mesh's data-parallel dimension, sharded on dim 0 (the expert index) over
    its ``ep`` dimension. Scalars (AdamW's ``step``) and everything else stay as they are."""
    placements = [Replicate(), Shard(0)]

    def wrap(name: str, value: Any) -> Any:
        if name in names and isinstance(value, torch.Tensor) and value.dim() > 0:
            return DTensor.from_local(value, mesh, placements, run_check=False)
        return value

    model = {k: wrap(k, v) for k, v in state["model"].items()}
    moments = {k: {m: wrap(k, v) for m, v in per.items()} for k, per in state["optim"]["state"].items()}
    return {"model": model, "optim": {**state["optim"], "state": moments}}


def _local(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_expert_dtensors`: every DTensor replaced by this rank's slice."""
    if isinstance(state, dict):
        return {k: _local(v) for k, v in state.items()}
    return state.to_local() if isinstance(state, DTensor) else state


def save_expert_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, mesh: DeviceMesh,
                        names: Collection[str], directory: Path) -> None:  # fmt: skip
    """Every rank writes model and optimizer state, expert slices included, to ``directory/dcp``.

    mesh: 2-D, (data-parallel replicas, ``ep``); names: the parameters this rank holds a slice of.
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    state = _expert_dtensors({"model": model_state, "optim": optim_state}, names, mesh)
    dcp.save(state, checkpoint_id=str(directory / DCP_DIR))


def load_expert_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, mesh: DeviceMesh,
                        names: Collection[str], checkpoint_dir: Path) -> None:  # fmt: skip
    """Load model and optimizer state saved under any layout into this rank's expert slices."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = _expert_dtensors({"model": model_state, "optim": optim_state}, names, mesh)
    dcp.load(state, checkpoint_id=str(checkpoint_dir / DCP_DIR))
    state = _local(state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
