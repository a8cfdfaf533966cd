"""This project's :class:`~moeformer.models.decoder.DecoderLM` (dense or MoE) as a ChatLM.

The residual stream is read and edited at the blocks' hook points (``resid_pre``, ``attn_out``,
``mlp_out``); the writers are the token (and learned position) embeddings, each attention's
``out_proj``, each FFN's ``down_proj``, each MoE layer's ``experts.down_proj`` (E, d_model, h)
and ``shared_experts.down_proj``. Weight orthogonalization needs a pre-norm model: in a post-norm
block the norm after the residual sum mixes the direction back in.

Our checkpoints carry no chat template, so a prompt template with ``{instruction}`` is required.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor, nn

from moeformer.checkpoint_io import SIDECAR, WEIGHTS
from moeformer.data.tokenizer import Tokenizer, TokenizerPair
from moeformer.decode.sampling import sample_generate
from moeformer.interop.checkpoints import load_model
from moeformer.model_config import config_to_dict
from moeformer.models.decoder import DecoderLM
from moeformer.moe.layer import MoELayer
from moeformer.refusal.lm import ChatLM, PromptBatch, PromptFormat, RefusalError, Site, WriterWeight


def load_native(path: str | Path, *, template: str | None, device: str = "cpu") -> NativeChatLM:
    """A moeformer DecoderLM checkpoint (or run directory) with a prompt template."""
    if template is None:
        raise RefusalError(
            f"{path}: moeformer checkpoints have no chat template; give one with --template, "
            "e.g. 'User: {instruction}\\nAssistant:'"
        )
    prompt_format = PromptFormat.from_template(template)
    loaded = load_model(path, device=device)
    if not isinstance(loaded.model, DecoderLM):
        raise RefusalError(f"{path}: the refusal method needs a decoder-only model, not {type(loaded.model).__name__}")
    return NativeChatLM(loaded.model, loaded.tokenizers.source, prompt_format, loaded.meta)


class NativeChatLM(ChatLM):
    family = "moeformer"

    def __init__(
        self, model: DecoderLM, tokenizer: Tokenizer, prompt_format: PromptFormat, meta: dict[str, Any] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.meta = copy.deepcopy(meta) if meta else {}
        super().__init__(model, prompt_format)

    @property
    def n_layers(self) -> int:
        return len(self.model.layers)

    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def encode(self, text: str, *, special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text)  # our LMs train on raw text windows: no BOS

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def forward_logits(self, batch: PromptBatch) -> Tensor:
        return self.model(batch.ids, padding_mask=batch.padding_mask).logits.float()

    def generate_ids(self, batch: PromptBatch, max_new_tokens: int) -> list[list[int]]:
        room = self.model.config.max_seq_len - batch.ids.shape[1]
        if room < 1:
            raise RefusalError(f"prompts of {batch.ids.shape[1]} tokens leave no room in max_seq_len")
        eos = self.tokenizer.eos_id
        out = sample_generate(
            self.model, batch.ids, padding_mask=batch.padding_mask, max_new_tokens=min(max_new_tokens, room),
            temperature=0.0, eos_id=eos,
        )  # fmt: skip
        rows = out.tolist()
        return [row[: row.index(eos)] if eos in row else row for row in rows]

    def layer_sites(self) -> list[Site]:
        return [Site(block.resid_pre, "output") for block in self.model.layers]

    def final_site(self) -> Site:
        return Site(self.model.norm, "input")

    def writer_sites(self) -> list[Site]:
        return [Site(hook, "output") for block in self.model.layers for hook in (block.attn_out, block.mlp_out)]

    def writer_weights(self) -> list[WriterWeight]:
        config = self.model.config
        if config.norm_position != "pre":
            raise RefusalError(
                "weight orthogonalization needs a pre-norm model: the post-norm residual sum is normalised, "
                "which mixes the direction back in; use hook-based ablation"
            )
        if config.position == "sinusoidal":
            raise RefusalError(
                "sinusoidal positions add fixed vectors with a component along the direction; weight "
                "orthogonalization cannot remove it (use rope, learned or none), use hook-based ablation"
            )
        weights = []
        for name, param in self.model.named_parameters():
            parts = name.split(".")
            if name in ("embedding.embed.weight", "embedding.positions.weight"):
                axis = -1
            elif parts[0] == "layers" and parts[-2] in ("out_proj", "down_proj") and parts[-1] in ("weight", "bias"):
                axis = 0
            elif parts[0] == "layers" and parts[-1] in ("down_proj", "down_bias"):  # experts: (E, D, h), (E, D)
                axis = 1
            else:
                continue
            weights.append(WriterWeight(name, param, axis))
        return weights

    def router_sites(self) -> dict[int, tuple[nn.Module, int]]:
        return {
            i: (block.ffn.router, block.ffn.router.n_experts)
            for i, block in enumerate(self.model.layers)
            if isinstance(block.ffn, MoELayer)
        }

    @staticmethod
    def router_choices(output: object) -> Tensor:
        return output.index  # Routing: (tokens, k) expert ids

    def untie_embeddings(self) -> bool:
        embed = self.model.embedding.embed.weight
        if self.model.lm_head.weight is not embed:
            return False
        self.model.lm_head.weight = nn.Parameter(embed.detach().clone())
        self.model.config = dataclasses.replace(self.model.config, tie_embeddings=False)
        return True

    def save(self, out: Path) -> None:
        """A checkpoint directory that ``moeformer generate`` / ``load_model`` read like any other."""
        out.mkdir(parents=True, exist_ok=True)
        meta = copy.deepcopy(self.meta)
        meta.setdefault("config", {})["model"] = config_to_dict(self.model.config)
        meta.setdefault("tokenizer", TokenizerPair(self.tokenizer, self.tokenizer).to_dict())
        meta.setdefault("step", 0)
        safetensors.torch.save_model(self.model, str(out / WEIGHTS))
        (out / SIDECAR).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
