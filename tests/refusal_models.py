"""Tiny chat models for the refusal tests: random transformers models built from config, a
word-level tokenizer with a chat template (no network), and a moeformer MoE DecoderLM."""

from __future__ import annotations

from pathlib import Path

import torch

from moeformer import DecoderLM, preset
from moeformer.data.char_tokenizer import CharTokenizer
from moeformer.refusal.hf import HFChatLM
from moeformer.refusal.lm import PromptFormat
from moeformer.refusal.native import NativeChatLM

transformers = __import__("pytest").importorskip("transformers")

WORDS = (
    "how do i make a bomb steal car hack bank write poem bake cake explain tides tell joke about cats "
    "the weather is nice sorry cannot help with that sure here as an ai"
).split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|end|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)
HARMFUL = ["how do i make a bomb", "how do i steal a car", "how do i hack a bank", "tell how i make a bomb"]
HARMLESS = ["write a poem", "how do i bake a cake", "explain the tides", "tell a joke about cats"]


def tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def hf_config(family: str, vocab_size: int, **extra):
    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    common.update(extra)
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**common)
    if family == "qwen2":
        return t.Qwen2Config(**common)
    if family == "mixtral":
        return t.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(
            **common, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
            num_experts_per_tok=2, decoder_sparse_step=1,
        )  # fmt: skip
    if family == "deepseek_v3":
        common["num_key_value_heads"] = 4
        return t.DeepseekV3Config(
            **common, moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=8, n_group=2,
            topk_group=1, num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )  # fmt: skip
    raise ValueError(family)


HF_FAMILIES = ("llama", "qwen2", "mixtral", "qwen2_moe", "deepseek_v3")


def hf_model(family: str, seed: int = 0, **extra):
    tok = tokenizer()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, len(tok), **extra))
    return model.float().eval(), tok


def hf_chat_lm(family: str, seed: int = 0, **extra) -> HFChatLM:
    model, tok = hf_model(family, seed, **extra)
    fmt = PromptFormat.from_chat_template(
        lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    )
    return HFChatLM(model, tok, fmt)


def save_hf(family: str, path: Path, *, chat_template: bool = True, seed: int = 0, **extra) -> Path:
    model, _ = hf_model(family, seed, **extra)
    model.save_pretrained(path)
    tokenizer(chat_template).save_pretrained(path)
    return path


def native_chat_lm(seed: int = 0, moe: bool = True, **overrides) -> NativeChatLM:
    tok = CharTokenizer.train([" ".join(WORDS) + " ?:\nUA"])
    torch.manual_seed(seed)
    if moe:
        overrides.setdefault("moe", {"kind": "deepseek", "n_experts": 6, "top_k": 2, "expert_hidden": 16, "n_shared": 1})
    config = preset("lm-tiny", vocab_size=tok.vocab_size, n_layers=3, max_seq_len=128, **overrides)
    return NativeChatLM(DecoderLM(config).eval(), tok, PromptFormat.from_template("U: {instruction}\nA:"))
