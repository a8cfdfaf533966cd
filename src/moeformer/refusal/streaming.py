"""Weight orthogonalization of a safetensors checkpoint one shard at a time: models larger than memory.

The edit of :mod:`moeformer.refusal.orthogonalize`, W <- W - r_hat r_hat^T W for every tensor that
writes to the residual stream, touches each tensor on its own, so it needs no model: each shard
of a transformers checkpoint is read, its writer tensors are edited (in float32, stored back in
their own dtype: bf16 stays bf16), it is written to the output, and it is freed before the next
is read. Peak memory is about twice the largest shard (the shard as read, its serialised output,
float32 copies of one tensor at a time), whatever the model's size: 2.3x on a 2 GiB, 11-shard
checkpoint (``benchmarks/abliterate_stream.py``, BENCHMARKS.md). This is what lets a DeepSeek-V3-
sized MoE, whose experts are most of its weights, be edited on a machine far smaller than it.

Which tensors: ``model.embed_tokens.weight`` and, in ``model.layers.{i}`` for i below
``num_hidden_layers``, the ones :func:`moeformer.refusal.hf.writer_axis` names (attention
``o_proj``, dense / per-expert / shared ``down_proj`` or ``w2``, fused 3-D ``experts.down_proj``,
their biases): the same rule as the in-memory edit, so the result equals it (a test, bit for bit).
Layers at or past ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction module, which
transformers does not run) are copied unchanged. A checkpoint without ``lm_head.weight`` has its
output layer tied to the embedding: the original embedding is written as ``lm_head.weight`` beside
it and ``tie_word_embeddings`` set to false, as the in-memory edit unties them.

No model is built, so the residual-stream check of the in-memory path cannot run; instead every
edited tensor is checked as stored: the largest |cos| between r_hat and a vector the tensor can
write (float32 weights: ~1e-7; bf16: ~1e-2, the rounding of the stored weights). Quantised
(float8) writers are refused: dequantise first.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moeformer.publish import MARKER, staged_dir
from moeformer.refusal.edits import (
    Method,
    StrengthKernel,
    check_method,
    edit_vectors,
    projected_direction,
    writer_layer,
)
from moeformer.refusal.hf import writer_axis
from moeformer.refusal.interventions import unit
from moeformer.refusal.lm import RefusalError
from moeformer.refusal.loading import check_output_path
from moeformer.results import check_output

INDEX = "model.safetensors.index.json"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class StreamedEdit:
    edited: list[str]  # names of the tensors changed
    untied: bool  # whether lm_head.weight was written from the original embedding
    shards: int
    largest_shard_bytes: int
    leak: float | None  # largest |cos(r_hat, a vector an edited tensor writes)|, as stored; None with a kernel


def checkpoint_shards(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a transformers checkpoint in order, and its index's weight map (or None)."""
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return list(dict.fromkeys(weight_map.values())), weight_map
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"], None
    found = sorted(p.name for p in path.glob("*.bin")) or sorted(p.name for p in path.iterdir())[:5]
    raise RefusalError(
        f"{path}: no {INDEX} or model.safetensors (found: {', '.join(found) or 'nothing'}); streaming reads "
        "safetensors checkpoints only: convert .bin weights with transformers' save_pretrained first"
    )


def stream_orthogonalize(
    source: str | Path,
    out: str | Path,
    direction: Tensor,
    *,
    method: Method = "orthogonal",
    kernel: StrengthKernel | None = None,
    harmless_mean: Tensor | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> StreamedEdit:
    """Write to ``out`` the checkpoint ``source`` with the ablation of ``direction`` baked in, shard by shard.

    ``method``, ``kernel``, ``harmless_mean``: as for the in-memory edit (:mod:`moeformer.refusal.edits`).

    ``out`` is built beside itself and swapped in when complete (Ctrl-C leaves nothing half written);
    an existing ``out`` is replaced only with ``force`` and only if it is a model this project wrote.
    ``progress`` is called with each shard's name once it is written.
    """
    source, out = Path(source), Path(out)
    config = _read_config(source)
    d_model, n_layers = _text_config(config, "hidden_size"), _text_config(config, "num_hidden_layers")
    check_method(method)
    if tuple(direction.shape) != (d_model,):
        raise RefusalError(f"the direction has shape {tuple(direction.shape)}; {source} has hidden size {d_model}")
    if method == "projected":
        if harmless_mean is None:
            raise RefusalError("the projected method needs the harmless mean at the direction's layer")
        direction = projected_direction(direction, harmless_mean.float())
    r_hat = unit(direction.float())
    shards, weight_map = checkpoint_shards(source)
    check_output_path(source, out)  # before any shard is read
    check_output(out, force=force, source=source, model_output=True)
    untie = not _has_tensor(source, shards, weight_map, HEAD)
    edited: list[str] = []
    leak, largest, head_bytes = 0.0, 0, 0
    with staged_dir(out, force=force) as tmp:
        for shard in shards:
            largest = max(largest, (source / shard).stat().st_size)
            tensors, metadata = _read_shard(source / shard)
            for name in list(tensors):
                axis = _axis(name, tensors[name], d_model, n_layers)
                if axis is None:
                    continue
                if name == EMBED and untie:
                    tensors[HEAD] = tensors[name].clone()
                    head_bytes = tensors[HEAD].numel() * tensors[HEAD].element_size()
                alpha = 1.0 if kernel is None else kernel.alpha(writer_layer(name))
                tensors[name] = _edit(tensors[name], axis, r_hat, name, alpha, method == "norm-preserving")
                if kernel is None:  # a partial edit leaves part of the direction on purpose
                    leak = max(leak, _leak(tensors[name], axis, r_hat))
                edited.append(name)
            save_file(tensors, str(tmp / shard), metadata=metadata)
            del tensors
            if progress is not None:
                progress(shard)
        _copy_rest(source, tmp, shards, head_bytes if untie else 0, weight_map, config)
    return StreamedEdit(edited, head_bytes > 0, len(shards), largest, None if kernel is not None else leak)


def _read_config(source: Path) -> dict:
    if not (source / "config.json").is_file():
        raise RefusalError(f"{source}: not a Hugging Face model directory (no config.json)")
    return json.loads((source / "config.json").read_text(encoding="utf-8"))


def _text_config(config: dict, key: str) -> int:
    value = config.get(key, config.get("text_config", {}).get(key))
    if not isinstance(value, int):
        raise RefusalError(f"config.json has no integer {key!r} (nor text_config.{key})")
    return value


def _has_tensor(source: Path, shards: list[str], weight_map: dict[str, str] | None, name: str) -> bool:
    if weight_map is not None:
        return name in weight_map
    with safe_open(str(source / shards[0]), "pt") as f:
        return name in f.keys()


def _read_shard(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {"format": "pt"}


def _axis(name: str, tensor: Tensor, d_model: int, n_layers: int) -> int | None:
    if name == EMBED:
        return tensor.dim() - 1
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 4 or not parts[2].isdigit() or int(parts[2]) >= n_layers:
        return None  # not a decoder layer's tensor, or an MTP module transformers does not run
    return writer_axis(name, tuple(tensor.shape), d_model)


def _edit(tensor: Tensor, axis: int, r_hat: Tensor, name: str, alpha: float, preserve_norm: bool) -> Tensor:
    """The in-memory edit's arithmetic exactly (orthogonalize_weights), on one tensor."""
    if not tensor.is_floating_point() or tensor.element_size() < 2:
        raise RefusalError(f"{name}: {tensor.dtype} weights cannot be edited in place; dequantise the checkpoint first")
    moved = tensor.movedim(axis, -1)
    edited = edit_vectors(moved, r_hat, alpha=alpha, preserve_norm=preserve_norm)
    return edited.to(tensor.dtype).movedim(-1, axis).contiguous()


def _leak(tensor: Tensor, axis: int, r_hat: Tensor) -> float:
    rows = tensor.movedim(axis, -1).float().reshape(-1, r_hat.numel())
    norms = rows.norm(dim=-1)
    real = norms > 0
    return float(((rows[real] @ r_hat).abs() / norms[real]).max()) if bool(real.any()) else 0.0


def _copy_rest(
    source: Path, tmp: Path, shards: list[str], head_bytes: int, weight_map: dict | None, config: dict
) -> None:
    """Every other file of the checkpoint; config and index updated when the embeddings were untied
    (``head_bytes`` > 0: the size of the lm_head.weight written beside the embedding)."""
    for item in source.iterdir():
        if item.name in shards or item.name in (INDEX, "config.json", MARKER):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    if head_bytes:
        config = {**config, "tie_word_embeddings": False}
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if weight_map is not None:
        index = json.loads((source / INDEX).read_text(encoding="utf-8"))
        if head_bytes:
            index["weight_map"] = {**index["weight_map"], HEAD: index["weight_map"][EMBED]}
            if "total_size" in index.get("metadata", {}):
                index["metadata"]["total_size"] += head_bytes
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
