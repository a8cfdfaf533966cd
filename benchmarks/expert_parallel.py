"""Expert parallelism on CPU processes (gloo): tokens/s, exposed communication and all-to-all bytes
for 1, 2 and 4 processes, with and without overlapping the shared experts with the dispatch.

    python benchmarks/expert_parallel.py [--tokens 2048] [--d-model 512] [--experts 64] [--hidden 256]
                                         [--top-k 6] [--shared 2] [--steps 10] [--world 1 2 4] [--json]

Each process routes ``--tokens`` tokens per step through one DeepSeekMoE layer (forward +
backward): ``--experts`` routed experts sharded over the processes, ``--shared`` shared experts
replicated. With 1 process all experts are local and nothing is sent; with n, each owns 1/n of
the experts and exchanges rows with ``all_to_all_single``. Every process runs on one thread.

Columns: tokens/s over all processes (ideal: n x one process, when there are n free cores);
"exposed comm": the host time per step a rank spent blocked on the forward's transfers (counts,
dispatch, combine; ``DispatchStats.waited_s``), what overlap can hide; overlap on runs the shared
experts while the dispatch travels (the default), off runs them before it. Bytes: what one rank
sends per step (rows to remote experts + their results back, forward and backward), beside the
formula 4 * k * (1 - 1/n) * d_model * bytes per element per token.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, overlap: bool, out: str) -> None:
    torch.set_num_threads(1)
    from moeformer.moe import build_moe
    from moeformer.moe.parallel import shard_experts

    torch.manual_seed(0)
    layer = build_moe(kind="deepseek", d_model=args.d_model, n_experts=args.experts, top_k=args.top_k,
                      expert_hidden=args.hidden, n_shared=args.shared)  # fmt: skip
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))  # fmt: skip
        shard_experts(layer)
        layer.expert_parallel.overlap = overlap
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1, args.tokens, args.d_model, generator=g, requires_grad=True)
    times, waits, sent = [], [], 0
    for step in range(args.steps + 2):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        out_ = layer(x)
        out_.output.sum().backward()
        if world > 1:
            dist.barrier()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
            waits.append(layer.expert_parallel.last.waited_s if world > 1 else 0.0)
        if world > 1:
            ep = layer.expert_parallel.last
            sent = 2 * ep.bytes_per_step(args.d_model, x.element_size())  # the backward sends as much again
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"seconds": statistics.median(times), "waited": statistics.median(waits),
                       "bytes_sent_per_rank": sent}, fh)  # fmt: skip
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, world: int, overlap: bool = True) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(world, _free_port(), args, overlap, out), nprocs=world,
                           start_method="spawn")  # fmt: skip
        with open(out) as fh:
            result = json.load(fh)
    tokens = args.tokens * world
    per_token = 4 * args.top_k * (1 - 1 / world) * args.d_model * 4
    return {"processes": world, "overlap": overlap, "tokens_per_step": tokens, "seconds_per_step": result["seconds"],
            "exposed_comm_s": result["waited"], "tokens_per_s": tokens / result["seconds"],
            "bytes_sent_per_rank": result["bytes_sent_per_rank"],
            "formula_bytes_per_rank": per_token * args.tokens}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per process per step")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--shared", type=int, default=2, help="shared experts (what overlap computes during the dispatch)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4], help="process counts to run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    for world in args.world:
        rows += [run(args, world, overlap=True)] + ([run(args, world, overlap=False)] if world > 1 else [])
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    base = rows[0]["tokens_per_s"]
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {args.tokens} tokens/process, d {args.d_model}, "
          f"{args.experts} experts of {args.hidden}, top-{args.top_k}, {args.shared} shared, float32, "
          "1 thread per process")  # fmt: skip
    print("| processes | overlap | tokens/s | vs first row | s/step | exposed comm s/step | share of step | "
          "MB sent per rank per step (measured / formula) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        overlap = "-" if r["processes"] == 1 else ("on" if r["overlap"] else "off")
        print(f"| {r['processes']} | {overlap} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['seconds_per_step']:.3f} | {r['exposed_comm_s']:.3f} | "
              f"{r['exposed_comm_s'] / r['seconds_per_step']:.0%} | {r['bytes_sent_per_rank'] / 1e6:.1f} / "
              f"{r['formula_bytes_per_rank'] / 1e6:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
