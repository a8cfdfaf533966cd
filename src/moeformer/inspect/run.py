"""The three commands behind ``moeformer inspect attention|routing`` and ``moeformer report``.

Each checks its inputs (data file, model kind) before the long part, computes, and writes its
files atomically into ``out`` (created if missing; files of the same name are replaced):

    inspect_attention -> attention.npz, one PNG grid per attention kind
    inspect_routing   -> routing.json, routing.npz, routing_sentence.png, routing_load.png,
                         routing_measures.png
    write_report      -> report.html (every picture inlined; opens from disk, no server)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moeformer.inference import load_model
from moeformer.inspect.attention import attention_maps, sentence_item
from moeformer.inspect.corpus import InspectError, Item, check_data_file, example_item, read_items
from moeformer.inspect.files import write_bytes, write_npz, write_text
from moeformer.inspect.pictures import attention_pictures, routing_result
from moeformer.inspect.report import build_report
from moeformer.inspect.routing import moe_layers


@dataclass
class Written:
    """What a command wrote, and the sentence it looked at."""

    files: list[Path] = field(default_factory=list)
    item: Item | None = None


def inspect_attention(
    checkpoint: str | Path,
    text: str,
    out: str | Path,
    *,
    target: str | None = None,
    which: str = "best",
    max_tokens: int | None = None,
    font: str | Path | None = None,
) -> Written:
    """Attention maps of ``text`` (and ``target``, else the model's greedy translation)."""
    if not text.strip():
        raise InspectError("the text is empty: give a sentence with --text")
    loaded = load_model(checkpoint, which=which)
    item = sentence_item(loaded, text, target)
    maps = attention_maps(loaded, item, max_tokens=max_tokens)
    out = _out_dir(out)
    written = Written([write_npz(out / "attention.npz", maps.to_arrays())], item)
    for kind, png in attention_pictures(maps, font).items():
        written.files.append(write_bytes(out / f"{kind.replace('.', '_')}.png", png))
    return written


def inspect_routing(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    which: str = "best",
    limit: int | None = 1000,
    batch_size: int = 32,
    text: str | None = None,
    target: str | None = None,
    progress: bool = False,
    font: str | Path | None = None,
) -> Written:
    """Routing of every MoE layer over ``data``; the per-token picture shows ``text`` or a median-length item."""
    check_data_file(data)
    loaded = load_model(checkpoint, which=which)
    moe_layers(loaded.model)  # a dense model fails here, before the corpus is read
    items = read_items(data, loaded.model.config.arch, limit=limit)
    sentence = sentence_item(loaded, text, target) if text else example_item(items)
    result = routing_result(loaded, items, sentence, batch_size=batch_size, progress=progress, font=font)
    out = _out_dir(out)
    info = {"checkpoint": str(loaded.checkpoint.path), "data": str(data), "items": len(items),
            "sentence": {"source": sentence.source, "target": sentence.target}, "layers": result.summaries}  # fmt: skip
    written = Written(
        [
            write_text(out / "routing.json", json.dumps(info, ensure_ascii=False, indent=1)),
            write_npz(out / "routing.npz", result.arrays),
        ],
        sentence,
    )
    for name, png in result.pictures.items():
        written.files.append(write_bytes(out / f"routing_{name}.png", png))
    return written


def _out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InspectError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_report(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    which: str = "best",
    limit: int | None = 1000,
    batch_size: int = 32,
    text: str | None = None,
    target: str | None = None,
    max_tokens: int = 24,
    progress: bool = False,
    font: str | Path | None = None,
) -> Written:
    """One self-contained HTML page: the model, its training curves, attention maps and routing."""
    check_data_file(data)
    loaded = load_model(checkpoint, which=which)
    items = read_items(data, loaded.model.config.arch, limit=limit)
    sentence = sentence_item(loaded, text, target) if text else example_item(items)
    html = build_report(
        loaded, items, sentence, data=Path(data), max_tokens=max_tokens, batch_size=batch_size,
        progress=progress, font=font,
    )  # fmt: skip
    return Written([write_text(_out_dir(out) / "report.html", html)], sentence)
