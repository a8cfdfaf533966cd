"""The matrix products of one decoding step, in each layout ``prepare_for_decoding`` can choose.

    python benchmarks/decode_layouts.py [--threads 1] [--repeats 7] [--append BENCHMARKS.md]

Two tables from one run. (1) us per product for lm-small's weight shapes at 1 and 8 rows, per
kernel of ``moeformer.decode.prepared.KERNELS`` (``PreparedLinear``), plus MKL's packed GEMM
(what inductor's freezing uses for float32; not a candidate, for comparison). (2) ms per decoding
step for the routed experts of the DeepSeekMoE lm-small (31 of 128, top-7, 6 layers) per kernel of
``EXPERT_KERNELS``, at 1 and 8 tokens, on a random routing. Weights are cold, as in a decoding
step: each call takes the next of 30 weights (tables 1) or the next layer's experts (table 2), so
they come from memory rather than cache. Kernels are timed round robin, median of ``--repeats``
passes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from markdown_log import append_table
from torch import nn

from moeformer.decode.prepared import EXPERT_KERNELS, PreparedLinear, available_kernels, prepared_experts
from moeformer.moe.experts import Experts

SHAPES = [(1024, 384), (384, 1024), (384, 384), (128, 384), (8192, 384)]
COPIES = 30


def _calls(fns: list[Callable], *args: object) -> Callable[[], list]:
    """One pass: each of ``fns`` called on ``args`` (a new weight each call: cold, as in decoding)."""
    return lambda: [fn(*args) for fn in fns]


def _medians(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _mkl_packed(weight: torch.Tensor, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, batch)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, None, batch)


def linear_rows(repeats: int) -> list[str]:
    rows = []
    for out_f, in_f in SHAPES:
        linears = [nn.Linear(in_f, out_f, bias=False) for _ in range(COPIES)]
        for batch in (1, 8):
            x = torch.randn(batch, in_f)
            candidates = {}
            for kernel in available_kernels(linears[0].weight):
                candidates[kernel] = _calls([PreparedLinear(m, kernel, batch) for m in linears], x)
            if torch.backends.mkl.is_available():
                mkl = [_mkl_packed(m.weight.detach(), batch) for m in linears]
                candidates["MKL packed"] = _calls(mkl, x)
            us = {k: v / COPIES * 1e6 for k, v in _medians(candidates, repeats).items()}
            best = min(us, key=us.__getitem__)
            cells = " | ".join(f"{us[k]:.0f}" if k in us else "-" for k in ("linear", "transposed", "onednn"))
            rows.append(f"| {out_f} x {in_f} | {batch} | {cells} | {us.get('MKL packed', float('nan')):.0f} | {best} |")
    return rows


def expert_rows(repeats: int) -> list[str]:
    torch.manual_seed(0)
    layers = [Experts(31, 384, 128) for _ in range(6)]
    rows = []
    for tokens in (1, 8):
        x = torch.randn(tokens, 384)
        index = torch.rand(tokens, 31).argsort(-1)[:, :7]
        weights = torch.rand(tokens, 7)
        candidates = {}
        for kernel in EXPERT_KERNELS:
            candidates[kernel] = _calls([prepared_experts(e, kernel, tokens) for e in layers], x, index, weights)
        ms = {k: v * 1e3 for k, v in _medians(candidates, repeats).items()}
        best = min(ms, key=ms.__getitem__)
        rows.append(f"| {tokens} | " + " | ".join(f"{ms[k]:.2f}" for k in EXPERT_KERNELS) + f" | {best} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--append", help="append the tables to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (
        f"Decoding products, float32, weights cold; torch {torch.__version__}, python "
        f"{platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(header, file=sys.stderr)
    with torch.no_grad():
        lines = [header, "", "us per product:", "",
                 "| weight (out x in) | rows | linear | transposed | onednn | MKL packed | fastest |",
                 "|---|---|---|---|---|---|---|", *linear_rows(args.repeats), "",
                 "Routed experts (31 of 128, top-7), 6 layers, ms per step:", "",
                 "| tokens | " + " | ".join(EXPERT_KERNELS) + " | fastest |",
                 "|---|" + "---|" * (len(EXPERT_KERNELS) + 1), *expert_rows(args.repeats)]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.append:
        append_table(args.append, table)


if __name__ == "__main__":
    main()
