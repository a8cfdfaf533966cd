"""Using a trained checkpoint: load it, translate sentences, generate text.

loaded = load_model("runs/tatoeba-deepseek")          # its best checkpoint
translate(loaded.model, loaded.tokenizers, ["Are you OK?"], beam_size=4)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeformer.config import model_config_from_dict
from moeformer.data.batching import pad_batch
from moeformer.data.tokenizer import TokenizerPair
from moeformer.decode.beam import beam_translate
from moeformer.decode.greedy import greedy_translate
from moeformer.decode.sampling import sample_generate
from moeformer.models import build_model
from moeformer.train.checkpoint import Checkpoint, CheckpointError, load_weights, read_checkpoint


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode
    tokenizers: TokenizerPair
    checkpoint: Checkpoint

    @property
    def meta(self) -> dict[str, Any]:
        return self.checkpoint.meta


def load_model(path: str | Path, *, which: str = "best", device: str = "cpu") -> LoadedModel:
    """A model and its tokenizers from a checkpoint or run directory, or from a Hugging Face checkpoint
    directory of a family :mod:`moeformer.interop` imports (config.json + safetensors + tokenizer.json);
    errors name the bad file."""
    if _is_hf_directory(Path(path)):
        return _load_hf(Path(path), device)
    ckpt = read_checkpoint(path, which)
    try:
        config = model_config_from_dict(ckpt.meta["config"]["model"])
        tokenizers = TokenizerPair.from_dict(ckpt.meta["tokenizer"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt.path}/checkpoint.json: bad config or tokenizer entry ({err})") from None
    model = build_model(config)
    load_weights(model, ckpt)
    return LoadedModel(model.to(device).eval(), tokenizers, ckpt)


def _is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "checkpoint.json").exists()


def _load_hf(path: Path, device: str) -> LoadedModel:
    """A transformers checkpoint imported as it is, with its own tokenizer (nothing is written)."""
    from moeformer.config import config_to_dict
    from moeformer.data.hub_tokenizer import HubTokenizer
    from moeformer.interop import import_hf

    if not (path / "tokenizer.json").exists():
        raise CheckpointError(f"{path}: a transformers checkpoint without tokenizer.json; nothing can encode text")
    tokenizer = HubTokenizer.from_directory(path)
    model = import_hf(path)
    meta = {"config": {"model": config_to_dict(model.config)}, "step": 0, "converted_from": {"path": str(path)}}
    return LoadedModel(model.to(device).eval(), TokenizerPair(tokenizer, tokenizer), Checkpoint(path, meta))


@torch.no_grad()
def translate(
    model: nn.Module,
    tokenizers: TokenizerPair,
    texts: Sequence[str],
    *,
    beam_size: int = 1,
    batch_size: int = 64,
    max_len: int | None = None,
    length_penalty: float = 0.6,
) -> list[str]:
    """Translations of ``texts`` (greedy when beam_size is 1), in order, batched by length."""
    was_training = model.training
    model.eval()
    limit = model.config.max_seq_len
    max_len = min(max_len or limit, limit)
    encoded = [tokenizers.source.encode(t, eos=True)[:limit] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    tgt = tokenizers.target
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        src, pad = pad_batch([encoded[i] for i in idx], tokenizers.source.pad_id)
        src, pad = src.to(device), pad.to(device)
        if beam_size == 1:
            rows = greedy_translate(
                model, src, src_padding_mask=pad, bos_id=tgt.bos_id, eos_id=tgt.eos_id, max_len=max_len
            ).tolist()
        else:
            rows = beam_translate(
                model,
                src,
                src_padding_mask=pad,
                bos_id=tgt.bos_id,
                eos_id=tgt.eos_id,
                beam_size=beam_size,
                max_len=max_len,
                length_penalty=length_penalty,
            )
        for i, row in zip(idx, rows):
            out[i] = tgt.decode(row)
    model.train(was_training)
    return out


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizers: TokenizerPair,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> str:
    """Continue ``prompt`` with a decoder-only model (sampling; temperature 0 is greedy)."""
    tok = tokenizers.source
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenisation; give at least one character")
    limit = model.config.max_seq_len
    ids = ids[-limit + 1 :] if len(ids) >= limit else ids
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    new = sample_generate(
        model.eval(),
        torch.tensor([ids], device=device),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=tok.eos_id,
        generator=generator,
    )
    return tok.decode(new[0].tolist())
