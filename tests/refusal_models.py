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
    if family == "mistral":
        return t.MistralConfig(**common)
    if family in ("gemma", "gemma2"):
        config = t.GemmaConfig if family == "gemma" else t.Gemma2Config
        return config(**common, head_dim=8)
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(**common, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                decoder_sparse_step=1, head_dim=8)  # fmt: skip
    if family == "deepseek_v2":
        common["num_key_value_heads"] = 4
        return t.DeepseekV2Config(
            **common, moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=4, n_group=1, topk_group=1,
            num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, topk_method="greedy",
        )  # fmt: skip
    if family == "deepseek_v3":
        common["num_key_value_heads"] = 4
        return t.DeepseekV3Config(
            **common, moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=8, n_group=2,
            topk_group=1, num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )  # fmt: skip
    raise ValueError(family)


HF_FAMILIES = ("llama", "qwen2", "mistral", "gemma", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


def hf_model(family: str, seed: int = 0, **extra):
    tok = tokenizer()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, len(tok), **extra))
    return model.float().eval(), tok


def hf_chat_lm(family: str, seed: int = 0, **extra) -> HFChatLM:
    model, tok = hf_model(family, seed, **extra)
    def render(text: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    fmt = PromptFormat.from_chat_template(render)
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
        moe = {"kind": "deepseek", "n_experts": 6, "top_k": 2, "expert_hidden": 16, "n_shared": 1}
        overrides.setdefault("moe", moe)
    config = preset("lm-tiny", vocab_size=tok.vocab_size, n_layers=3, max_seq_len=128, **overrides)
    return NativeChatLM(DecoderLM(config).eval(), tok, PromptFormat.from_template("U: {instruction}\nA:"))


OTHER = ["how", "do", "i", "make", "a", "the", "tell", "explain", "write", "about"]
PLANTED_HARMFUL = [f"{a} {b} bomb" for a in OTHER for b in OTHER]
PLANTED_HARMLESS = [f"{a} {b} cake" for a in OTHER for b in OTHER]  # same words, other marker


@torch.no_grad()
def planted_llama(seed: int = 0) -> tuple[HFChatLM, torch.Tensor]:
    """A 3-layer Llama whose residual stream differs between the two planted prompt sets only along
    a known unit vector v, and which says "sorry" when v is present: a toy refusal direction.

    All embeddings have norm 1, so the first RMSNorm scales every token alike; layer 0's queries
    are zero, so its attention averages (identity value and output maps) the normalised prefix;
    every other writer is zero. The markers "bomb" / "cake" are u cos(t) +- v sin(t), u orthogonal
    to v: the eoi positions of paired prompts differ by a multiple of v from layer 1 on. The
    output row of "sorry" is 20 v, so its logit has the sign of the prompt's v component.
    """
    lm = hf_chat_lm("llama", seed, num_key_value_heads=4)
    model, tok, D = lm.model, lm.tokenizer, lm.d_model
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(tok), D, generator=g)
    emb /= emb.norm(dim=-1, keepdim=True)
    v = torch.randn(D, generator=g)
    v /= v.norm()
    u = torch.randn(D, generator=g)
    u -= (u @ v) * v
    u /= u.norm()
    bomb, cake, sorry = (tok.convert_tokens_to_ids(w) for w in ("bomb", "cake", "sorry"))
    emb[bomb], emb[cake] = 0.6 * u + 0.8 * v, 0.6 * u - 0.8 * v
    model.get_input_embeddings().weight.copy_(emb)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn.q_proj.weight.zero_()
        attn.v_proj.weight.copy_(torch.eye(D))
        attn.o_proj.weight.copy_(torch.eye(D) if i == 0 else torch.zeros(D, D))
        layer.mlp.down_proj.weight.zero_()
    head = torch.randn(len(tok), D, generator=g) * 0.3
    head -= (head @ v)[:, None] * v  # only "sorry" reads v
    head[sorry] = 20 * v
    model.lm_head.weight.copy_(head)
    return lm, v
