"""Every candidate refusal direction of a subject, scored by the outcomes the paper's selection
only estimates (issue 15).

Arditi et al. (2024, section 2.4 and appendix C) choose one candidate r(i, l) (post-instruction
position i, layer l) by logit metrics on validation prompts: the bypass score (refusal metric on
harmful prompts under ablation), the induce score (on harmless prompts under addition) and the KL
under ablation, after two filters (KL < 0.1, l < 0.8 L). Here every non-degenerate candidate of a
subject of ``examples/refusal_subject.py`` is scored by what those metrics stand for: JailbreakBench
refusal under directional ablation (lower: the direction carries refusal) and harmless_test
refusal under activation addition at its layer (higher: the direction causes refusal), greedy,
with the paper's substring score. This shows whether the rule chose well and what the 0.8 L
filter leaves out of a 4-layer model. It is analysis, not selection: choosing a direction by
these held-out numbers would choose on the test sets.

    python examples/refusal_candidates.py [--runs runs/refusal-subject] [--subjects deepseek dense]
        [--seed 0] [--n-eval 200] [--new 16]

Writes RUNS/candidates.json, RUNS/candidates.md and RUNS/candidates.png (per subject, the two
scores per candidate as heat maps; the paper's choice boxed, filtered candidates marked).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from experiment_runs import save_figure  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from moeformer.publish import write_text  # noqa: E402
from moeformer.refusal import ChatLM, evaluate, load_chat_lm  # noqa: E402
from moeformer.refusal.subject_data import build_subject_data  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from refusal_subject import TEMPLATE, fitting, subject_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def score_candidates(lm: ChatLM, run: Path, harmful: list[str], harmless: list[str], new: int) -> dict[str, Any]:
    """Ablation and addition outcomes for ``lm`` (the model of ``run``) of every candidate in
    ``run/direction`` (as saved by ``save_extraction``), beside the selection's metrics and verdict."""
    directions = load_file(str(run / "direction" / "candidates.safetensors"))["directions"]
    metrics = json.loads((run / "direction" / "scores.json").read_text())
    chosen = json.loads((run / "direction" / "summary.json").read_text())["chosen"] or {}  # {}: none passed
    rows = []
    for m in tqdm(metrics, desc=run.name, unit="candidate"):
        if not math.isfinite(m["bypass"]):  # zero difference of means: no direction to try
            continue
        r = directions[m["position"] + directions.shape[0], m["layer"]]
        report = evaluate(lm, r, m["layer"], harmful, harmless, conditions=("ablation", "actadd"),
                          max_new_tokens=new, batch_size=32)  # fmt: skip
        ablation, actadd = report.results
        rows.append({**m, "chosen": (m["position"], m["layer"]) == (chosen.get("position"), chosen.get("layer")),
                     "ablation_harmful_refusal": ablation.harmful_refusal, "ablation_kl": ablation.kl,
                     "actadd_harmless_refusal": actadd.harmless_refusal})  # fmt: skip
    return {"n_layers": int(directions.shape[1]), "n_positions": int(directions.shape[0]), "candidates": rows}


def table(name: str, result: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", "", "| position | layer | bypass | induce | KL | paper's filter | JailbreakBench "
             "refusal, ablated | harmless refusal, added |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in result["candidates"]:
        verdict = "**chosen**" if c["chosen"] else (c["discarded"] or "passes")
        outcome = f"{c['ablation_harmful_refusal']:.2f} | {c['actadd_harmless_refusal']:.2f}"
        lines.append(f"| {c['position']} | {c['layer']} | {c['bypass']:.2f} | {c['induce']:.2f} | {c['kl']:.3f} | "
                     f"{verdict} | {outcome} |")  # fmt: skip
    return lines


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    panels = [("ablation_harmful_refusal", "JailbreakBench refusal, r ablated (low: r carries refusal)"),
              ("actadd_harmless_refusal", "harmless refusal, r added (high: r causes refusal)")]  # fmt: skip
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), squeeze=False)
    for row, (name, result) in enumerate(results.items()):
        n_pos, n_layers = result["n_positions"], result["n_layers"]
        for col, (key, title) in enumerate(panels):
            grid = [[math.nan] * n_layers for _ in range(n_pos)]
            ax = axes[row][col]
            for c in result["candidates"]:
                i = c["position"] + n_pos
                grid[i][c["layer"]] = c[key]
                ax.text(c["layer"], i, f"{c[key]:.2f}" + ("" if c["discarded"] is None else "\n(filtered)"),
                        ha="center", va="center", fontsize=7)  # fmt: skip
                if c["chosen"]:
                    ax.add_patch(plt.Rectangle((c["layer"] - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="black"))
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn_r" if col == 0 else "RdYlGn", aspect="auto")
            ax.set(title=f"{name}: {title}", xlabel="layer", ylabel="position (from the end of the prompt)",
                   xticks=range(n_layers), yticks=range(n_pos), yticklabels=[str(p - n_pos) for p in range(n_pos)])
            ax.title.set_fontsize(8)
            fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "refusal-subject")
    parser.add_argument("--subjects", nargs="+", default=["deepseek", "dense"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-eval", type=int, default=200, help="harmless_test prompts scored")
    parser.add_argument("--new", type=int, default=16, help="tokens generated per prompt for the score")
    args = parser.parse_args()
    runs = subject_runs(args.runs, args.subjects, args.seed)
    missing = [str(r / "direction") for r in runs.values() if not (r / "direction" / "scores.json").is_file()]
    if missing:
        parser.error(f"no extraction at {', '.join(missing)}: run examples/refusal_subject.py first")
    subject = build_subject_data(args.data / "refusal")
    results = {}
    for name, run in runs.items():
        lm = load_chat_lm(run, template=TEMPLATE)
        sets, _ = fitting(lm, subject, lm.model.config.max_seq_len - args.new)
        results[name] = score_candidates(lm, run, sets["harmful_eval"], sets["harmless_eval"][: args.n_eval], args.new)
        write_text(args.runs / "candidates.json", json.dumps(results, indent=1))
    md = [line for name, result in results.items() for line in table(name, result) + [""]]
    write_text(args.runs / "candidates.md", "\n".join(md))
    plot(results, args.runs / "candidates.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
