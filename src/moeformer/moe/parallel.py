"""Expert parallelism: the routed experts of a layer sharded over the ranks of a process group.

GShard (Lepikhin et al. 2020) and DeepSeek-V3 place each routed expert on one device; tokens
travel to the experts they chose and back. With ``ep`` ranks and E experts, rank r owns experts
[r E/ep, (r+1) E/ep). One forward on each rank:

1. route its own tokens (router, padding and capacity as on one device: capacity is per rank's
   batch, GShard's "group");
2. sort the (token, expert) assignments by expert, so they are grouped by owning rank too;
3. exchange the per-expert counts (``all_to_all_single`` of E integers), then the token rows;
4. run the local experts on the received rows with the same grouped kernels as one device;
5. send the outputs back along the reverse split, scale by the gate weights, add them up.

Both transfers are torch's differentiable functional ``all_to_all_single`` (as torchtitan
uses), so the backward sends the gradients along the same routes. The router, shared experts
and the rest of the model stay replicated (data parallel across the group).

Overlap: the functional collective returns at once, with the transfer under way (on gloo, in its
worker thread; on NCCL, on its stream); whatever the caller passes as ``meanwhile`` (the shared
experts, which need none of the routed rows) runs then, and the rows are waited for only when
the local experts need them. The sum is taken in the same order as without overlap, so the
numbers are identical. ``DispatchStats.waited_s`` is the host time the forward spent blocked on
the transfers: the communication left exposed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moeformer.moe.experts import Experts


@dataclass
class DispatchStats:
    sent_rows: int  # (token, expert) rows this rank sent to other ranks (and got back)
    received_rows: int
    waited_s: float = 0.0  # host seconds the forward was blocked on its transfers (exposed communication)

    def bytes_per_step(self, d_model: int, element_size: int) -> int:
        """Bytes this rank sends in one forward (rows out to the experts plus their results back)."""
        return (self.sent_rows + self.received_rows) * d_model * element_size


class ExpertParallel(nn.Module):
    """Dispatch to experts sharded over ``group``; ``experts`` holds only this rank's experts."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.size:
            raise ValueError(
                f"{n_experts} routed experts cannot be split evenly over an expert-parallel group of {self.size}; "
                f"use a group size that divides {n_experts}"
            )
        self.n_experts = n_experts
        self.n_local = n_experts // self.size
        self.last = DispatchStats(0, 0)
        self.overlap = True  # run ``meanwhile`` while the dispatch travels (off: before it, for comparison)

    @property
    def first_expert(self) -> int:
        return self.rank * self.n_local

    def forward(self, x: Tensor, index: Tensor, weights: Tensor, experts: Experts,
                meanwhile: Callable[[], Tensor] | None = None) -> Tensor:  # fmt: skip
        """x: (N, D); index, weights: (N, K) global expert ids (n_experts = dropped) -> (N, D).

        meanwhile: computed while the routed rows travel and added to the result (the shared
        experts' output): returns routed + meanwhile(), as ``out + shared`` on one device.
        """
        N, K = index.shape
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        per_expert = torch.bincount(flat, minlength=self.n_experts + 1)[: self.n_experts]
        order = order[: int(per_expert.sum())]  # dropped assignments sort last
        token, gate = order // K, weights.reshape(-1)[order]
        waited = time.perf_counter()
        received = torch.empty_like(per_expert)
        dist.all_to_all_single(received, per_expert, group=self.group)  # (size * n_local,): [source, local expert]
        waited = time.perf_counter() - waited
        received = received.view(self.size, self.n_local)
        send_splits = per_expert.view(self.size, self.n_local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        side = meanwhile() if meanwhile is not None and not self.overlap else None
        travelling = _launch(x.index_select(0, token), recv_splits, send_splits, self.group)
        if meanwhile is not None and self.overlap:
            side = meanwhile()
        rows, blocked = _wait(travelling)
        local_ids = torch.arange(self.n_local, device=x.device).repeat(self.size)
        local_ids = torch.repeat_interleave(local_ids, received.reshape(-1))
        ones = torch.ones(local_ids.shape[0], 1, dtype=weights.dtype, device=x.device)
        y = experts(rows, local_ids[:, None], ones)  # one row per assignment: K = 1, weight 1
        back, blocked_back = _wait(_launch(y, send_splits, recv_splits, self.group))
        sent, got = sum(send_splits) - send_splits[self.rank], sum(recv_splits) - recv_splits[self.rank]
        self.last = DispatchStats(sent, got, waited + blocked + blocked_back)
        out = torch.zeros_like(x).index_add_(0, token, back * gate[:, None].to(back.dtype))
        return out if side is None else out + side


def _launch(rows: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Start a differentiable all-to-all of rows (the backward sends the gradients along the
    reverse splits); returns at once, with the transfer under way."""
    return all_to_all_single_autograd(rows.contiguous(), out_splits, in_splits, group or dist.group.WORLD)


def _wait(travelling: Tensor) -> tuple[Tensor, float]:
    """The rows of a started all-to-all, and the host seconds spent waiting for them."""
    start = time.perf_counter()
    rows = torch.ops._c10d_functional.wait_tensor(travelling)
    return rows, time.perf_counter() - start


@torch.no_grad()
def local_experts(experts: Experts, first: int, count: int) -> Experts:
    """A new Experts module holding experts [first, first + count) of ``experts`` (weights copied)."""
    local = Experts(
        count, experts.d_model, experts.hidden, activation=experts.activation,
        bias=experts.up_bias is not None, backend=experts.backend,
    )  # fmt: skip
    for name, param in experts.named_parameters():
        getattr(local, name).copy_(param[first : first + count])
    return local.to(device=experts.down_proj.device, dtype=experts.down_proj.dtype)


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Make every MoE layer of ``model`` expert-parallel over ``group`` (in place); returns how many.

    Every rank must hold the same full weights before the call (same seed or a broadcast): each
    keeps its slice of the routed experts. The device-level balance loss then uses the real
    devices (the group's ranks) as its expert groups.
    """
    from moeformer.moe.layer import MoELayer

    n = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer) and layer.expert_parallel is None:
            ep = ExpertParallel(layer.router.n_experts, group)
            layer.experts = local_experts(layer.experts, ep.first_expert, ep.n_local)
            layer.expert_parallel = ep
            n += 1
    return n
