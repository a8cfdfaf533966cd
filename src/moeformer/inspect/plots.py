"""The pictures: attention grids, the experts of each token, expert load and routing measures.

Every function returns PNG bytes (callers write them atomically or inline them in the report)
and draws inside :func:`~moeformer.inspect.fonts.plot_style`, so Chinese tokens render with the
CJK font. Shapes: L layers, H heads, T query tokens, S key tokens, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeformer.inspect.attention import KIND_TITLES, AttentionMaps
from moeformer.inspect.files import figure_png
from moeformer.inspect.fonts import plot_style
from moeformer.inspect.routing import SentenceRouting

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "")
# A figure's longest side in inches: about 5,300 px at 110 dpi, 28 Mpx at most, far below PIL's
# decompression-bomb limit (89 Mpx) that a 512-token attention grid once crossed (11,748 x 8,800 px).
MAX_INCHES = 48.0
STACK_TITLES = {"encoder": "encoder (source tokens)", "decoder": "decoder (target tokens)", "layers": "language model"}


def attention_grid(maps: AttentionMaps, kind: str, *, font: str | Path | None = None) -> bytes:
    """One kind's maps as a grid, a row per layer and a column per head; queries down, keys across."""
    import matplotlib.pyplot as plt

    names = maps.kinds()[kind]
    queries, keys = maps.axes(names[0])
    n_layers, n_heads = len(names), maps.maps[names[0]].shape[0]
    cell = max(1.7, 0.2 * max(len(queries), len(keys)) + 0.8)  # inches: room for the token labels
    size, scale = bounded(cell * n_heads + 1.2, cell * n_layers + 0.8)
    with plot_style(font):
        fig, axes = plt.subplots(n_layers, n_heads, figsize=size, squeeze=False, layout="constrained")
        for row, name in enumerate(names):
            for head in range(n_heads):
                ax = axes[row, head]
                image = ax.imshow(maps.maps[name][head], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
                ax.set_title(f"layer {_layer(name)} · head {head}", fontsize=8)
                _token_ticks(ax, keys if row == n_layers - 1 else None, queries if head == 0 else None,
                             size=max(3.0, 7 * scale))  # fmt: skip
        fig.suptitle(f"{KIND_TITLES.get(kind, kind)}: rows are queries, columns are keys", fontsize=10)
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
        return figure_png(fig)


def bounded(width: float, height: float) -> tuple[tuple[float, float], float]:
    """((width, height), scale): a figure size in inches shrunk, aspect kept, to MAX_INCHES a side."""
    scale = min(1.0, MAX_INCHES / width, MAX_INCHES / height)
    return (width * scale, height * scale), scale


def _layer(name: str) -> str:
    return name.split(".")[1]


def _token_ticks(ax: Any, x: Sequence[str] | None, y: Sequence[str] | None, size: float = 7) -> None:
    """Token labels on the axes; x labels stand upright when all are short (Chinese characters)."""
    upright = not x or max((len(t) for t in x if t not in SPECIALS), default=0) <= 2
    ax.set_xticks(range(len(x)) if x else [], x or [], rotation=0 if upright else 90, fontsize=size)
    ax.set_yticks(range(len(y)) if y else [], y or [], fontsize=size)


def sentence_experts(routing: SentenceRouting, *, font: str | Path | None = None) -> bytes:
    """Token x layer: each cell coloured by the token's first expert, labelled with all K it went to."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm

    stacks = [s for s in routing.tokens if any(n.startswith(f"{s}.") for n in routing.index)]
    rows = {s: [n for n in routing.index if n.startswith(f"{s}.")] for s in stacks}
    width = max(len(routing.tokens[s]) for s in stacks)
    k = max(v.shape[1] for v in routing.index.values())
    lines = -(-k // 3)
    n_experts = max(routing.n_experts.values())
    cmap = plt.get_cmap("tab20" if n_experts <= 20 else "turbo", n_experts)
    norm = BoundaryNorm(np.arange(n_experts + 1) - 0.5, n_experts)
    heights = [len(rows[s]) for s in stacks]
    size, scale = bounded(0.75 * width + 2.5, sum(heights) * (0.3 + 0.22 * lines) + 1.3 * len(stacks))
    with plot_style(font):
        fig, axes = plt.subplots(len(stacks), 1, figsize=size, squeeze=False, layout="constrained",
                                 height_ratios=heights)  # fmt: skip
        for ax, stack in zip(axes[:, 0], stacks):
            first = np.stack([routing.index[n][:, 0].numpy() for n in rows[stack]])  # (L, T)
            image = ax.imshow(first, cmap=cmap, norm=norm, aspect="auto")
            for r, name in enumerate(rows[stack]):
                for t, experts in enumerate(routing.index[name].tolist()):
                    ax.text(t, r, _expert_text(experts, routing.n_experts[name]), ha="center", va="center",
                            fontsize=max(3.0, 7 * scale), color=_ink(cmap(norm(experts[0]))))  # fmt: skip
            labels = [f"layer {_layer(n)}" for n in rows[stack]]
            _token_ticks(ax, routing.tokens[stack], labels, size=max(3.0, 8 * scale))
            ax.set_title(f"{STACK_TITLES.get(stack, stack)}: experts per token, best first (colour: first)", fontsize=9)
        bar = fig.colorbar(image, ax=axes, shrink=0.8, label="first expert")
        bar.set_ticks(np.unique(np.linspace(0, n_experts - 1, min(n_experts, 8)).round().astype(int)))
        return figure_png(fig)


def _expert_text(experts: Sequence[int], n_experts: int) -> str:
    shown = [str(e) if e < n_experts else "–" for e in experts]  # E: dropped for capacity
    return "\n".join(",".join(shown[i : i + 3]) for i in range(0, len(shown), 3))


def _ink(rgba: Sequence[float]) -> str:
    """Black or white text, whichever reads better on ``rgba``."""
    luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return "black" if luminance > 0.5 else "white"


def expert_load(summaries: Sequence[dict[str, Any]], *, font: str | Path | None = None) -> bytes:
    """Layer x expert heat map of each expert's share of the assignments, times E (1 = uniform)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    n_experts = max(s["n_experts"] for s in summaries)
    ratio = np.full((len(summaries), n_experts), np.nan)
    for i, s in enumerate(summaries):
        ratio[i, : s["n_experts"]] = np.asarray(s["load"]) * s["n_experts"]
    top = max(2.0, float(np.nanmax(ratio)))
    with plot_style(font):
        size, _ = bounded(min(2 + 0.3 * n_experts, 24), 1.4 + 0.4 * len(summaries))
        fig, ax = plt.subplots(figsize=size, layout="constrained")
        image = ax.imshow(ratio, cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 0.0, top), aspect="auto")
        ax.set_yticks(range(len(summaries)), [f"{s['layer']} ({s['tokens']:,} tokens)" for s in summaries], fontsize=8)
        ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title("expert load relative to uniform (1 = 1/E of the assignments)", fontsize=9)
        fig.colorbar(image, ax=ax, label="load x E")
        return figure_png(fig)


def routing_measures(summaries: Sequence[dict[str, Any]], *, font: str | Path | None = None) -> bytes:
    """Per layer: router and load entropy (vs log E), shared-expert share, mutual informations."""
    import matplotlib.pyplot as plt

    names = [s["layer"] for s in summaries]
    x = np.arange(len(names))
    with plot_style(font):
        width = min(18.0, max(12.0, 3 * (1.5 + 0.6 * len(names))))
        fig, axes = plt.subplots(1, 3, figsize=(width, 3.8), layout="constrained")
        _bars(axes[0], x, {"router entropy (per token)": [s["router_entropy"] for s in summaries],
                           "load entropy (balance)": [s["load_entropy"] for s in summaries]})  # fmt: skip
        axes[0].plot(x, [s["max_entropy"] for s in summaries], "k_", markersize=22, label="log E (maximum)")
        axes[0].set_title("routing entropy (nats)", fontsize=9)
        _bars(axes[1], x, {"shared share": [s["shared_share"] for s in summaries]})
        axes[1].set_ylim(0, 1)
        axes[1].set_title("|shared| / (|shared| + |routed|), mean over tokens", fontsize=9)
        mi = {"I(expert; token)": [s["mi_token"] for s in summaries],
              "I(expert; script)": [s["mi_script"] for s in summaries]}  # fmt: skip
        if all(s["mi_side"] is not None for s in summaries):
            mi["I(expert; side)"] = [s["mi_side"] for s in summaries]
        _bars(axes[2], x, mi)
        axes[2].set_title("specialisation: mutual information (nats)", fontsize=9)
        axes[0].set_ylim(0, 1.3 * max(s["max_entropy"] for s in summaries))  # room for the legend
        for ax in axes:
            ax.set_xticks(x, names, rotation=30, fontsize=8)
            ax.legend(fontsize=7, loc="upper left", ncols=2)
            ax.grid(axis="y", alpha=0.3)
        return figure_png(fig)


def _bars(ax: Any, x: np.ndarray, series: dict[str, Sequence[float]]) -> None:
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
