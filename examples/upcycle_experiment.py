"""Dense -> MoE upcycling against continuing dense and against training the MoE from scratch.

Komatsuzaki et al. (2022, arXiv 2212.05055) upcycle a trained dense model into a top-2 MoE whose
experts are copies of its FFN and find it beats continued dense training for the same extra
compute, and beats the same MoE trained from scratch unless that gets much more compute;
Qwen1.5-MoE was upcycled fine-grained (the FFN cut into segments, DeepSeekMoE-style). Here, per
seed, on BPE tiny Shakespeare (``configs/shakespeare-bpe-dense.toml``):

    base  dense, N steps
    (a)   dense, continued N more          (train.init_from = base: fresh optimiser and schedule)
    (b)   sparse-upcycled top-2 of 8 copies, N more   (``moeformer upcycle base --to topk``)
    (c)   fine-grained-upcycled DeepSeekMoE, N more   (``--to deepseek --granularity 4 --shared 1``)
    (d)   the top-2 MoE of (b) from scratch, 2N steps
    (e)   the DeepSeekMoE of (c) from scratch, 2N steps

Every continuation restarts its optimiser and cosine schedule (optimiser state is not carried over
by upcycling); budgets are steps. ``python examples/upcycle_experiment.py [--steps N] [--seeds 0 1]
[--jobs 2] [--out runs/upcycle]``; resumable; writes OUT/results.{json,md} and OUT/curves.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from experiment_runs import run_all, save_figure, train_command, wall_seconds  # noqa: E402

from moeformer.publish import write_text  # noqa: E402
from moeformer.train.upcycle import moe_for, moe_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare-bpe-dense.toml"
D_FF = 1024  # the dense config's FFN
UPCYCLED = {
    "topk": {"experts": 8, "top_k": 2},
    "deepseek": {"experts": 8, "top_k": 2, "granularity": 4, "shared": 1},
}
ARMS = {  # name -> (initial weights, MoE kind or None, steps in units of N)
    "a-dense-continued": ("base", None, 1),
    "b-topk-upcycled": ("up-topk", "topk", 1),
    "c-deepseek-upcycled": ("up-deepseek", "deepseek", 1),
    "d-topk-scratch": (None, "topk", 2),
    "e-deepseek-scratch": (None, "deepseek", 2),
}


def _moe_sets(kind: str | None) -> list[str]:
    if kind is None:
        return []
    numbers = UPCYCLED[kind]
    moe = moe_for(kind, D_FF, experts=numbers["experts"], top_k=numbers["top_k"],  # type: ignore[arg-type]
                  granularity=numbers.get("granularity", 1), shared=numbers.get("shared", 0))  # fmt: skip
    return moe_overrides(moe)


def _common(data: Path, seed: int, steps: int) -> list[str]:
    every = max(steps // 8, 1)
    return [f"data.path={data / 'tinyshakespeare' / 'input.txt'}", f"train.seed={seed}", f"train.steps={steps}",
            f"train.eval_every={every}", f"train.warmup_steps={min(100, steps // 10)}"]  # fmt: skip


def upcycle_base(seed_dir: Path, kind: str) -> Path:
    """``moeformer upcycle`` of the base run (kept if already written)."""
    out = seed_dir / f"up-{kind}"
    if (out / "checkpoint.json").exists():
        return out
    numbers = UPCYCLED[kind]
    cmd = [sys.executable, "-m", "moeformer", "upcycle", str(seed_dir / "base"), "--out", str(out), "--to", kind,
           "--experts", str(numbers["experts"]), "--top-k", str(numbers["top_k"]), "--seed", "0"]  # fmt: skip
    if kind == "deepseek":
        cmd += ["--granularity", str(numbers["granularity"]), "--shared", str(numbers["shared"])]
    log = seed_dir / f"up-{kind}.txt"
    log.write_text(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    return out


def read_curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]


def analyse(out: Path, seeds: list[int], steps: int) -> dict[str, Any]:
    results: dict[str, Any] = {"steps_N": steps, "runs": {}}
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        runs = {"base": seed_dir / "base", **{arm: seed_dir / arm for arm in ARMS}}
        for name, run in runs.items():
            if (run / "summary.json").exists():
                curve = read_curve(run)
                results["runs"].setdefault(name, {})[seed] = {
                    "curve": curve, "best_valid": min(v for _, v in curve), "final_valid": curve[-1][1],
                    "wall_seconds": wall_seconds(run),
                }  # fmt: skip
        for kind in UPCYCLED:
            note = seed_dir / f"up-{kind}.txt"
            if note.exists():
                results.setdefault("upcycle_notes", {}).setdefault(kind, {})[seed] = note.read_text().strip()
    return results


def report(results: dict[str, Any]) -> list[str]:
    N = results["steps_N"]
    md = [f"| run | steps after the base's {N} | best valid loss (mean ± sd) | final | seeds | wall time |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for name, by_seed in results["runs"].items():
        best = [r["best_valid"] for r in by_seed.values()]
        final = [r["final_valid"] for r in by_seed.values()]
        sd = statistics.stdev(best) if len(best) > 1 else 0.0
        if name == "base":
            extra = "0 (the base)"
        else:
            extra = f"{N * ARMS[name][2]}" + (" from scratch" if ARMS[name][0] is None else "")
        minutes = statistics.mean(r["wall_seconds"] for r in by_seed.values()) / 60
        md.append(f"| {name} | {extra} | {statistics.mean(best):.3f} ± {sd:.3f} | {statistics.mean(final):.3f} "
                  f"| {len(best)} | {minutes:.1f} min |")  # fmt: skip
    return md


def plot(results: dict[str, Any], path: Path) -> None:
    N = results["steps_N"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, by_seed in results["runs"].items():
        offset = 0 if name == "base" or ARMS[name][0] is None else N  # continuations start where the base ended
        curves = [r["curve"] for r in by_seed.values()]
        steps = [s + offset for s, _ in curves[0]]
        table = [[v for _, v in c] for c in curves if len(c) == len(steps)]
        ax.plot(steps, [statistics.mean(c) for c in zip(*table)], marker=".", label=f"{name} ({len(table)} seeds)")
    ax.axvline(N, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="update (continuations start at the base's last step)", ylabel="validation loss (nats/token)",
           title="Upcycling vs continued dense vs MoE from scratch (BPE tiny Shakespeare)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "upcycle")
    parser.add_argument("--steps", type=int, default=400, help="N: the base's steps, and each continuation's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--analyse-only", action="store_true")
    args = parser.parse_args()
    if not (args.data / "tinyshakespeare" / "input.txt").is_file():
        parser.error(f"{args.data / 'tinyshakespeare' / 'input.txt'}: missing (--data: the shared data folder)")
    if not args.analyse_only:
        bases = [(args.out / f"seed{s}" / "base", train_command(CONFIG, args.out / f"seed{s}" / "base",
                  _common(args.data, s, args.steps))) for s in args.seeds]  # fmt: skip
        run_all(bases, args.jobs)
        arms = []
        for seed in args.seeds:
            seed_dir = args.out / f"seed{seed}"
            for arm, (start, kind, units) in ARMS.items():
                sets = _common(args.data, seed, units * args.steps) + _moe_sets(kind)
                if start is not None:
                    init = seed_dir / "base" if start == "base" else upcycle_base(seed_dir, kind)  # type: ignore[arg-type]
                    sets.append(f"train.init_from={init}")
                arms.append((seed_dir / arm, train_command(CONFIG, seed_dir / arm, sets)))
        run_all(arms, args.jobs)
    results = analyse(args.out, args.seeds, args.steps)
    write_text(args.out / "results.json", json.dumps(results, indent=1))
    write_text(args.out / "results.md", "\n".join(report(results)) + "\n")
    plot(results, args.out / "curves.png")
    print("\n".join(str(args.out / n) for n in ("results.json", "results.md", "curves.png")))


if __name__ == "__main__":
    main()
