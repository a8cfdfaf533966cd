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
