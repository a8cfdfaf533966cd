"""Analysis of examples/deepseekmoe_claim.py's runs: losses, paired seeds, specialisation, pictures.

Per run (its best checkpoint by validation loss): total and active parameters, validation curve,
loss on the 200 test windows (held out from training and from checkpoint selection), routing
mutual information between token and expert on those windows (plug-in estimate, nats; also
divided by the load entropy, since it grows with the number of experts), and the loss when each
token's top routed experts are disabled (:func:`moeformer.inspect.expert_ablation.disable_top_experts`)
at ratios 0 to 4/8 of the routed experts.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from moeformer.checkpoint_io import load_checkpoint  # noqa: E402
from moeformer.data.readers import read_documents  # noqa: E402
from moeformer.inspect.expert_ablation import disable_top_experts  # noqa: E402
from moeformer.inspect.routing import LayerRouting, capture_routing, moe_layers  # noqa: E402
from moeformer.publish import write_bytes, write_text  # noqa: E402

RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5)
COLORS = ("tab:gray", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:red")
PAIRS = (
    ("deepseek", "gshard"),
    ("gshard", "dense"),
    ("deepseek", "dense"),
    ("deepseek-no-shared", "deepseek"),
    ("deepseek-m1", "gshard"),
)
GRANULARITY = ("deepseek-m1", "deepseek-m2", "deepseek", "deepseek-m8")  # m = 1, 2, 4, 8, one shared expert


def test_windows(corpus: Path, tokenizer: Any, seq: int, n_valid: int, n_test: int) -> torch.Tensor:
    """The test windows (n_test, seq + 1) exactly as the training pipeline cut them from the end."""
    texts, _ = read_documents(corpus)
    ids = torch.tensor(tokenizer.encode("\n".join(texts)), dtype=torch.long)
    test = ids[len(ids) - n_test * (seq + 1) :]
    return test.view(n_test, seq + 1)


def mean_loss(model: torch.nn.Module, windows: torch.Tensor, batch: int = 25) -> float:
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(batch):
            logits = model(chunk[:, :-1]).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    return total / windows[:, 1:].numel()


def _parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active): active leaves out each token's unchosen routed experts."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for layer in moe_layers(model).values() if _has_moe(model) else []:
        E, K = layer.router.n_experts, layer.router.top_k
        idle += sum(p.numel() for p in layer.experts.parameters()) * (E - K) // E
    return total, total - idle


def _has_moe(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "MoELayer" for m in model.modules())


def _specialisation(loaded: Any, windows: torch.Tensor) -> dict[str, Any]:
    model, tokenizer = loaded.model, loaded.tokenizers.source
    layers = {
        n: LayerRouting(
            n,
            m.router.n_experts,
            m.router.top_k,
            torch.zeros(tokenizer.vocab_size, m.router.n_experts, dtype=torch.float64),
            torch.zeros(2, m.router.n_experts, dtype=torch.float64),
        )
        for n, m in moe_layers(model).items()
    }
    with torch.no_grad(), capture_routing(model) as store:
        for chunk in windows.split(25):
            store.clear()
            tokens = chunk[:, :-1]
            model(tokens)
            for name, layer in layers.items():
                layer.add(store[name], tokens, torch.zeros_like(tokens, dtype=torch.bool), None)
    summaries = {n: layer.summary(tokenizer, top=5) for n, layer in layers.items()}
    E = next(iter(layers.values())).n_experts
    losses = {}
    for ratio in RATIOS:
        with disable_top_experts(model, round(ratio * E)):
            losses[str(ratio)] = mean_loss(model, windows)
    return {
        "mi_token": statistics.mean(s["mi_token"] for s in summaries.values()),
        "mi_token_over_load_entropy": statistics.mean(s["mi_token"] / s["load_entropy"] for s in summaries.values()),
        "load_entropy_over_max": statistics.mean(s["load_entropy"] / s["max_entropy"] for s in summaries.values()),
        "top_tokens_last_layer": summaries[list(summaries)[-1]]["top_tokens"][:8],
        "disabled_top_loss": losses,
    }


def read_run(run_dir: Path, corpus: Path) -> dict[str, Any]:
    info = json.loads((run_dir / "run.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(m["step"], m["valid_loss"]) for m in metrics if "valid_loss" in m]
    speed = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    loaded = load_checkpoint(run_dir, which="best")
    data, train = info["config"]["data"], info["config"]["train"]
    windows = test_windows(corpus, loaded.tokenizers.source, data["seq_len"], data["valid_size"], data["test_size"])
    total, active = _parameters(loaded.model)
    out = {
        "curve": curve,
        "best_valid": min(v for _, v in curve),
        "final_valid": curve[-1][1],
        "test_loss": mean_loss(loaded.model, windows),
        "params_total": total,
        "params_active": active,
        "tokens_per_step": train["batch_tokens"],
        "tokens_trained": curve[-1][0] * train["batch_tokens"],
        "tokens_per_s_median": statistics.median(speed) if speed else None,
        "corpus_tokens": info["data"]["tokens"],
        "train_tokens": info["data"]["train_tokens"],
    }
    if _has_moe(loaded.model):
        out["specialisation"] = _specialisation(loaded, windows)
    return out


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _table(results: dict[str, dict[int, dict]], seeds: list[int]) -> list[str]:
    rows = [
        "| model | params total / active | test loss, seeds "
        + " / ".join(map(str, seeds))
        + " | mean ± sd | best valid loss mean ± sd | valid loss change, last 10% of steps | tokens/s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, runs in results.items():
        if not runs:
            continue
        first = next(iter(runs.values()))
        tests = [runs[s]["test_loss"] for s in seeds if s in runs]
        speed = statistics.median(r["tokens_per_s_median"] for r in runs.values())
        rows.append(
            f"| {v} | {first['params_total'] / 1e6:.2f}M / {first['params_active'] / 1e6:.2f}M | "
            + " / ".join(f"{runs[s]['test_loss']:.3f}" if s in runs else "-" for s in seeds)
            + f" | {_mean_sd(tests)} | {_mean_sd([r['best_valid'] for r in runs.values()])} | "
            f"{_mean_sd([_tail_change(r['curve']) for r in runs.values()])} | {speed:,.0f} |"
        )
    return rows


def _tail_change(curve: list[tuple[int, float]]) -> float:
    """Validation loss change over the last 10% of the steps: how flat the curve ended."""
    last_step = curve[-1][0]
    before = [loss for step, loss in curve if step <= 0.9 * last_step]
    return curve[-1][1] - before[-1] if before else float("nan")


def _paired(results: dict[str, dict[int, dict]], seeds: list[int]) -> tuple[list[str], dict[str, Any]]:
    rows = [
        "| comparison (test loss, a - b) | per seed | mean ± sd | t (df = n-1) | a better in |",
        "|---|---|---|---|---|",
    ]
    stored = {}
    for a, b in PAIRS:
        common = [s for s in seeds if s in results.get(a, {}) and s in results.get(b, {})]
        if len(common) < 2:
            continue
        diffs = [results[a][s]["test_loss"] - results[b][s]["test_loss"] for s in common]
        sd = statistics.stdev(diffs)
        t = statistics.mean(diffs) / (sd / math.sqrt(len(diffs))) if sd > 0 else float("inf")
        wins = sum(d < 0 for d in diffs)
        rows.append(
            f"| {a} - {b} | {' / '.join(f'{d:+.3f}' for d in diffs)} | {_mean_sd(diffs)} | {t:+.1f} | "
            f"{wins} of {len(diffs)} seeds |"
        )
        stored[f"{a} - {b}"] = {"seeds": common, "diffs": diffs, "t": t}
    return rows, stored


def _specialisation_table(results: dict[str, dict[int, dict]]) -> list[str]:
    head = " | ".join(f"loss + at {r:g}" for r in RATIOS[1:])
    rows = [
        f"| model | MI(token; expert) | MI / load entropy | load entropy / log E | {head} |",
        "|---|---|---|---|" + "---|" * (len(RATIOS) - 1),
    ]
    for v, runs in results.items():
        specs = [r["specialisation"] for r in runs.values() if "specialisation" in r]
        if not specs:
            continue
        cells = [
            _mean_sd([s[k] for s in specs]) for k in ("mi_token", "mi_token_over_load_entropy", "load_entropy_over_max")
        ]
        rises = [
            _mean_sd([s["disabled_top_loss"][str(r)] - s["disabled_top_loss"]["0.0"] for s in specs])
            for r in RATIOS[1:]
        ]
        rows.append(f"| {v} | " + " | ".join(cells + rises) + " |")
    return rows


def _top_tokens(results: dict[str, dict[int, dict]]) -> list[str]:
    rows = []
    for v, runs in results.items():
        spec = next((r["specialisation"] for r in runs.values() if "specialisation" in r), None)
        if spec is not None:
            listed = [
                f"{e}: {' '.join(repr(t) for t in tokens)}" for e, tokens in enumerate(spec["top_tokens_last_layer"])
            ]
            rows.append(f"- {v}: " + "; ".join(listed))
    return rows


def _plot_curves(results: dict[str, dict[int, dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = (("dense", "gshard", "deepseek"), ("gshard", "deepseek", "deepseek-no-shared", *GRANULARITY))
    titles = ("the claim: dense vs GShard top-2 vs DeepSeekMoE", "ablations: shared expert, granularity m")
    top = []
    for ax, names, title in zip(axes, panels, titles):
        for v in dict.fromkeys(names):
            runs = results.get(v, {})
            if not runs:
                continue
            steps = [s for s, _ in next(iter(runs.values()))["curve"]]
            table = [[loss for _, loss in r["curve"]] for r in runs.values() if len(r["curve"]) == len(steps)]
            tokens = [s * next(iter(runs.values()))["tokens_per_step"] / 1e6 for s in steps]
            mean = [statistics.mean(c) for c in zip(*table)]
            top.append(mean[len(mean) // 4])
            color = COLORS[list(results).index(v) % len(COLORS)]  # one colour per model in both panels
            ax.plot(tokens, mean, marker=".", color=color, label=f"{v} ({len(table)} seeds)")
            ax.fill_between(
                tokens, [min(c) for c in zip(*table)], [max(c) for c in zip(*table)], color=color, alpha=0.2
            )
            epoch = next(iter(runs.values()))["train_tokens"] / 1e6
        if top:
            ax.axvline(epoch, color="gray", linestyle=":", linewidth=1)
            ax.text(epoch, 0.98, " 1 epoch", va="top", fontsize=8, color="gray", transform=ax.get_xaxis_transform())
        ax.set(title=title, xlabel="training tokens (M)")
        ax.grid(alpha=0.3)
        if ax.lines:  # a run of some variants only can leave a panel empty
            ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss (nats/token); band = min..max over seeds")
    if top:  # the first quarter of training is off the top: the differences are in the last part
        axes[0].set_ylim(top=max(top))
    fig.tight_layout()
    _save(fig, path)


def _plot_disabled(results: dict[str, dict[int, dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for v, runs in results.items():
        specs = [r["specialisation"]["disabled_top_loss"] for r in runs.values() if "specialisation" in r]
        if not specs:
            continue
        rise = [statistics.mean(s[str(r)] - s["0.0"] for s in specs) for r in RATIOS]
        ax.plot(RATIOS, rise, marker="o", label=v, color=COLORS[list(results).index(v) % len(COLORS)])
    ax.set(
        xlabel="ratio of each token's top routed experts disabled",
        ylabel="test loss increase (nats/token)",
        title="Disable the top routed experts (DeepSeekMoE sec. 4.5)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def analyse(out: Path, variants: list[str], seeds: list[int], sizes: dict, specs: dict) -> list[Path]:
    """Read every finished run under ``out/runs``, write results.json, results.md and two PNGs."""
    corpus = out / "corpus.txt"
    results: dict[str, dict[int, dict]] = {v: {} for v in variants}
    todo = [(v, s) for v in variants for s in seeds if (out / "runs" / f"{v}-seed{s}" / "summary.json").exists()]
    for v, s in tqdm(todo, desc="analysis"):
        results[v][s] = read_run(out / "runs" / f"{v}-seed{s}", corpus)
    paired_rows, paired = _paired(results, seeds)
    md = [
        "## Test loss (best checkpoint by validation loss)",
        "",
        *_table(results, seeds),
        "",
        "## Paired by seed (same data order within a seed)",
        "",
        *paired_rows,
        "",
        "## Specialisation (test windows; mean ± sd over seeds)",
        "",
        *_specialisation_table(results),
        "",
        "## Tokens most over-represented at each expert (PMI; last MoE layer, first seed, first 8 experts)",
        "",
        *_top_tokens(results),
    ]
    stored = {"corpus": sizes, "variants": {v: specs[v] for v in variants}, "runs": results, "paired": paired}
    paths = [out / "results.json", out / "results.md", out / "curves.png", out / "disabled_top_experts.png"]
    write_text(paths[0], json.dumps(stored, indent=1, default=str))
    write_text(paths[1], "\n".join(md) + "\n")
    _plot_curves(results, paths[2])
    _plot_disabled(results, paths[3])
    return paths
