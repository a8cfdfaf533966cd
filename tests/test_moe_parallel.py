"""Expert parallelism over 2 CPU processes (gloo): equal to the single-process layer, forward and backward."""

from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from spawn import spawn

from moeformer.moe.layer import build_moe
from moeformer.moe.parallel import shard_experts

CASES = {
    "deepseek": dict(kind="deepseek", n_experts=8, top_k=3, n_shared=1, device_loss=0.01, n_devices=2),
    "topk-capacity": dict(kind="topk", n_experts=4, top_k=2, capacity_factor=0.75, balance_loss=0.01),
    "v3-sigmoid": dict(kind="deepseek", n_experts=8, top_k=2, n_shared=1, score="sigmoid", n_group=2, topk_group=1,
                       routed_scaling=2.5, bias_update_rate=1e-3),  # fmt: skip
}


def _join(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    # init_process_group may return here while the peer is still connecting to us; a rank that
    # then leaves without a collective (the uneven case raises before any) made the peer's init
    # fail with "Connection closed by peer". After the barrier both ranks have joined.
    dist.barrier()


def _worker(rank: int, world: int, init_file: str, case: str) -> None:
    torch.set_num_threads(1)
    _join(rank, world, init_file)
    try:
        torch.manual_seed(0)
        layer = build_moe(d_model=16, expert_hidden=8, **CASES[case])
        ref, ep, serial = copy.deepcopy(layer), copy.deepcopy(layer), copy.deepcopy(layer)
        assert shard_experts(ep) == 1 and ep.experts.n_experts == layer.router.n_experts // world
        shard_experts(serial)
        serial.expert_parallel.overlap = False  # the shared experts before the dispatch, not during it
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
        x = torch.randn(3, 7, 16, generator=g)
        pad = torch.zeros(3, 7, dtype=torch.bool)
        pad[0, :2] = True
        grad_out = torch.randn(3, 7, 16, generator=g)
        outs = {}
        for name, model in (("ref", ref), ("ep", ep), ("serial", serial)):
            xi = x.clone().requires_grad_()
            out = model(xi, pad)
            loss = (out.output * grad_out).sum() + sum(out.aux_losses.values())
            loss.backward()
            outs[name] = (out, xi.grad)
        (r, rx), (e, ex) = outs["ref"], outs["ep"]
        torch.testing.assert_close(e.output, r.output, atol=1e-5, rtol=0)
        torch.testing.assert_close(ex, rx, atol=1e-5, rtol=0)
        for k in r.aux_losses:
            torch.testing.assert_close(e.aux_losses[k], r.aux_losses[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(e.stats["dropped_fraction"], r.stats["dropped_fraction"])
        ref_grads = dict(ref.named_parameters())
        first = ep.expert_parallel.first_expert
        for name, p in ep.named_parameters():
            expected = ref_grads[name].grad
            if name.startswith("experts."):  # expert weights see every rank's tokens: sum, then this shard
                expected = expected.clone()
                dist.all_reduce(expected)
                expected = expected[first : first + ep.experts.n_experts]
            torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        # Overlap changes when the shared experts run: the forward is equal to the bit; in the
        # backward, autograd sums the input's two gradients (shared, routed) in the other order.
        s, sx = outs["serial"]
        assert torch.equal(s.output, e.output)
        torch.testing.assert_close(sx, ex, atol=1e-6, rtol=0)
        for (name, p), q in zip(ep.named_parameters(), serial.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert ep.expert_parallel.last.waited_s >= 0.0 and ep.expert_parallel.last.sent_rows > 0
        if case == "topk-capacity":
            assert float(r.stats["dropped_fraction"]) > 0  # the case really drops tokens
        dist.barrier()  # both ranks are done with every collective before the group goes away
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_parallel_equals_one_process(case, tmp_path):
    init = tmp_path / "init"
    spawn(_worker, (2, str(init), case))


def _uneven_worker(rank: int, world: int, init_file: str) -> None:
    _join(rank, world, init_file)
    try:
        layer = build_moe(kind="topk", d_model=8, n_experts=3, top_k=1, expert_hidden=4)
        with pytest.raises(ValueError, match="cannot be split evenly"):
            shard_experts(layer)
    finally:
        dist.destroy_process_group()


def test_experts_must_divide_the_group(tmp_path):
    spawn(_uneven_worker, (2, str(tmp_path / "init")))


if os.name == "nt":  # pragma: no cover
    pytest.skip("gloo process groups over file:// are not tested on Windows", allow_module_level=True)
