"""Data-parallel training on torch.distributed: set-up, data sharding, reductions.

``torchrun --nproc_per_node N -m moeformer train CONFIG`` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in the environment; :func:`init_distributed` joins
them into one process group (NCCL on GPUs, gloo on CPUs) with a timeout, so a dead rank ends
the run with an error instead of a hang. The model is wrapped in DistributedDataParallel; each
rank takes every N-th batch of the shared, deterministic batch order (no overlap), and the loss
of each rank is weighted by its share of the step's tokens, so the averaged gradient is that of
the whole global batch. Routing loads are summed over ranks before the bias update and before
logging; only rank 0 logs, evaluates into files and writes checkpoints.

Lifetime: :func:`process_group` (a ``with`` block) destroys the group it created on the way
out, also on an exception. Why it matters: a group left alive at exit is destroyed by the last
garbage collection inside ``Py_FinalizeEx`` (seen in gdb), in a half-finalized interpreter,
where gloo's destructor joins its worker threads and frees their pending work (futures,
tensors, a failed collective's error); whether anything is still pending then is a race, so
such a process aborts (SIGABRT) some of the times only (issue 13). :func:`init_distributed`
therefore also registers an ``atexit`` hook that destroys a group still alive while the
interpreter is whole, for callers that forget.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moeformer.validation import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: Tensor) -> Tensor:
        """All-reduce (sum) a copy of ``value`` over the ranks."""
        out = value.detach().clone()
        dist.all_reduce(out)
        return out

    def shard(self, batches: list[T]) -> list[T]:
        """This rank's batches: every world_size-th, the same count on every rank (no rank waits alone)."""
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]


def init_distributed(*, expected_world_size: int | None = None, timeout_s: float = 600.0) -> Distributed | None:
    """Join the process group torchrun describes, or return None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if expected_world_size is not None and world != expected_world_size:
        raise ConfigError(
            "train.world_size", f"the config asks for {expected_world_size} processes but {world} were started"
        )
    if world == 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        # init_process_group can return on one rank while a peer is still connecting its side of
        # gloo's full mesh; a rank that then leaves at once (an error, a test that needs no
        # collective) closes its sockets under the peer, whose init fails "Connection closed by
        # peer". After this barrier every rank has finished joining.
        dist.barrier()
        atexit.unregister(close_distributed)  # once, however many groups this process makes in turn
        atexit.register(close_distributed)  # runs before Py_FinalizeEx tears the interpreter down
    return Distributed(rank, world, local_rank)


def close_distributed() -> None:
    """Destroy the default process group and every group made from it (ExpertShards' EP and
    replica groups), if one is alive. Idempotent. The groups are shut down here, with the
    interpreter whole, instead of by the garbage collector at exit (see the module docstring)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(*, expected_world_size: int | None = None, timeout_s: float = 600.0) -> Iterator[Distributed | None]:
    """:func:`init_distributed` for the length of a ``with`` block; a group the block created is
    destroyed when it ends, normally or by an exception (a group that existed before is left)."""
    existed = dist.is_initialized()
    ctx = init_distributed(expected_world_size=expected_world_size, timeout_s=timeout_s)
    try:
        yield ctx
    finally:
        if ctx is not None and not existed:
            close_distributed()


def check_layout(expert_parallel: int, world_size: int, moe: object | None, dp_replicate: int = 1) -> None:
    """Refuse, before any data is read, a layout that cannot be built, with the numbers: the
    expert mesh is world / G data-parallel replicas x G expert-parallel ranks, each of the G ranks
    holding an equal share of every MoE layer's routed experts; under HSDP the rest of the model
    is sharded over world / R ranks and replicated R times (R = dp_replicate).

    moe: the model's :class:`~moeformer.model_config.MoEConfig` (None: the model has no MoE layer).
    """
    if world_size % dp_replicate:
        raise ConfigError(
            "train.dp_replicate",
            f"{dp_replicate} does not divide the {world_size} processes started (the mesh is {dp_replicate} "
            f"replicas x world / {dp_replicate} shards); use a divisor of {world_size}",
        )
    G = expert_parallel
    if G == 1:
        return
    if world_size == 1:
        raise ConfigError("train.expert_parallel", f"{G} needs a multiple of {G} processes: launch with torchrun")
    if world_size % G:
        raise ConfigError(
            "train.expert_parallel",
            f"{G} does not divide the {world_size} processes started (the mesh is world / {G} replicas x {G} "
            f"expert-parallel ranks); use a divisor of {world_size}",
        )
    if moe is None:
        raise ConfigError("train.expert_parallel", f"is {G}, but the model has no MoE layers to shard; set it to 1")
    routed = moe.n_experts * moe.granularity
    if routed % G:
        raise ConfigError(
            "train.expert_parallel",
            f"{G} cannot split the {routed} routed experts of each MoE layer evenly; use a divisor of {routed}",
        )


def reduce_loads(loads: dict[str, Tensor], ctx: Distributed | None) -> dict[str, Tensor]:
    """Tokens per expert summed over ranks (bias updates and load logging see the global batch)."""
    if ctx is None or not loads:
        return loads
    names = sorted(loads)
    flat = ctx.sum(torch.cat([loads[n].float() for n in names]))
    return dict(zip(names, flat.split([loads[n].numel() for n in names])))


class ExpertShards:
    """Expert parallelism inside data parallelism: the world split into expert-parallel groups of
    ``ep_size`` consecutive ranks; each group holds every routed expert once, sharded.

    The layout is a 2-D device mesh (``init_device_mesh``), dimensions ``("dp", "ep")`` of sizes
    (world / ep_size, ep_size): the expert-parallel groups are its ``ep`` dimension, the ranks that
    hold the same expert slice (replicas) its ``dp`` dimension. Checkpoints save the slices as
    DTensors on this mesh (:func:`moeformer.train.sharded.save_expert_sharded`).

    Gradients: a rank's expert shard receives, through the all-to-all backward, the gradient of
    every loss in its EP group; summing over the ranks that hold the same shard in the other
    groups and dividing by the world size gives the mean over the whole world, as DDP does for
    the replicated parameters (which DDP is told to leave to us).
    """

    def __init__(self, model: nn.Module, ctx: Distributed, ep_size: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from moeformer.moe.parallel import shard_experts

        if ctx.world_size % ep_size:
            raise ConfigError(
                "train.expert_parallel",
                f"{ep_size} must divide the world size {ctx.world_size} (the mesh is world / ep replicas x ep)",
            )
        self.ctx, self.ep_size = ctx, ep_size
        device = next(model.parameters()).device.type
        self.mesh = init_device_mesh(device, (ctx.world_size // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
        self._ep_major: DeviceMesh | None = None
        self.ep_group = self.mesh.get_group("ep")
        self.replica_group = self.mesh.get_group("dp")
        try:
            shard_experts(model, self.ep_group)
        except ValueError as err:
            raise ConfigError("train.expert_parallel", str(err)) from None
        self.names = [n for n, _ in model.named_parameters() if ".experts." in n]
        self.params = [p for n, p in model.named_parameters() if ".experts." in n]

    def expert_modules(self, model: nn.Module) -> list[nn.Module]:
        """Each MoE layer's slice of routed experts (what FSDP shards over ``dp`` on its own)."""
        from moeformer.moe.layer import MoELayer

        return [m.experts for m in model.modules() if isinstance(m, MoELayer) and m.expert_parallel is not None]

    def ep_major_mesh(self) -> DeviceMesh:
        """The same ranks as a mesh ``("ep", "dp")``: a DTensor sharded on one dim over ``ep`` and then
        over ``dp`` (FSDP's shard of an expert slice) is placed ``[Shard(0), Shard(0)]`` on it."""
        if self._ep_major is None:
            self._ep_major = DeviceMesh(self.mesh.device_type, self.mesh.mesh.t().contiguous(),
                                        mesh_dim_names=("ep", "dp"))  # fmt: skip
        return self._ep_major

    def reduce_grads(self) -> None:
        for p in self.params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.replica_group)
                p.grad /= self.ctx.world_size

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> Tensor:
        """Clip by the norm of the whole model's gradient: replicated parts once, expert shards summed."""
        shared = [p.grad for p in params if p.grad is not None and all(p is not q for q in self.params)]
        local = [p.grad for p in self.params if p.grad is not None]
        sq_experts = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros(())
        dist.all_reduce(sq_experts, group=self.ep_group)
        sq_shared = torch.stack([g.float().pow(2).sum() for g in shared]).sum() if shared else torch.zeros(())
        norm = (sq_shared + sq_experts).sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in shared + local:
            g.mul_(scale.to(g.dtype))
        return norm

    @contextmanager
    def full(self, model: nn.Module) -> Iterator[None]:
        """Every MoE layer temporarily holds all its experts (gathered over the EP group), e.g. to
        save or load a checkpoint that any world size can read; changes made inside are kept."""
        from moeformer.moe.layer import MoELayer
        from moeformer.moe.parallel import local_experts

        layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.expert_parallel is not None]
        shards = [layer.experts for layer in layers]
        for layer in layers:
            layer.experts = _gathered(layer.experts, layer.expert_parallel.n_experts, self.ep_group)
        try:
            yield
        finally:
            for layer, shard in zip(layers, shards):
                ep = layer.expert_parallel
                sliced = local_experts(layer.experts, ep.first_expert, ep.n_local)
                with torch.no_grad():
                    for (_, p), (_, q) in zip(shard.named_parameters(), sliced.named_parameters()):
                        p.copy_(q)
                layer.experts = shard


def _gathered(shard: nn.Module, n_experts: int, group: dist.ProcessGroup) -> nn.Module:
    from moeformer.moe.experts import Experts

    full = Experts(n_experts, shard.d_model, shard.hidden, activation=shard.activation,
                   bias=shard.up_bias is not None, backend=shard.backend)  # fmt: skip
    full = full.to(device=shard.down_proj.device, dtype=shard.down_proj.dtype)
    with torch.no_grad():
        for (_, p), (_, q) in zip(shard.named_parameters(), full.named_parameters()):
            parts = [torch.empty_like(p) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, p.detach().contiguous(), group=group)
            q.copy_(torch.cat(parts))
    return full
