"""Everything worth checking when a GPU is lent, in one command that prints one Markdown table.

    bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]

Stages, each a subprocess with its own time limit (a failing stage is reported, the rest run):
1. ``tests/test_device.py --device cuda``: fused attention vs eq. 1, the KV and latent caches vs
   the full forward, every expert kernel (``grouped_mm`` in bf16 included) vs the reference loop,
   bf16 autocast in the experts, two bf16 training steps (MHA and MLA DeepSeekMoE);
2. ``benchmarks/moe_layer.py --rows gpu`` in bf16 at issue 3's shape (4,096 tokens, d 512, 64
   experts of 256, top-6) and at a DeepSeek-V2-Lite-like shape (d 2048, 64 experts of 1408,
   top-6, 2 shared): ms and ratio to the dense floor, transformers' grouped_mm beside;
3. ``benchmarks/train_throughput.py`` in bf16: a ~125M dense LM and a ~1B-total DeepSeekMoE LM,
   ``torch.compile``d and eager steps alternating in one process: tokens/s, MFU against the bf16
   matrix rate measured in the same run, compile time.

``--dry-run`` runs every stage on the CPU at toy sizes (CI does, so that the script cannot rot);
its numbers mean nothing. Budget on one H100: under 8 minutes. Stage outputs (JSON, logs) go to
``--out`` (default: a temporary directory), the table to stdout and ``--out``/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    name: str
    argv: list[str]
    timeout_s: float
    json_out: bool = True  # the command prints one JSON object on stdout


@dataclass
class Outcome:
    stage: Stage
    ok: bool
    seconds: float
    payload: dict | None = None
    note: str = ""
    log: list[str] = field(default_factory=list)


def moe_stages(dry: bool, device: str) -> list[Stage]:
    script = [sys.executable, "benchmarks/moe_layer.py", "--device", device, "--rows", "gpu", "--json"]
    if dry:
        tiny = ["--tokens", "64", "--d-model", "32", "--experts", "8", "--hidden", "16", "--top-k", "2"]
        return [Stage("MoE layer (toy)", script + tiny + ["--dtype", "float32", "--repeats", "2"], 120)]
    bf16 = ["--dtype", "bfloat16", "--repeats", "20"]
    issue3 = ["--tokens", "4096", "--d-model", "512", "--experts", "64", "--hidden", "256", "--top-k", "6"]
    v2_lite = ["--tokens", "8192", "--d-model", "2048", "--experts", "64", "--hidden", "1408", "--top-k", "6"]
    return [
        Stage("MoE layer, issue 3 shape", script + issue3 + bf16, 150),
        # --profile: each row's top kernels go to the stage log, to see where the time goes
        Stage("MoE layer, DeepSeek-V2-Lite shape", script + v2_lite + bf16 + ["--profile"], 150),
    ]


def train_stages(dry: bool, device: str) -> list[Stage]:
    """Each stage alternates compiled and eager steps of the same model in one process (--vs-eager)."""
    script = [sys.executable, "benchmarks/train_throughput.py", "--device", device, "--json", "--compile", "--vs-eager"]
    if dry:
        size = ["--d-model", "64", "--layers", "2", "--heads", "4", "--seq", "32", "--batch", "2", "--vocab", "256"]
        runs = ["--precision", "float32", "--steps", "2", "--warmup", "1"]
        moe = ["--ffn", "deepseek", "--experts", "8", "--top-k", "2", "--expert-hidden", "32", "--shared", "1"]
        return [Stage("train DeepSeekMoE (toy)", script + size + runs + moe, 300)]
    # ~125M: GPT-2-small widths with a 32k vocabulary; MoE: the same trunk, 64 routed experts of
    # 512 (top-6) + 2 shared in every layer: ~1.0B parameters, ~0.2B active.
    trunk = ["--d-model", "768", "--layers", "12", "--heads", "12", "--seq", "1024", "--batch", "8", "--vocab", "32000"]
    runs = ["--precision", "bf16", "--steps", "10", "--warmup", "3"]
    dense = ["--ffn", "dense", "--d-ff", "2048"]
    moe = ["--ffn", "deepseek", "--experts", "64", "--top-k", "6", "--expert-hidden", "512", "--shared", "2"]
    return [
        Stage("train ~125M dense", script + trunk + runs + dense, 300),
        Stage("train ~1B DeepSeekMoE", script + trunk + runs + moe, 330),
    ]


def test_stage(device: str) -> Stage:
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_device.py",
        "--device",
        device,
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
    ]
    return Stage(f"tests/test_device.py --device {device}", argv, 300, json_out=False)


def run(stage: Stage, out_dir: Path, index: int) -> Outcome:
    start = time.perf_counter()
    log_path = out_dir / f"stage{index}.log"
    try:
        proc = subprocess.run(stage.argv, cwd=ROOT, capture_output=True, text=True, timeout=stage.timeout_s)
    except subprocess.TimeoutExpired as err:
        log_path.write_text(f"{err.stdout or ''}\n{err.stderr or ''}", encoding="utf-8")
        return Outcome(stage, False, time.perf_counter() - start, note=f"timed out after {stage.timeout_s:.0f} s")
    seconds = time.perf_counter() - start
    log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr, encoding="utf-8")
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    if not stage.json_out:
        summary = lines[-1] if lines else "no output"
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
        return Outcome(stage, proc.returncode == 0, seconds, note=summary.strip("= "), log=failures)
    if proc.returncode != 0:
        tail = " / ".join(line.strip() for line in lines[-3:])
        return Outcome(stage, False, seconds, note=f"exit {proc.returncode}: {tail[:300]}")
    try:
        payload = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return Outcome(stage, False, seconds, note="no JSON on stdout (see the stage log)")
    (out_dir / f"stage{index}.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return Outcome(stage, True, seconds, payload)


def table_rows(outcome: Outcome) -> list[str]:
    """Markdown rows: | check | configuration | result | seconds |."""
    name, secs = outcome.stage.name, f"{outcome.seconds:.0f}"
    if not outcome.ok or outcome.payload is None:
        rows = [f"| {name} | | {'FAILED: ' if not outcome.ok else ''}{outcome.note} | {secs} |"]
        return rows + [f"| | | {line[:200]} | |" for line in outcome.log]
    p = outcome.payload
    if "rows" in p:  # moe_layer.py
        out = []
        for r in p["rows"]:
            if "skipped" in r:
                out.append(f"| {name} | {r['layer']} | {r['skipped']} | |")
            else:
                result = f"{r['ms']:.2f} ms, {r['vs_floor']:.2f}x floor, saved {r['saved_vs_floor']:.2f}x floor"
                out.append(f"| {name} | {r['layer']} | {result} | |")
        out[0] = out[0][: out[0].rfind("| |")] + f"| {secs} |"
        return out
    precision = p["precision"]
    rate = p["matmul_gflops"][precision]
    config = f"{_count(p['params_total'])} params ({_count(p['params_active_matmul'])} active), {precision}"
    result = f"compiled {p['tokens_per_s']:,.0f} tokens/s, MFU {p['mfu']:.1%}"
    if "compiled_over_eager_tokens_per_s" in p:
        ratio = p["compiled_over_eager_tokens_per_s"]
        result += (
            f"; eager {p['eager_tokens_per_s']:,.0f} tokens/s, MFU {p['mfu'] / ratio:.1%}; compiled/eager {ratio:.2f}x"
        )
    result += f"; matmul rate {_rate(rate)} measured; compile {p.get('compile_s', 0):.0f} s"
    result += f"; loss {p['loss_first_last'][0]:.2f} -> {p['loss_first_last'][1]:.2f}"
    return [f"| {name} | {config} | {result} | {secs} |"]


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _rate(gflops: float) -> str:
    return f"{gflops / 1e3:.0f} TFLOP/s" if gflops >= 1e3 else f"{gflops:.0f} GFLOP/s"


def environment() -> str:
    import torch

    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        parts.append("no transformers")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts.insert(0, f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)")
        parts.append(f"CUDA {torch.version.cuda}")
    else:
        parts.insert(0, f"CPU only ({platform.machine()}, {torch.get_num_threads()} threads)")
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at toy sizes (CI)")
    parser.add_argument("--out", help="directory for stage logs, JSON and gpu_check.md (default: a temporary one)")
    parser.add_argument("--only", help="comma-separated stage numbers to run (1 tests, 2 MoE layer, 3 training)")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = {"1": [test_stage(device)], "2": moe_stages(args.dry_run, device), "3": train_stages(args.dry_run, device)}
    wanted = args.only.split(",") if args.only else list(groups)
    stages = [s for key in wanted for s in groups[key]]
    lines = [
        f"GPU check{' (DRY RUN on CPU: toy sizes, the numbers mean nothing)' if args.dry_run else ''}: "
        f"{environment()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| check | configuration | result | s |",
        "|---|---|---|---|",
    ]
    failed = 0
    start = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        print(f"[{i}/{len(stages)}] {stage.name} ...", file=sys.stderr, flush=True)
        outcome = run(stage, out_dir, i)
        failed += not outcome.ok
        print(f"    {'ok' if outcome.ok else 'FAILED'} in {outcome.seconds:.0f} s {outcome.note}", file=sys.stderr)
        lines += table_rows(outcome)
    lines += ["", f"{len(stages) - failed} of {len(stages)} stages passed in {time.perf_counter() - start:.0f} s."]
    table = "\n".join(lines)
    (out_dir / "gpu_check.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"stage logs and JSON: {out_dir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
