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
