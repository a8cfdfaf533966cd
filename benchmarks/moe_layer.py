"""MoE layer forward+backward: moeformer's kinds and kernels vs transformers vs the dense floor.

    python benchmarks/moe_layer.py [--tokens 4096] [--d-model 512] [--experts 64] [--hidden 256]
                                   [--top-k 6] [--device cpu|cuda] [--dtype float32|bfloat16]
                                   [--rows all|gpu] [--glibc-malloc] [--json] [--append BENCHMARKS.md]

All rows run in one process on the same input and, where the architectures match, the same
weights; their steps are timed round robin (median of ``--repeats``), so a change in the
machine's load hits every row alike. Memory is what autograd saves for backward in one forward
(weights and input excluded): deterministic, unlike an RSS reading. The floor is a dense SwiGLU FFN whose hidden size is
top_k * hidden (+ shared experts): the same active FLOPs as the MoE without any routing. Ratios
to the floor are what to read; absolute times move with the machine's load.

On CPU, freed memory is kept for reuse (``moeformer.runtime.keep_freed_memory``, as training
and the demo do): with glibc's default malloc every step maps, faults in and zeroes its 50 MB
temporaries afresh; ``--glibc-malloc`` measures that default. ``--rows gpu`` keeps the rows worth
timing on an accelerator (``benchmarks/gpu_check.sh``): the floors, the sparse kernels, DeepSeek's
shared experts and transformers' grouped_mm.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from markdown_log import append_table


@dataclass
class Shape:
    tokens: int
    d_model: int
    experts: int
    hidden: int
    top_k: int
    device: str
    dtype: str
    repeats: int


def _build(row: str, s: Shape) -> torch.nn.Module:
    from moeformer.moe import build_moe

    common = dict(d_model=s.d_model, n_experts=s.experts, top_k=s.top_k, expert_hidden=s.hidden)
    if row == "dense floor":
        return build_moe(kind="dense", d_model=s.d_model, expert_hidden=s.top_k * s.hidden)
    if row == "dense floor (+2 shared)":
        return build_moe(kind="dense", d_model=s.d_model, expert_hidden=(s.top_k + 2) * s.hidden)
    if row == "moeformer topk capacity 1.25":
        return build_moe(kind="topk", capacity_factor=1.25, **common)
    if row.startswith("moeformer topk ["):
        backend = row.split("[")[1].rstrip("]")
        return build_moe(kind="topk", backend=backend, **common)
    if row == "moeformer deepseek V3 routing":
        return build_moe(kind="deepseek", score="sigmoid", n_group=8, topk_group=4, routed_scaling=2.5, **common)
    if row == "dense floor (soft: 8 experts)":
        return build_moe(kind="dense", d_model=s.d_model, expert_hidden=8 * s.hidden)
    if row == "moeformer soft [8 experts, all active]":
        return build_moe(kind="soft", d_model=s.d_model, n_experts=8, top_k=1, expert_hidden=s.hidden)
    if row == "moeformer deepseek +2 shared":
        return build_moe(kind="deepseek", n_shared=2, **common)
    if row.startswith("transformers Mixtral"):
        return _mixtral(row.split("[")[1].rstrip("]"), s)
    raise ValueError(row)


def _mixtral(implementation: str, s: Shape) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=s.d_model,
        intermediate_size=s.hidden,
        num_local_experts=s.experts,
        num_experts_per_tok=s.top_k,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=s.d_model**-0.5)
    return block


def _step_fn(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        out = layer(x)
        out = out.output if hasattr(out, "output") else out
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    return step


def _timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _saved_activation_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward, weights and input excluded.

    Deterministic, unlike the RSS high-water mark: the activation memory the layer costs.
    """
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    del out
    return sum(seen.values())


GPU_ROWS = [
    "dense floor",
    "moeformer topk [auto]",
    "moeformer topk [loop]",
    "moeformer topk [grouped_mm]",
    "moeformer deepseek V3 routing",
    "transformers Mixtral [grouped_mm]",
    "dense floor (+2 shared)",
    "moeformer deepseek +2 shared",
]


def _profile(step, device: str) -> str:
    """The 12 operators with the most self time (device time on CUDA) in one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60)


ROWS = [
    "dense floor",
    "moeformer topk [auto]",
    "moeformer topk [loop]",
    "moeformer topk [bmm]",
    "moeformer topk [grouped_mm]",
    "moeformer topk capacity 1.25",
    "moeformer deepseek V3 routing",
    "transformers Mixtral [grouped_mm]",
    "transformers Mixtral [eager]",
    "transformers Mixtral [batched_mm]",
    "dense floor (+2 shared)",
    "moeformer deepseek +2 shared",
    "dense floor (soft: 8 experts)",
    "moeformer soft [8 experts, all active]",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=20.0,
        help="skip rows whose estimated memory exceeds this (transformers' batched_mm)",
    )
    parser.add_argument("--rows", default="all", choices=["all", "gpu"], help="every row, or the accelerator subset")
    parser.add_argument(
        "--profile", action="store_true", help="after timing, print each row's top operators (torch.profiler) on stderr"
    )
    parser.add_argument("--append", help="append the table to this Markdown file")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    malloc = parser.add_mutually_exclusive_group()
    malloc.add_argument(
        "--glibc-malloc", action="store_true", help="leave glibc's default mmap/trim thresholds (freed memory unmapped)"
    )
    malloc.add_argument(
        "--keep-freed-memory", action="store_true", help="the default since 2026-11-27; kept for old commands"
    )
    args = parser.parse_args()
    tuned = False
    if not args.glibc_malloc:
        from moeformer.runtime import keep_freed_memory

        tuned = keep_freed_memory()
    s = Shape(args.tokens, args.d_model, args.experts, args.hidden, args.top_k, args.device, args.dtype, args.repeats)
    import transformers

    header = (
        f"MoE layer fwd+bwd: {s.tokens} tokens, d_model {s.d_model}, {s.experts} SwiGLU experts of hidden "
        f"{s.hidden}, top-{s.top_k}, {s.dtype}, {s.device}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads; malloc: {'freed memory kept' if tuned else 'glibc default'}"
    )
    lines = [
        header,
        "",
        "| layer | ms (median) | us/token | vs floor | saved activations MiB | vs floor |",
        "|---|---|---|---|---|---|",
    ]
    print(header, file=sys.stderr)
    torch.manual_seed(0)
    dtype = getattr(torch, s.dtype)
    x = torch.randn(1, s.tokens, s.d_model, device=s.device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    # batched_mm gathers one weight matrix per (token, slot): tokens * k * 3 * d * h * 4 bytes.
    need_gb = s.tokens * s.top_k * 3 * s.d_model * s.hidden * 4 / 1e9
    layers, steps, saved, skipped = {}, {}, {}, {}
    rows = GPU_ROWS if args.rows == "gpu" else ROWS
    for row in rows:
        if row.endswith("[batched_mm]") and need_gb > args.memory_budget_gb:
            skipped[row] = f"skipped: needs ~{need_gb:.0f} GB for per-token weight copies"
            continue
        torch.manual_seed(0)  # same weights for rows of the same architecture
        try:
            layers[row] = _build(row, s).to(s.device, dtype)
            steps[row] = _step_fn(layers[row], x, grad)
            steps[row]()  # warm-up
            saved[row] = _saved_activation_bytes(layers[row], x) / 2**20
        except (RuntimeError, NotImplementedError, ImportError, ValueError) as err:
            if row.startswith("dense floor"):
                raise
            # e.g. a kernel this device or this transformers lacks: the other rows still count
            skipped[row] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            layers.pop(row, None), steps.pop(row, None)
    times: dict[str, list[float]] = {row: [] for row in steps}
    for _ in range(s.repeats):  # round robin, so drifts in machine load hit every row alike
        for row, step in steps.items():
            times[row].append(_timed(step, s.device))
    if args.profile:
        for row, step in steps.items():
            print(f"\n{row}: top operators of one fwd+bwd step\n{_profile(step, s.device)}", file=sys.stderr)
    floor: tuple[float, float] | None = None
    results = []
    for row in rows:
        if row in skipped:
            lines.append(f"| {row} | {skipped[row]} | | | | |")
            results.append({"layer": row, "skipped": skipped[row]})
            continue
        t = statistics.median(times[row])
        if row.startswith("dense floor"):
            floor = (t, saved[row])
        results.append(
            {
                "layer": row,
                "ms": t * 1e3,
                "vs_floor": t / floor[0],
                "saved_mib": saved[row],
                "saved_vs_floor": saved[row] / floor[1],
            }
        )
        lines.append(
            f"| {row} | {t * 1e3:.1f} | {t * 1e6 / s.tokens:.1f} | {t / floor[0]:.2f}x | "
            f"{saved[row]:.0f} | {saved[row] / floor[1]:.2f}x |"
        )
    table = "\n".join(lines)
    if args.json:
        print(json.dumps({"header": header, "rows": results}, indent=1))
        return
    print(table)
    if args.append:
        append_table(args.append, table)


if __name__ == "__main__":
    main()
