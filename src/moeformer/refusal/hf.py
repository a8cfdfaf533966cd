"""Hugging Face ``transformers`` causal LMs (Llama, Qwen2, Gemma, Mistral, Mixtral, Qwen2/3-MoE,
DeepSeek-V2/V3, ...) as :class:`~moeformer.refusal.lm.ChatLM`, used directly: no conversion.

These families share one layout: ``model.model.embed_tokens``, ``model.model.layers[i]`` with a
``self_attn`` whose ``o_proj`` writes to the residual stream and an ``mlp`` whose ``down_proj``
(dense), ``experts.down_proj`` (transformers 5 stores routed experts as one (E, d_model, h)
tensor) and ``shared_expert(s).down_proj`` do, then ``model.model.norm``. Writers are found by
those names (plus ``w2``, ``out_proj``, ``fc2`` of older or other layouts); whatever is missed
is caught by the residual check after orthogonalization.

``transformers`` is an optional dependency: ``pip install 'moeformer[hf]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moeformer.refusal.lm import ChatLM, PromptBatch, PromptFormat, RefusalError, Site, WriterWeight

_OUT_MODULES = ("o_proj", "down_proj", "w2", "out_proj", "dense_4h_to_h", "fc2")
_ATTN = ("self_attn", "attn", "attention")
_MLP = ("mlp", "block_sparse_moe", "feed_forward")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise RefusalError(
            "Hugging Face models need the transformers package: pip install 'moeformer[hf]'"
        ) from None
    return transformers


def load_hf(path: str | Path, *, template: str | None = None, dtype: str = "float32", device: str = "cpu") -> HFChatLM:
    """A local transformers checkpoint (config.json + weights + tokenizer) as a ChatLM.

    template: a prompt template with ``{instruction}`` for tokenizers without a chat template;
    checked before the weights are read.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RefusalError(f"{path}: not a Hugging Face model directory (no config.json)")
    if dtype not in _DTYPES:
        raise RefusalError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    tf = _transformers()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    prompt_format = _prompt_format(tokenizer, template, path)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).to(device)
    return HFChatLM(model, tokenizer, prompt_format)


def _prompt_format(tokenizer: Any, template: str | None, path: Path) -> PromptFormat:
    if template is not None:
        return PromptFormat.from_template(template)
    if not getattr(tokenizer, "chat_template", None):
        raise RefusalError(
            f"{path}: the tokenizer has no chat template; give one with --template, e.g. "
            "'User: {instruction}\\nAssistant:'"
        )
    return PromptFormat.from_chat_template(
        lambda text: tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    )


class HFChatLM(ChatLM):
    def __init__(self, model: nn.Module, tokenizer: Any, prompt_format: PromptFormat) -> None:
        self.tokenizer = tokenizer
        self.family = model.config.model_type
        self._base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        if not hasattr(self._base, "layers") or not hasattr(self._base, "norm"):
            raise RefusalError(f"{type(model).__name__}: expected model.model.layers and model.model.norm")
        super().__init__(model, prompt_format)

    @property
    def n_layers(self) -> int:
        return len(self._base.layers)

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

    def encode(self, text: str, *, special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def forward_logits(self, batch: PromptBatch) -> Tensor:
        real = (~batch.padding_mask).long()  # transformers' attention_mask: 1 at real tokens
        positions = (real.cumsum(-1) - 1).clamp(min=0)  # left padding keeps positions from 0
        out = self.model(input_ids=batch.ids, attention_mask=real, position_ids=positions, use_cache=False)
        return out.logits.float()

    def generate_ids(self, batch: PromptBatch, max_new_tokens: int) -> list[list[int]]:
        tf = _transformers()
        eos = self.tokenizer.eos_token_id
        config = tf.GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id, eos_token_id=eos
        )
        real = (~batch.padding_mask).long()  # transformers' attention_mask: 1 at real tokens
        out = self.model.generate(input_ids=batch.ids, attention_mask=real, generation_config=config)
        rows = out[:, batch.ids.shape[1] :].tolist()
        return [row[: row.index(eos)] if eos in row else row for row in rows]

    def layer_sites(self) -> list[Site]:
        return [Site(layer, "input") for layer in self._base.layers]

    def final_site(self) -> Site:
        return Site(self._base.norm, "input")

    def writer_sites(self) -> list[Site]:
        sites = []
        for i, layer in enumerate(self._base.layers):
            for names in (_ATTN, _MLP):
                sites.append(Site(_child(layer, names, i), "output"))
        return sites

    def writer_weights(self) -> list[WriterWeight]:
        weights = [WriterWeight("model.embed_tokens.weight", self.model.get_input_embeddings().weight, -1)]
        for i, layer in enumerate(self._base.layers):
            for name, param in layer.named_parameters():
                axis = writer_axis(f"layers.{i}.{name}", tuple(param.shape), self.d_model)
                if axis is not None:
                    weights.append(WriterWeight(f"model.layers.{i}.{name}", param, axis))
        return weights

    def router_sites(self) -> dict[int, tuple[nn.Module, int]]:
        sites = {}
        for i, layer in enumerate(self._base.layers):
            mlp = next((getattr(layer, n) for n in _MLP if hasattr(layer, n)), None)
            gate = getattr(mlp, "gate", None)
            if gate is not None and hasattr(mlp, "experts") and hasattr(gate, "weight"):
                sites[i] = (gate, gate.weight.shape[0])
        return sites

    @staticmethod
    def router_choices(output: object) -> Tensor:
        if isinstance(output, tuple) and len(output) == 3:  # transformers 5 routers: (logits, weights, indices)
            return output[2]
        raise RefusalError("this router does not return (logits, weights, indices); routing cannot be read")

    def untie_embeddings(self) -> bool:
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
            return False
        head.weight = nn.Parameter(embed.weight.detach().clone())
        self.model.config.tie_word_embeddings = False
        text_config = self.model.config.get_text_config()
        text_config.tie_word_embeddings = False
        return True

    def save(self, out: Path) -> None:
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


def writer_axis(name: str, shape: tuple[int, ...], d_model: int) -> int | None:
    """The axis of size d_model along which a layer tensor named ``name`` writes to the residual stream,
    or None for a tensor that does not write to it.

    ``name`` is the tensor's name inside (or below) a decoder layer, in memory or in a checkpoint:
    ``self_attn.o_proj.weight`` and ``mlp.experts.3.down_proj.weight`` are nn.Linear (out, in) with
    a bias (out,): axis 0; fused experts ``experts.down_proj`` (E, D, h) as transformers 5 holds them,
    or (E, h, D) as some checkpoints store them: the axis of size D (the first of the two if h == D).
    """
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1 and parts[-2] in _OUT_MODULES:
        axis = 0  # nn.Linear keeps (out, in) and a bias of (out,)
    elif parts[-1] in ("down_proj", "down_proj_bias", "w2"):  # fused experts: (E, D, h), or (E, h, D)
        axis = len(shape) - 2 if len(shape) >= 2 and shape[-2] == d_model else len(shape) - 1
    else:
        return None
    if shape[axis] != d_model:
        raise RefusalError(f"{name}: shape {shape} has no axis of size {d_model}")
    return axis


def _child(layer: nn.Module, names: tuple[str, ...], index: int) -> nn.Module:
    for name in names:
        if hasattr(layer, name):
            return getattr(layer, name)
    raise RefusalError(f"layer {index} ({type(layer).__name__}) has none of the sublayers {names}")
