"""``moeformer report``: one self-contained HTML page about a checkpoint.

Sections: the model and its checkpoint metrics; the run's training curves (loss, learning
rate, balance terms, expert load); attention maps of one sentence; for MoE models, the experts
of each token of that sentence, expert load, routing entropy, shared-expert share, mutual
information and the tokens each expert is most specific to. Pictures are PNGs inlined as
base64 ``data:`` URIs and the style sheet is inline: the file opens from disk in any browser,
with no server and no request to any other address. Every text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeformer.inference import LoadedModel
from moeformer.inspect.attention import KIND_TITLES, attention_maps
from moeformer.inspect.corpus import InspectError, Item
from moeformer.inspect.curves import find_log, plot_curves, plot_expert_load, read_log
from moeformer.inspect.fonts import font_subset
from moeformer.inspect.pictures import attention_pictures, routing_result
from moeformer.inspect.routing import moe_layers

STYLE = """
body { font-family: system-ui, "moeformer-cjk", "Noto Sans SC", "Noto Sans CJK SC", sans-serif;
       margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
figure { margin: 1.2em 0; } figcaption { color: #555; font-size: .9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: .85em; margin: .8em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f0f0f0; border-radius: 3px; padding: 0 .3em; white-space: pre; }
.note { color: #555; }
"""


@dataclass
class Figure:
    title: str
    png: bytes
    caption: str = ""


Cell = str | list[str]  # a list: tokens, each shown in its own box


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, Table]] = field(default_factory=list)  # (summary line, table), folded
    facts: Table | None = None  # shown unfolded, before the figures


def render_html(title: str, sections: Sequence[Section], *, font: str | Path | None = None) -> str:
    """The page; ``title``, notes, captions and cells are escaped, images are data URIs, and the
    CJK font, cut to the page's characters, is a data URI too."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_font_face(title, sections, font)}{STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{e(section.title)}</h2>")
        parts += [f'<p class="note">{e(note)}</p>' for note in section.notes]
        if section.facts is not None:
            parts.append(_table(section.facts))
        for fig in section.figures:
            data = base64.b64encode(fig.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(fig.title)}">')
            parts.append(f"<figcaption><b>{e(fig.title)}</b>{(' — ' + e(fig.caption)) if fig.caption else ''}"
                         "</figcaption></figure>")  # fmt: skip
        for summary, table in section.tables:
            parts.append(f"<details><summary>{e(summary)}</summary>{_table(table)}</details>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _font_face(title: str, sections: Sequence[Section], font: str | Path | None) -> str:
    texts = [title]
    for s in sections:
        texts += [s.title, *s.notes, *(f.title + f.caption for f in s.figures)]
        tables = [t for _, t in s.tables] + ([s.facts] if s.facts is not None else [])
        texts += [summary for summary, _ in s.tables]
        texts += ["".join(t.header) + "".join(_text(c) for row in t.rows for c in row) for t in tables]
    data = font_subset("".join(texts), font)
    if data is None:
        return ""
    url = "data:font/otf;base64," + base64.b64encode(data).decode("ascii")
    return f'@font-face {{ font-family: "moeformer-cjk"; src: url("{url}") format("opentype"); }}\n'


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    rows = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _cell(cell: Cell) -> str:
    if isinstance(cell, list):
        return "<td>" + " ".join(f"<code>{html.escape(token)}</code>" for token in cell) + "</td>"
    number = cell.replace(",", "").replace(".", "", 1).removeprefix("-").isdigit()
    return f'<td class="num">{html.escape(cell)}</td>' if number else f"<td>{html.escape(cell)}</td>"


def _text(cell: Cell) -> str:
    return "".join(cell) if isinstance(cell, list) else cell


def build_report(
    loaded: LoadedModel,
    items: list[Item],
    sentence: Item,
    *,
    data: Path,
    max_tokens: int = 24,
    batch_size: int = 32,
    progress: bool = False,
    font: str | Path | None = None,
) -> str:
    """The HTML of the report (see the module docstring)."""
    sections = [
        _model_section(loaded),
        _training_section(loaded),
        _attention_section(loaded, sentence, max_tokens, font),
        _routing_section(loaded, items, sentence, data, batch_size, progress, font),
    ]
    return render_html(f"moeformer report: {loaded.checkpoint.path}", sections, font=font)


def _model_section(loaded: LoadedModel) -> Section:
    c = loaded.model.config
    moe = getattr(c, "moe", None)
    facts = [
        ["checkpoint", str(loaded.checkpoint.path)],
        ["step", str(loaded.meta.get("step", "?"))],
        ["architecture", f"{type(loaded.model).__name__} ({c.arch})"],
        ["parameters", f"{loaded.model.num_parameters():,}"],
        ["d_model / layers / heads", f"{c.d_model} / {c.n_layers} / {c.attention.n_heads}"],
    ]
    if moe is not None and moe.kind != "dense":
        facts.append(["MoE", _moe_fact(moe)])
    metrics = loaded.meta.get("metrics") or {}
    facts += [[k, f"{v:.4g}"] for k, v in metrics.items() if isinstance(v, (int, float))]
    return Section("Model", facts=Table(["", "value"], facts))


def _moe_fact(moe: Any) -> str:
    """The layer as it routes: a soft layer weighs every expert, whatever its config's top_k."""
    if moe.kind == "soft":
        return f"soft: every token to all {moe.routed_experts} experts (softmax gate)"
    routing = f"top-{moe.routed_top_k}" + (", noisy" if moe.noisy else "") + (f", {moe.score} scores")
    return f"{moe.kind}: {moe.routed_experts} experts, {routing}, {moe.n_shared} shared"


def _training_section(loaded: LoadedModel) -> Section:
    section = Section("Training")
    path = find_log(loaded.checkpoint.path)
    if path is None:
        section.notes.append("No metrics.jsonl found beside this checkpoint: no training curves.")
        return section
    log = read_log(path)
    png = plot_curves(log)
    if png is None:
        section.notes.append(f"{path.name} has no logged rows.")
        return section
    note = f"{len(log.train)} logged training steps and {len(log.evals)} evaluations from {path.name}"
    section.notes.append(note + (f" ({log.skipped} unreadable lines skipped)." if log.skipped else "."))
    section.figures.append(Figure("training curves", png, "expert load is the busiest expert's load over the mean, "
                                  "worst MoE layer, as the trainer logs it"))  # fmt: skip
    load_png = plot_expert_load(log)
    if load_png is not None:
        caption = "each MoE layer's share of the assignments per expert at every logged step, times E: 1 is uniform"
        section.figures.append(Figure("expert load over training", load_png, caption))
    elif log.train and "max_over_mean_load" in log.train[-1]:
        section.notes.append("This run's log predates per-expert loads; only the max/mean ratio is drawn.")
    return section


def _attention_section(loaded: LoadedModel, sentence: Item, max_tokens: int, font: str | Path | None) -> Section:
    maps = attention_maps(loaded, sentence, max_tokens=max_tokens)
    section = Section("Attention")
    shown = sentence.source + (f"  →  {sentence.target}" if sentence.target is not None else "")
    section.notes.append(f"Input (first {max_tokens} tokens per side at most): {shown}")
    for kind, png in attention_pictures(maps, font).items():
        section.figures.append(Figure(KIND_TITLES.get(kind, kind), png, "a row per layer, a column per head"))
    return section


def _routing_section(
    loaded: LoadedModel, items: list[Item], sentence: Item, data: Path, batch_size: int, progress: bool, font: Any
) -> Section:
    section = Section("Expert routing")
    try:
        moe_layers(loaded.model)
    except InspectError:
        section.notes.append("This model has no MoE layer (every FFN is dense): there is no routing to show.")
        return section
    result = routing_result(loaded, items, sentence, batch_size=batch_size, progress=progress, font=font)
    section.notes.append(f"Corpus: {len(items)} items of {data.name}; the per-token picture shows the input above.")
    section.figures += [
        Figure("experts of each token", result.pictures["sentence"], "each cell lists the experts, best first"),
        Figure("expert load", result.pictures["load"], "share of the assignments times E: 1 is a uniform load"),
        Figure("routing measures", result.pictures["measures"],
               "entropy and mutual information in nats; shared share in [0, 1]"),
    ]  # fmt: skip
    section.tables.append(("routing measures per layer (table)", _measures_table(result.summaries)))
    for s in result.summaries:
        section.tables.append((f"{s['layer']}: the tokens each expert is most specific to", _experts_table(s)))
    return section


def _measures_table(summaries: list[dict[str, Any]]) -> Table:
    keys = ["tokens", "router_entropy", "load_entropy", "max_entropy", "shared_share", "mi_token", "mi_script",
            "mi_side", "dropped_fraction"]  # fmt: skip
    rows = [[s["layer"]] + [_fmt(s[k]) for k in keys] for s in summaries]
    return Table(["layer", *keys], rows)


def _experts_table(summary: dict[str, Any]) -> Table:
    E = summary["n_experts"]
    rows: list[list[Cell]] = [[str(e), _fmt(summary["load"][e] * E), summary["top_tokens"][e]] for e in range(E)]
    return Table(["expert", "load x E", "tokens with the highest PMI (seen at least 3 times)"], rows)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3f}"
