"""Multi-token prediction at this scale: does it help the main model, and how fast does it decode?

DeepSeek-V3's report (section 2.2; ablation in Table 4) trains one MTP module (depth 1) with
lambda = 0.3 for the first 10T tokens and 0.1 after, finds the main model better on most
benchmarks, and reuses the module for speculative decoding: 85-90% acceptance of the second
token, 1.8x tokens/s (section 5.4.3). Here: the char-Shakespeare DeepSeek-V3-style model
(``configs/shakespeare-char-deepseek-v3.toml``: MLA, sigmoid routing, DeepSeekMoE experts) with
and without ``[model.mtp] depth = 1, weight = 0.3, late_weight = 0.1``, equal steps, 3 seeds.

    python examples/mtp_comparison.py [--data ../shared/data] [--out runs/mtp-comparison]
        [--steps 2000] [--seeds 0 1 2] [--jobs 2] [--analyse-only]

Per run: main-token loss on the 400 test windows (best checkpoint by validation loss; the MTP
module plays no part in it), the validation curve, wall time; per MTP run: its own validation
NLL for the token after next, and greedy decoding of held-out prompts with and without
speculation (identical tokens, checked), batch 1 and 8: acceptance and tokens/s measured in
this process, best of 3. Resumable (:mod:`experiment_runs`); writes OUT/results.{json,md}, OUT/curves.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from deepseekmoe_analysis import mean_loss, test_windows  # noqa: E402
from experiment_runs import run_all, save_figure, train_command, wall_seconds  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from moeformer.checkpoint_io import load_checkpoint  # noqa: E402
from moeformer.decode import greedy_generate, speculative_generate  # noqa: E402
from moeformer.publish import write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare-char-deepseek-v3.toml"
VARIANTS = {
    "v3": [],
    "v3-mtp": ["model.mtp.depth=1", "model.mtp.weight=0.3", "model.mtp.late_weight=0.1"],
}
PROMPT, NEW = 16, 48  # the config's max_seq_len is 64 positions


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / f"{variant}-seed{seed}"


def command(variant: str, seed: int, steps: int, data: Path, directory: Path) -> list[str]:
    sets = [f"data.path={data / 'tinyshakespeare' / 'input.txt'}", f"train.seed={seed}", f"train.steps={steps}"]
    return train_command(CONFIG, directory, sets + VARIANTS[variant])


def _timed(fn: Any, repeats: int = 3) -> tuple[Any, float]:
    best, result = float("inf"), None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - began)
    return result, best


def decoding(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, Any]:
    """Greedy decoding of NEW tokens after PROMPT-token prompts, plain vs speculative, batch 1 and 8."""
    out: dict[str, Any] = {}
    with torch.no_grad():
        for batch in (1, 8):
            prompts = windows[:batch, :PROMPT]
            plain, t_plain = _timed(lambda p=prompts: greedy_generate(model, p, max_new_tokens=NEW))
            fast, t_fast = _timed(lambda p=prompts: speculative_generate(model, p, max_new_tokens=NEW))
            if not torch.equal(plain, fast.tokens):
                raise AssertionError(f"speculative greedy differs from greedy at batch {batch}")
            # acceptance over more prompts than one batch: every test prompt, batch 8 at a time
            drafted = accepted = 0
            for chunk in windows[:, :PROMPT].split(8):
                result = speculative_generate(model, chunk, max_new_tokens=NEW)
                drafted, accepted = drafted + result.drafted, accepted + result.accepted
            out[f"batch{batch}"] = {
                "plain_tokens_per_s": batch * NEW / t_plain,
                "speculative_tokens_per_s": batch * NEW / t_fast,
                "speedup": t_plain / t_fast,
                "passes": fast.passes + 1,
                "acceptance": accepted / max(drafted, 1),
            }
    return out


def read_run(directory: Path, data: Path) -> dict[str, Any]:
    info = json.loads((directory / "run.json").read_text())
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "valid_loss" in r]
    loaded = load_checkpoint(directory, which="best")
    model = loaded.model.eval()
    cfg = info["config"]["data"]
    windows = test_windows(data / "tinyshakespeare" / "input.txt", loaded.tokenizers.source, cfg["seq_len"],
                           cfg["valid_size"], cfg["test_size"])  # fmt: skip
    result = {
        "curve": [(r["step"], r["valid_loss"]) for r in evals],
        "best_valid": min(r["valid_loss"] for r in evals),
        "test_loss": mean_loss(model, windows),
        "wall_seconds": wall_seconds(directory),
        "parameters": sum(p.numel() for p in model.parameters()),
        "mtp_parameters": sum(p.numel() for p in model.mtp.parameters()),
    }
    if len(model.mtp):
        result["valid_mtp_nll_1"] = evals[-1].get("valid_mtp_nll_1")
        torch.set_num_threads(1)  # the timings: one thread, as every run here
        result["decoding"] = decoding(model, windows[:64])
    return result


def _mean_sd(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def report(results: dict[str, dict[int, dict]], seeds: list[int]) -> list[str]:
    md = ["| model | seeds | parameters (MTP) | test loss | best valid loss | valid NLL, token after next "
          "| wall time |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for v, runs in results.items():
        if not runs:
            continue
        r0 = next(iter(runs.values()))
        ahead = [r["valid_mtp_nll_1"] for r in runs.values() if r.get("valid_mtp_nll_1") is not None]
        md.append(
            f"| {v} | {len(runs)} | {r0['parameters']:,} ({r0['mtp_parameters']:,}) "
            f"| {_mean_sd([r['test_loss'] for r in runs.values()])} "
            f"| {_mean_sd([r['best_valid'] for r in runs.values()])} | {_mean_sd(ahead) if ahead else '-'} "
            f"| {statistics.mean(r['wall_seconds'] for r in runs.values()) / 60:.1f} min |"
        )
    both = [s for s in seeds if s in results.get("v3", {}) and s in results.get("v3-mtp", {})]
    diffs = [results["v3-mtp"][s]["test_loss"] - results["v3"][s]["test_loss"] for s in both]
    if diffs:
        better = sum(d < 0 for d in diffs)
        md += ["", f"Paired by seed, test loss with MTP minus without: {_mean_sd(diffs)} "
               f"({', '.join(f'{d:+.3f}' for d in diffs)}; MTP better in {better} of {len(diffs)})."]  # fmt: skip
    md += ["", "| decoding (greedy, 16-token prompts, 48 new) | acceptance | plain tokens/s | speculative tokens/s "
           "| speed-up |", "|---|---|---|---|---|"]  # fmt: skip
    for batch in ("batch1", "batch8"):
        rows = [r["decoding"][batch] for r in results.get("v3-mtp", {}).values() if "decoding" in r]
        if rows:
            md.append(
                f"| {batch.replace('batch', 'batch ')} | {_mean_sd([r['acceptance'] for r in rows], 2)} "
                f"| {statistics.mean(r['plain_tokens_per_s'] for r in rows):.0f} "
                f"| {statistics.mean(r['speculative_tokens_per_s'] for r in rows):.0f} "
                f"| {_mean_sd([r['speedup'] for r in rows], 2)}x |"
            )
    return md


def plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (v, runs), color in zip(results.items(), ("tab:blue", "tab:orange"), strict=False):
        curves = [r["curve"] for r in runs.values()]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        table = [[loss for _, loss in c] for c in curves if len(c) == len(steps)]
        label = f"{v} ({len(table)} seeds)"
        ax.plot(steps, [statistics.mean(c) for c in zip(*table)], marker=".", color=color, label=label)
        ax.fill_between(steps, [min(c) for c in zip(*table)], [max(c) for c in zip(*table)], color=color, alpha=0.2)
    ax.set(xlabel="update", ylabel="main-token validation loss (nats/char)",
           title="DeepSeek-V3-style, with and without MTP")  # fmt: skip
    ax.set_ylim(top=2.2)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mtp-comparison")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--analyse-only", action="store_true")
    args = parser.parse_args()
    if not (args.data / "tinyshakespeare" / "input.txt").is_file():
        parser.error(f"{args.data / 'tinyshakespeare' / 'input.txt'}: missing (--data: the shared data folder)")
    jobs = [(v, s) for s in args.seeds for v in VARIANTS]
    if not args.analyse_only:
        run_all([(run_dir(args.out, v, s), command(v, s, args.steps, args.data, run_dir(args.out, v, s)))
                 for v, s in jobs], args.jobs)  # fmt: skip
    results: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    done = [(v, s) for v, s in jobs if (run_dir(args.out, v, s) / "summary.json").exists()]
    for v, s in tqdm(done, desc="analysis"):
        results[v][s] = read_run(run_dir(args.out, v, s), args.data)
    write_text(args.out / "results.json", json.dumps(results, indent=1))
    write_text(args.out / "results.md", "\n".join(report(results, args.seeds)) + "\n")
    plot(results, args.out / "curves.png")
    print("\n".join(str(args.out / n) for n in ("results.json", "results.md", "curves.png")))


if __name__ == "__main__":
    main()
