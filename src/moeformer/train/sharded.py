"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) and its
checkpoints through ``torch.distributed.checkpoint`` (DCP).

Each block (and then the whole model) is wrapped by ``fully_shard``: parameters, gradients and
AdamW moments are split over the ranks and gathered block by block when needed. A checkpoint
holds, besides the usual ``model.safetensors`` (the full weights, gathered, for inference on any
machine) and ``trainer.pt`` (schedule, RNG, position), a ``dcp/`` directory with the sharded
model and optimizer state. DCP re-shards on load, so a run saved by N ranks resumes on M ranks,
or on one process without any process group.
"""

from __future__ import annotations

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
    """One checkpoint from every rank: the full weights (rank 0) and every rank's DCP shards.

    A collective: every rank calls it. Rank 0 stages the checkpoint directory; the other ranks
    write their shards into that staging directory before rank 0 publishes it, so a checkpoint
    is either whole or absent. Returns the published directory on rank 0, None elsewhere.
    """
    full = full_weights(model)

    def write_shards(tmp: Path) -> None:
        dist.barrier()  # rank 0 has created the staging directory
        save_sharded(model, optimizer, tmp)
        dist.barrier()

    if not main:
        write_shards(staging_dir(run_dir, step))
        return None
    plain = build_model(model.config)
    plain.load_state_dict(full)
    return save_checkpoint(
        run_dir, step, plain, meta, state, best=best, keep_last=keep_last, before_publish=write_shards
    )
