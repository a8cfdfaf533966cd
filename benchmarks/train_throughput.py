"""Training throughput of a moeformer DecoderLM (AdamW, cross entropy) and its model FLOPs utilisation.

    python benchmarks/train_throughput.py [--ffn dense|topk|deepseek] [--precision float32|bf16]
                                          [--d-model 512] [--layers 6] [--heads 8] [--seq 256]
                                          [--batch 8] [--vocab 8192] [--d-ff N] [--steps 10]
                                          [--warmup 4] [--retry-disturbed] [--glibc-malloc]
                                          [--fused-adamw] [--compile [--vs-eager]] [--json]
                                          [--experts N --top-k K --expert-hidden H [--shared S]]

One optimiser step = forward, ``smoothed_cross_entropy`` (eps 0) + the MoE auxiliary loss,
backward, ``AdamW.step`` (``moeformer.train.optim.build_optimizer``) and ``zero_grad``, on random
tokens; ``--precision bf16`` runs forward and loss under CPU/CUDA autocast (bfloat16), as the
trainer does. ``--fused-adamw`` builds the same parameter groups into ``torch.optim.AdamW(fused=True)``
instead, to measure what the optimiser implementation costs.

Steps are timed after ``--warmup`` steps (4: with freed memory kept, the default, the allocator stops
faulting in new pages after 3-4 steps; page faults per step are printed). On a shared machine,
a step whose process got less than 90% of its threads' CPU time was slowed by other processes;
such steps are counted apart, and ``--retry-disturbed`` runs more until ``--steps`` were not.

Model FLOPs per token (PaLM appendix B; nanoGPT's ``estimate_mfu``): 6 N + 12 L T d, with N the
parameters that take part in a matrix product for that token (attention projections, the FFN,
the output projection, routers; embeddings excluded) and, for MoE layers, only the ACTIVE
experts: top_k routed + shared. 12 L T d is the attention score and value products, counted
over the full T x T square as the convention does (a causal kernel does about half of it).

Utilisation (MFU) = achieved model FLOP/s / the matrix-product rate measured in the same run:
``F.linear`` on this model's forward GEMM shapes (batch * seq rows; q/k/v/o, gate/up, down,
output projection, all at the dense model's sizes whatever ``--ffn`` is, so that utilisations
compare across FFN kinds), best of ``--steps`` each, weighted by how many FLOPs each shape does
per forward. Both float32 and bf16 rates are measured in every run; a run's MFU is against the
rate of its own precision. The timed training steps and the matrix products run round robin,
so a change in the machine's load hits both alike.

FFN variants at equal active FLOPs (F = ``--d-ff``, default the SwiGLU hidden size with the
parameters of a 4d GELU MLP, 8d/3 rounded to a multiple of 64: 1344 for d 512):
- ``dense``: SwiGLU of hidden F;
- ``topk``: 8 SwiGLU experts of F/2, top-2 (Mixtral-style routing); 4x the dense FFN's weights;
- ``deepseek``: DeepSeekMoE's segmentation (``moeformer.moe.segment_experts``) of that top-2 of 8
  layer with granularity 4 and 1 shared expert: 31 routed experts of F/8, top-7, plus 1 shared
  expert of F/8; same total and active parameters as ``topk``.
``--experts N --top-k K --expert-hidden H [--shared S]`` replace that layout with N routed experts
of hidden H, top-K (+ S shared experts of H, ``deepseek`` only), e.g. a DeepSeek-V2-Lite-like
FFN on a GPU: ``--ffn deepseek --experts 64 --top-k 6 --expert-hidden 1408 --shared 2``.

``--compile`` runs the model's forward and backward through ``torch.compile`` (inductor, with
``moeformer.compiled.CompiledModel``, as ``train.compile`` does); the compile time reported is
the first warm-up step's time minus the median timed step. ``--vs-eager`` also times eager steps
of the same model and optimiser, alternating with the compiled ones, and reports the ratio: on a
shared machine a ratio from one process is steadier than two runs' numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Gemm:
    name: str
    rows: int
    k: int  # in features
    n: int  # out features
    count: int  # how many of these one forward does

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.k * self.n


def default_d_ff(d_model: int) -> int:
    """SwiGLU hidden size with the weights of a 4d GELU MLP (3 d H = 8 d^2), to a multiple of 64."""
    return max(64, round(8 * d_model / 3 / 64) * 64)


def moe_settings(ffn: str, d_ff: int, args: argparse.Namespace) -> dict | None:
    from moeformer.moe import segment_experts

    custom = {"n_experts": args.experts, "top_k": args.top_k, "expert_hidden": args.expert_hidden}
    given = [k for k, v in custom.items() if v is not None]
    if ffn == "dense":
        if given or args.shared is not None:
            raise SystemExit("--experts/--top-k/--expert-hidden/--shared need --ffn topk or deepseek")
        return None
    if given and len(given) < 3:
        raise SystemExit("a custom MoE FFN needs all of --experts, --top-k and --expert-hidden")
    if args.shared and ffn != "deepseek":
        raise SystemExit("--shared needs --ffn deepseek")
    if given:
        return {"kind": ffn, **custom, "n_shared": args.shared or 0}
    if d_ff % 8:
        raise SystemExit(f"--d-ff must be divisible by 8 for the MoE variants, got {d_ff}")
    if ffn == "topk":
        return {"kind": "topk", "n_experts": 8, "top_k": 2, "expert_hidden": d_ff // 2}
    seg = segment_experts(n_experts=8, top_k=2, d_ff=d_ff // 2, granularity=4, n_shared=1)
    return {"kind": "deepseek", **seg}


def describe_ffn(ffn: str, d_ff: int, moe: dict | None) -> str:
    if moe is None:
        return f"dense SwiGLU d_ff {d_ff}"
    if moe["kind"] == "topk" or not moe.get("n_shared"):
        return f"{moe['kind']}: {moe['n_experts']} SwiGLU experts of {moe['expert_hidden']}, top-{moe['top_k']}"
    return (
        f"deepseek: {moe['n_experts']} routed SwiGLU experts of {moe['expert_hidden']}, top-{moe['top_k']}, "
        f"+{moe['n_shared']} shared of {moe['expert_hidden']}"
    )


def build(args: argparse.Namespace, moe: dict | None) -> nn.Module:
    from moeformer import build_model, preset

    overrides = dict(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        attention={"n_heads": args.heads, "n_kv_heads": args.heads},
        ffn={"d_ff": args.d_ff},
        max_seq_len=args.seq,
    )
    if moe is not None:
        overrides["moe"] = moe
    return build_model(preset("lm-small", **overrides))


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(parameters in matrix products per token, all of them), MoE experts counted top_k / E."""
    from moeformer.moe import MoELayer

    active = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):  # attention, dense and shared FFNs, output projection
            active += module.weight.numel()
        elif isinstance(module, MoELayer):
            experts = module.experts
            per_all = experts.first_weight.numel() + experts.down_proj.numel()
            active += per_all * module.router.top_k // module.router.n_experts
            active += module.router.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return active, total


def model_gemms(args: argparse.Namespace) -> list[Gemm]:
    """The dense model's forward GEMMs: the shapes the matrix rate is measured on."""
    rows, d, L = args.batch * args.seq, args.d_model, args.layers
    return [
        Gemm(f"q/k/v/o {rows}x{d}->{d}", rows, d, d, 4 * L),
        Gemm(f"gate/up {rows}x{d}->{args.d_ff}", rows, d, args.d_ff, 2 * L),
        Gemm(f"down {rows}x{args.d_ff}->{d}", rows, args.d_ff, d, L),
        Gemm(f"lm_head {rows}x{d}->{args.vocab}", rows, d, args.vocab, 1),
    ]


def expert_gemms(args: argparse.Namespace, moe: dict | None) -> list[Gemm]:
    """One expert's forward GEMMs at the average load (informational: how fast experts' sizes run)."""
    if moe is None:
        return []
    rows = round(args.batch * args.seq * moe["top_k"] / moe["n_experts"])
    d, h, L = args.d_model, moe["expert_hidden"], args.layers
    return [
        Gemm(f"expert gate_up {rows}x{d}->{2 * h}", rows, d, 2 * h, moe["n_experts"] * L),
        Gemm(f"expert down {rows}x{h}->{d}", rows, h, d, moe["n_experts"] * L),
    ]


class MatmulProbe:
    """``F.linear(x, w)`` on fixed operands, one call per ``run``; keeps every time."""

    def __init__(self, gemm: Gemm, dtype: torch.dtype, device: str) -> None:
        self.gemm, self.dtype, self.device = gemm, dtype, device
        self.x = torch.randn(gemm.rows, gemm.k, dtype=dtype, device=device)
        self.w = torch.randn(gemm.n, gemm.k, dtype=dtype, device=device) * gemm.k**-0.5
        self.times: list[float] = []

    def run(self) -> None:
        # On a GPU one product of these shapes takes microseconds, less than a launch and a sync
        # cost: time a burst of launches and keep the mean, or the rate reads far too low.
        reps = 20 if self.device == "cuda" else 1
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(reps):
            F.linear(self.x, self.w)
        _sync(self.device)
        self.times.append((time.perf_counter() - start) / reps)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def rate(self) -> float:
        return self.gemm.flops / self.best


def mix_rate(probes: list[MatmulProbe]) -> float:
    """FLOP/s of one forward's GEMMs at each shape's best time: sum(count * flops) / sum(count * time)."""
    flops = sum(p.gemm.count * p.gemm.flops for p in probes)
    return flops / sum(p.gemm.count * p.best for p in probes)


# A step whose process got less CPU time than this share of wall time x threads was slowed by
# other processes on the machine (undisturbed steps measure 0.97-1.00 here: OpenMP threads spin).
CLEAN_SHARE = 0.9


def _page_faults() -> int:
    """Minor + major page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-ff", type=int, default=None, help="dense SwiGLU hidden F (default: 8d/3 to 64)")
    parser.add_argument("--ffn", default="dense", choices=["dense", "topk", "deepseek"])
    parser.add_argument("--experts", type=int, default=None, help="custom MoE FFN: routed experts N")
    parser.add_argument("--top-k", type=int, default=None, help="custom MoE FFN: experts per token K")
    parser.add_argument("--expert-hidden", type=int, default=None, help="custom MoE FFN: each expert's hidden H")
    parser.add_argument("--shared", type=int, default=None, help="custom deepseek FFN: shared experts S of H")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    parser.add_argument("--vs-eager", action="store_true", help="with --compile: alternate eager steps, report ratio")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--fused-adamw",
        action="store_true",
        help="torch.optim.AdamW(fused=True) on build_optimizer's parameter groups instead of build_optimizer",
    )
    parser.add_argument(
        "--retry-disturbed",
        action="store_true",
        help="on a shared CPU, keep stepping (up to 3x --steps) until --steps steps ran undisturbed",
    )
    parser.add_argument("--precision", default="float32", choices=["float32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    malloc = parser.add_mutually_exclusive_group()
    malloc.add_argument(
        "--glibc-malloc", action="store_true", help="leave glibc's default mmap/trim thresholds (freed memory unmapped)"
    )
    malloc.add_argument(
        "--keep-freed-memory", action="store_true", help="the default since 2026-11-27; kept for old commands"
    )
    args = parser.parse_args()
    if args.vs_eager and not args.compile:
        raise SystemExit("--vs-eager compares with --compile; add --compile")
    if args.compile and args.warmup < 1:
        raise SystemExit("--compile needs --warmup >= 1: the first step compiles")
    wall_start = time.perf_counter()
    tuned = False
    if not args.glibc_malloc:  # as moeformer's commands do (moeformer.runtime)
        from moeformer.runtime import keep_freed_memory

        tuned = keep_freed_memory()
    if args.d_ff is None:
        args.d_ff = default_d_ff(args.d_model)

    from moeformer.compiled import CompiledModel
    from moeformer.train.loss import smoothed_cross_entropy
    from moeformer.train.optim import build_optimizer, parameter_groups

    torch.manual_seed(0)
    moe = moe_settings(args.ffn, args.d_ff, args)
    model = build(args, moe).to(args.device).train()
    compiled = CompiledModel(model) if args.compile else model  # same parameters: one optimiser for both
    adamw = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    if args.fused_adamw:
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), fused=True, **adamw)
    else:
        optimizer = build_optimizer(model, weight_decay=0.1, **adamw)
    active, total = matmul_params(model)
    tokens_per_step = args.batch * args.seq
    flops_per_token = 6 * active + 12 * args.layers * args.seq * args.d_model
    flops_per_step = flops_per_token * tokens_per_step

    def autocast() -> contextlib.AbstractContextManager:
        if args.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, args.vocab, (args.batch, args.seq + 1), device=args.device)  # 0 is padding
        return ids[:, :-1], ids[:, 1:]

    losses: list[float] = []

    def train_step(tokens: torch.Tensor, target: torch.Tensor, eager: bool = False) -> tuple[float, float, int]:
        """(wall seconds, CPU seconds of this process, page faults) of one optimiser step."""
        _sync(args.device)
        faults = _page_faults()
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast():
            out = (model if eager else compiled)(tokens)
            loss, _ = smoothed_cross_entropy(out.logits, target, pad_id=0, eps=0.0)
            total_loss = loss + out.aux_loss
        total_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a host sync, as the trainer's logging does
        _sync(args.device)
        return time.perf_counter() - start, time.process_time() - cpu_start, _page_faults() - faults

    dtypes = {"float32": torch.float32, "bf16": torch.bfloat16}
    gemms, experts = model_gemms(args), expert_gemms(args, moe)
    probes = {p: [MatmulProbe(g, dt, args.device) for g in gemms] for p, dt in dtypes.items()}
    expert_probes = {p: [MatmulProbe(g, dt, args.device) for g in experts] for p, dt in dtypes.items()}
    every_probe = [probe for group in (probes, expert_probes) for ps in group.values() for probe in ps]

    print(
        f"train_throughput: ffn {args.ffn}, {args.precision}, {total / 1e6:.1f}M params, "
        f"{args.warmup} warm-up + {args.steps} steps ...",
        file=sys.stderr,
    )
    warmup_times: list[float] = []
    for i in range(args.warmup):
        wall_s, _, faults = train_step(*batch())
        warmup_times.append(wall_s)
        print(f"  warm-up {i + 1}: {wall_s * 1e3:.0f} ms, {faults} page faults", file=sys.stderr)
        if args.vs_eager:
            train_step(*batch(), eager=True)
        for probe in every_probe:
            probe.run()
    for probe in every_probe:
        probe.times.clear()
    threads = torch.get_num_threads()
    step_times: list[float] = []
    cpu_share: list[float] = []  # CPU time / (wall * threads); see CLEAN_SHARE
    step_faults: list[int] = []  # page faults: memory mapped and zeroed afresh during the step
    eager_times: list[float] = []  # --vs-eager: the eager step that follows each compiled one
    eager_share: list[float] = []
    limit = 3 * args.steps if args.retry_disturbed else args.steps
    while len(step_times) < limit:  # round robin: one training step, then every matrix product once
        wall_s, cpu_s, faults = train_step(*batch())
        step_times.append(wall_s)
        step_faults.append(faults)
        cpu_share.append(cpu_s / (wall_s * threads) if args.device == "cpu" else 1.0)
        if args.vs_eager:
            wall_e, cpu_e, _ = train_step(*batch(), eager=True)
            eager_times.append(wall_e)
            eager_share.append(cpu_e / (wall_e * threads) if args.device == "cpu" else 1.0)
            print(f"  eager step {len(eager_times)}: {wall_e * 1e3:.0f} ms, cpu share {eager_share[-1]:.2f}",
                  file=sys.stderr)  # fmt: skip
        for probe in every_probe:
            probe.run()
        clean = [t for t, c in zip(step_times, cpu_share) if c >= CLEAN_SHARE]
        print(
            f"  step {len(step_times)}: {wall_s * 1e3:.0f} ms, cpu share {cpu_share[-1]:.2f} "
            f"({len(clean)} undisturbed), {faults} page faults",
            file=sys.stderr,
        )
        if len(step_times) >= args.steps and (not args.retry_disturbed or len(clean) >= args.steps):
            break

    rates = {p: mix_rate(ps) for p, ps in probes.items()}
    expert_rates = {p: mix_rate(ps) for p, ps in expert_probes.items()} if experts else {}
    # Headline: the median of the undisturbed steps. The best step is the same statistic as the
    # best-of-N matrix rate; the median of every step shows what the machine's load did.
    stats = {"best": min(step_times), "all": statistics.median(step_times)}
    if clean:
        stats["undisturbed"] = statistics.median(clean)
    headline = "undisturbed" if clean else "all"
    rate = rates[args.precision]
    compile_s = warmup_times[0] - stats[headline] if args.compile else None
    eager = {}
    if eager_times:  # the same statistic as the headline, on the eager steps
        clean_eager = [t for t, c in zip(eager_times, eager_share) if c >= CLEAN_SHARE]
        eager_step = statistics.median(clean_eager if headline == "undisturbed" and clean_eager else eager_times)
        # each compiled step and the eager step right after it saw about the same load
        pairs = sorted(e / c for c, e in zip(step_times, eager_times))
        eager = {"eager_step_ms": eager_step * 1e3, "eager_tokens_per_s": tokens_per_step / eager_step,
                 "compiled_over_eager_tokens_per_s": eager_step / stats[headline],
                 "pair_ratio_median": statistics.median(pairs), "pair_ratio_range": [pairs[0], pairs[-1]],
                 "eager_steps_ms": [t * 1e3 for t in eager_times], "eager_cpu_share": eager_share}  # fmt: skip
    wall = time.perf_counter() - wall_start
    result = {
        "ffn": args.ffn,
        "ffn_detail": describe_ffn(args.ffn, args.d_ff, moe),
        "precision": args.precision,
        "device": args.device,
        "d_model": args.d_model,
        "layers": args.layers,
        "heads": args.heads,
        "seq": args.seq,
        "batch": args.batch,
        "vocab": args.vocab,
        "d_ff": args.d_ff,
        "moe": moe,
        "params_total": total,
        "params_active_matmul": active,
        "flops_per_token": flops_per_token,
        "flops_per_step": flops_per_step,
        "warmup": args.warmup,
        "optimizer": "AdamW fused=True" if args.fused_adamw else "build_optimizer (AdamW default)",
        "compile": args.compile,
        "first_step_ms": warmup_times[0] * 1e3 if warmup_times else None,
        "compile_s": compile_s,
        **eager,
        "step_ms": [t * 1e3 for t in step_times],
        "step_cpu_share": cpu_share,
        "step_page_faults": step_faults,
        "undisturbed_steps": len(clean),
        "headline": headline,
        "step_ms_stats": {k: v * 1e3 for k, v in stats.items()},
        "tokens_per_s": tokens_per_step / stats[headline],
        "achieved_gflops": flops_per_step / stats[headline] / 1e9,
        "mfu": flops_per_step / stats[headline] / rate,
        "mfu_stats": {k: flops_per_step / v / rate for k, v in stats.items()},
        "matmul_gflops": {p: r / 1e9 for p, r in rates.items()},
        "bf16_over_float32_matmul": rates["bf16"] / rates["float32"],
        "expert_matmul_gflops": {p: r / 1e9 for p, r in expert_rates.items()},
        "matmul_shapes_gflops": {
            p: {probe.gemm.name: probe.rate / 1e9 for probe in ps + expert_probes[p]} for p, ps in probes.items()
        },
        "loss_first_last": [losses[0], losses[-1]],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": threads,
        "malloc": "freed memory kept" if tuned else "glibc default",
        "wall_s": wall,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    header = (
        f"DecoderLM training step (fwd + bwd + AdamW), {args.device}: d_model {args.d_model}, {args.layers} layers, "
        f"{args.heads} heads, seq {args.seq}, batch {args.batch} ({tokens_per_step} tokens/step), vocab {args.vocab}; "
        f"FFN {result['ffn_detail']}; {total / 1e6:.1f}M params, {active / 1e6:.1f}M active in matmuls; "
        f"model FLOPs 6N + 12LTd = {flops_per_token / 1e6:.1f} M/token; precision {args.precision}; "
        f"optimiser {result['optimizer']}; {'torch.compile (inductor)' if args.compile else 'eager'}; "
        f"{len(step_times)} timed steps ({len(clean)} undisturbed) after {args.warmup} warm-up; "
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, {threads} threads; "
        f"malloc: {result['malloc']}; run took {wall:.0f} s"
    )
    p, n = args.precision, len(step_times)
    kind = f"{args.ffn}, {p}{', compiled' if args.compile else ''}"
    lines = [
        header,
        "",
        "| measurement | ms | GFLOP | GFLOP/s | tokens/s | utilisation |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "undisturbed": f"median of {len(clean)} undisturbed",
        "best": f"best of {n}",
        "all": f"median of all {n}",
    }
    for key in ("undisturbed", "best", "all"):
        if key not in stats:
            continue
        t = stats[key]
        mfu = f"MFU {flops_per_step / t / rate:.1%}"
        lines.append(
            f"| training step, {kind}: {labels[key]} | {t * 1e3:.1f} | {flops_per_step / 1e9:.1f} "
            f"| {flops_per_step / t / 1e9:.1f} | {tokens_per_step / t:.0f} "
            f"| {f'**{mfu}**' if key == headline else mfu} of the {p} matmul rate |"
        )
    if eager:
        t = eager["eager_step_ms"] / 1e3
        lines.append(
            f"| training step, {args.ffn}, {p}, eager (alternating): {labels[headline]} | {t * 1e3:.1f} "
            f"| {flops_per_step / 1e9:.1f} | {flops_per_step / t / 1e9:.1f} | {tokens_per_step / t:.0f} "
            f"| compiled / eager tokens/s: **{eager['compiled_over_eager_tokens_per_s']:.2f}x**; "
            f"step pairs: median {eager['pair_ratio_median']:.2f}x, {eager['pair_ratio_range'][0]:.2f}-"
            f"{eager['pair_ratio_range'][1]:.2f}x |"
        )
    if compile_s is not None:
        lines.append(f"| compile: first step {warmup_times[0]:.1f} s - median step | {compile_s * 1e3:.0f} | | | | |")
    for name in dtypes:
        ps = probes[name]
        ms = sum(q.gemm.count * q.best for q in ps) * 1e3
        gflop = sum(q.gemm.count * q.gemm.flops for q in ps) / 1e9
        note = "1.00x" if name == "float32" else f"{rates[name] / rates['float32']:.2f}x float32"
        lines.append(
            f"| matmul rate {name}: model's forward GEMMs, best of {n} | {ms:.1f} | {gflop:.1f} "
            f"| {rates[name] / 1e9:.1f} | | {note} |"
        )
    for name, r in expert_rates.items():
        lines.append(
            f"| expert-sized GEMMs {name} ({experts[0].rows} rows), best of {n} | | | {r / 1e9:.1f} "
            f"| | {r / rates[name]:.2f}x the {name} matmul rate |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
