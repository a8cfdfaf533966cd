"""Pictures of the refusal experiments (matplotlib, written as PNG without a display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moeformer.refusal.selection import CandidateScore


def plot_scores(scores: Sequence[CandidateScore], path: Path, *, chosen: CandidateScore | None = None) -> None:
    """Bypass, induce and KL scores over layers, one line per eoi position (the paper's figure 9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = sorted({s.position for s in scores})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for ax, key, title in zip(
        axes,
        ("bypass", "induce", "kl"),
        ("bypass: refusal metric, harmful + ablation", "induce: refusal metric, harmless + actadd",
         "KL(baseline || ablation), harmless"),
    ):  # fmt: skip
        for pos in positions:
            row = sorted((s for s in scores if s.position == pos), key=lambda s: s.layer)
            ax.plot([s.layer for s in row], [getattr(s, key) for s in row], marker=".", label=f"position {pos}")
        if chosen is not None:
            ax.scatter([chosen.layer], [getattr(chosen, key)], s=120, facecolors="none", edgecolors="red",
                       label=f"chosen (pos {chosen.position}, layer {chosen.layer})", zorder=3)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing(layers: Sequence[dict], path: Path) -> None:
    """Heat map of routing frequency differences (harmful - harmless, and harmful ablated - harmful)
    per MoE layer (rows) and expert (columns), from :meth:`LayerRouting.to_dict` entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    diff = np.array([np.array(r["harmful"]) - np.array(r["harmless"]) for r in layers])
    moved = np.array([np.array(r["harmful_ablated"]) - np.array(r["harmful"]) for r in layers])
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.35 * len(layers)), constrained_layout=True)
    for ax, data, title in ((axes[0], diff, "harmful - harmless"), (axes[1], moved, "harmful: ablated - baseline")):
        limit = max(float(np.abs(data).max()), 1e-6)
        image = ax.imshow(data, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_yticks(range(len(layers)), [f"layer {r['layer']}" for r in layers])
        ax.set_xlabel("expert")
        ax.set_title(f"routing frequency, {title}", fontsize=10)
        fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_expert_choice(study: Sequence, path: Path) -> None:
    """Per MoE layer (rows) and routed expert (columns): choice rate at the post-instruction tokens,
    harmful minus harmless; a dot marks the differences significant after Benjamini-Hochberg."""
    plt = _pyplot()
    import numpy as np

    rate = lambda layer, side: np.array(layer.chosen[side].tolist()) / max(layer.tokens[side], 1)  # noqa: E731
    diff = np.array([rate(layer, "harmful") - rate(layer, "harmless") for layer in study])
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * diff.shape[1] + 2), 1.5 + 0.4 * len(study)), constrained_layout=True)
    limit = max(float(np.abs(diff).max()), 1e-6)
    image = ax.imshow(diff, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
    for row, layer in enumerate(study):
        for col in np.flatnonzero(np.array(layer.significant.tolist())):
            ax.plot(col, row, "k.", markersize=4)
    ax.set_yticks(range(len(study)), [f"layer {layer.layer}" for layer in study])
    ax.set(xlabel="routed expert", title="choice rate, harmful - harmless (dot: significant, BH q = 0.05)")
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_writes(study: Sequence, path: Path) -> None:
    """Left: per layer, the shared and the routed experts' write along r per token (harmful prompts).
    Right: every routed expert's harmful-minus-harmless write, layer by layer."""
    plt = _pyplot()
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    x = np.arange(len(study))
    shared = [layer.shared_write["harmful"] for layer in study]
    routed = [float(layer.routed_write["harmful"].sum()) for layer in study]
    left.bar(x - 0.2, shared, 0.4, label="shared experts")
    left.bar(x + 0.2, routed, 0.4, label="routed experts (sum)")
    left.set_xticks(x, [str(layer.layer) for layer in study])
    left.set(xlabel="layer", ylabel="mean write along r per token", title="who writes the refusal direction")
    left.legend()
    for layer in study:
        lean = (layer.routed_write["harmful"] - layer.routed_write["harmless"]).numpy()
        right.plot(np.arange(len(lean)), lean, marker=".", label=f"layer {layer.layer}")
    right.axhline(0, color="gray", linewidth=0.8)
    right.set(xlabel="routed expert", ylabel="write along r, harmful - harmless", title="refusal experts?")
    right.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_masking(curves: dict, path: Path) -> None:
    """Refusal score against the number of experts taken out per layer, refusal experts vs random;
    ``curves``: phrase-list label -> (baseline score, {n: {"refusal_experts": s, "random": s}})."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for (label, (baseline, masking)), style in zip(curves.items(), ("--", "-"), strict=False):
        ns = sorted(masking)
        ax.plot([0, *ns], [baseline, *[masking[n]["refusal_experts"] for n in ns]], style, marker="o",
                color="tab:blue", label=f"refusal experts ({label})")  # fmt: skip
        ax.plot([0, *ns], [baseline, *[masking[n]["random"] for n in ns]], style, marker="s", color="tab:orange",
                label=f"random experts ({label})")  # fmt: skip
    ax.set(xlabel="experts taken out of routing per layer", ylabel="refusal score (harmful prompts)", ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
