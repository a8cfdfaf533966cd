"""The three commands behind ``moeformer inspect attention|routing`` and ``moeformer report``.

Each checks its inputs (data file, model kind) and its output directory before the long part,
computes, and publishes ``out`` as one directory (:func:`moeformer.publish.staged_dir`: built in
a temporary sibling, swapped in whole; an existing ``out`` is replaced only with ``force`` and
only when this project wrote it, see :mod:`moeformer.results`):

    inspect_attention -> attention.npz, one PNG grid per attention kind
    inspect_routing   -> routing.json, routing.npz, routing_sentence.png, routing_load.png,
                         routing_measures.png
    write_report      -> report.html (every picture inlined; opens from disk, no server)

Warnings raised while drawing (a character no font has, no Chinese font) are returned as
``Written.notes``, each said once, for the caller to show (see :mod:`moeformer.inspect.notes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moeformer.inference import load_model
from moeformer.inspect.attention import attention_maps, sentence_item
from moeformer.inspect.corpus import InspectError, Item, check_data_file, example_item, read_items
from moeformer.inspect.files import npz_bytes
from moeformer.inspect.notes import Notes, collecting_notes
from moeformer.inspect.pictures import attention_pictures, routing_result
from moeformer.inspect.report import build_report
from moeformer.inspect.routing import moe_layers
from moeformer.publish import staged_dir
from moeformer.results import check_output

# Tokens per side drawn by `inspect attention` unless told: a grid of 32 x 32 cells per head keeps
# every label readable; the whole sentence (up to max_seq_len) once drew an 11,748 x 8,800 px PNG.
DEFAULT_MAX_TOKENS = 32


@dataclass
class Written:
    """What a command wrote, the sentence it looked at, and what the user should know about it."""

    files: list[Path] = field(default_factory=list)
    item: Item | None = None
    notes: list[str] = field(default_factory=list)  # e.g. characters that show as boxes; each once


def _publish(out: str | Path, files: dict[str, bytes], *, force: bool) -> list[Path]:
    """Write ``files`` (name -> bytes) as the directory ``out``, all or nothing."""
    with staged_dir(out, force=force) as tmp:  # files in it are fsynced when it is published
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return [Path(out) / name for name in files]


def inspect_attention(
    checkpoint: str | Path,
    text: str,
    out: str | Path,
    *,
    target: str | None = None,
    which: str = "best",
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    font: str | Path | None = None,
    force: bool = False,
) -> Written:
    """Attention maps of ``text`` (and ``target``, else the model's greedy translation), cut to
    ``max_tokens`` per side (None: up to the model's max_seq_len)."""
    if not text.strip():
        raise InspectError("the text is empty: give a sentence with --text")
    if max_tokens is not None and max_tokens < 1:
        raise InspectError(f"--max-tokens must be >= 1, got {max_tokens}")
    check_output(out, force=force, source=checkpoint)
    loaded = load_model(checkpoint, which=which)
    item = sentence_item(loaded, text, target)
    maps = attention_maps(loaded, item, max_tokens=max_tokens)
    files = {"attention.npz": npz_bytes(maps.to_arrays())}
    with collecting_notes(Notes()) as notes:
        files |= {f"{kind.replace('.', '_')}.png": png for kind, png in attention_pictures(maps, font).items()}
    return Written(_publish(out, files, force=force), item, notes.messages())


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
    force: bool = False,
) -> Written:
    """Routing of every MoE layer over ``data``; the per-token picture shows ``text`` or a median-length item."""
    check_data_file(data)
    _check_sentence(text, target)
    check_output(out, force=force, source=checkpoint)
    loaded = load_model(checkpoint, which=which)
    moe_layers(loaded.model)  # a dense model fails here, before the corpus is read
    items = read_items(data, loaded.model.config.arch, limit=limit)
    sentence = sentence_item(loaded, text, target) if text else example_item(items)
    with collecting_notes(Notes()) as notes:
        result = routing_result(loaded, items, sentence, batch_size=batch_size, progress=progress, font=font)
    info = {"checkpoint": str(loaded.checkpoint.path), "data": str(data), "items": len(items),
            "sentence": {"source": sentence.source, "target": sentence.target}, "layers": result.summaries}  # fmt: skip
    files = {
        "routing.json": json.dumps(info, ensure_ascii=False, indent=1).encode("utf-8"),
        "routing.npz": npz_bytes(result.arrays),
        **{f"routing_{name}.png": png for name, png in result.pictures.items()},
    }
    return Written(_publish(out, files, force=force), sentence, notes.messages())


def _check_sentence(text: str | None, target: str | None) -> None:
    """A target belongs to a --text; without one the sentence (and its target) come from the data."""
    if target is not None and text is None:
        raise InspectError("--target is the translation of --text: give --text too, or neither (the pictures then "
                           "show a median-length item of --data with its own target)")  # fmt: skip
    if text is not None and not text.strip():
        raise InspectError("the text is empty: give a sentence with --text, or leave --text out")


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
    force: bool = False,
) -> Written:
    """One self-contained HTML page: the model, its training curves, attention maps and routing."""
    check_data_file(data)
    _check_sentence(text, target)
    if max_tokens < 1:
        raise InspectError(f"--max-tokens must be >= 1, got {max_tokens}")
    check_output(out, force=force, source=checkpoint)
    loaded = load_model(checkpoint, which=which)
    items = read_items(data, loaded.model.config.arch, limit=limit)
    sentence = sentence_item(loaded, text, target) if text else example_item(items)
    with collecting_notes(Notes()) as notes:
        html = build_report(
            loaded, items, sentence, data=Path(data), max_tokens=max_tokens, batch_size=batch_size,
            progress=progress, font=font,
        )  # fmt: skip
    return Written(_publish(out, {"report.html": html.encode("utf-8")}, force=force), sentence, notes.messages())
