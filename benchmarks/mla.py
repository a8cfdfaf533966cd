"""Multi-head latent attention (DeepSeek-V2/V3) against MHA and GQA, timed in one run (ratios matter).

    python benchmarks/mla.py [--device cpu|cuda] [--dtype float32|bfloat16] [--append BENCHMARKS.md]

Table 1: a 4-layer DecoderLM of each attention kind at d_model 512, 8 heads: KV-cache bytes per
token (measured from the filled cache, and MLA's formula C + Dr per layer), prefill of a batch
of 256-token prompts and greedy decoding of 32 more tokens with the cache.
Table 2: one attention layer's forward + backward (B=8, T=256): ours against transformers'
DeepseekV3Attention (the external reference, same sizes) and our MHA (the floor MLA is compared
with: it has no compression and no decompression).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from attention import timed  # the same median-of-repeats timer as the attention benchmark

from moeformer.config import model_config_from_dict
from moeformer.models.decoder import DecoderLM

D, H, LAYERS, VOCAB = 512, 8, 4, 4096
MLA = {"kind": "mla", "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64}
KINDS = {
    "MHA (8 K/V heads)": {"n_heads": H},
    "GQA (2 K/V heads)": {"n_heads": H, "n_kv_heads": 2},
    "MLA (C=128, Dr=32)": {"n_heads": H, **MLA},
}


def lm(attention: dict, device: str, dtype: torch.dtype) -> DecoderLM:
    config = model_config_from_dict(
        {
            "arch": "decoder",
            "vocab_size": VOCAB,
            "d_model": D,
            "n_layers": LAYERS,
            "dropout": 0.0,
            "norm": "rmsnorm",
            "norm_position": "pre",
            "position": "rope",
            "max_seq_len": 512,
            "scale_embeddings": False,
            "attention": {"bias": False, **attention},
            "ffn": {"activation": "swiglu", "d_ff": 1376, "bias": False},
        }
    )
    return DecoderLM(config).to(device, dtype).eval()


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        c = layer.self_attn
        tensors = [getattr(c, name, None) for name in ("key", "value", "latent", "rope_key")]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


@torch.no_grad()
def decode_table(device: str, dtype: torch.dtype, repeats: int) -> list[str]:
    B, T, N = 8, 256, 32
    prompt = torch.randint(4, VOCAB, (B, T), device=device)
    lines = [
        f"\nDecoderLM, {LAYERS} layers, d_model={D}, {H} heads, batch {B}: prefill {T} tokens, then {N} greedy "
        f"steps with the cache; {dtype}, {device}",
        f"| {'attention':20} | {'params':>7} | {'cache B/token':>13} | {'vs MHA':>6} | {'prefill ms':>10} "
        f"| {'decode tok/s':>12} | {'vs MHA':>6} |",
        f"|{'-' * 22}|{'-' * 9}|{'-' * 15}|{'-' * 8}|{'-' * 12}|{'-' * 14}|{'-' * 8}|",
    ]
    base_bytes = base_rate = None
    for name, attention in KINDS.items():
        model = lm(attention, device, dtype)

        def prefill(model: DecoderLM = model):
            cache = model.new_cache()
            out = model(prompt, cache=cache)
            return cache, out.logits[:, -1].argmax(-1, keepdim=True)

        def decode(model: DecoderLM = model) -> float:
            cache, token = prefill(model)  # not timed: each repeat decodes from a fresh prefill
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(N):
                token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        cache, _ = prefill()
        per_token = cache_bytes(cache) / (B * T)
        prefill_s = timed(prefill, repeats, device)
        decode(model)  # warm-up
        decode_s = statistics.median(decode(model) for _ in range(repeats))
        rate = B * N / decode_s
        base_bytes = base_bytes or per_token
        base_rate = base_rate or rate
        params = sum(p.numel() for p in model.parameters()) / 1e6
        lines.append(
            f"| {name:20} | {params:6.1f}M | {per_token:13,.0f} | {per_token / base_bytes:5.2f}x | "
            f"{prefill_s * 1e3:10.1f} | {rate:12,.0f} | {rate / base_rate:5.2f}x |"
        )
    itemsize = torch.finfo(dtype).bits // 8
    formula = LAYERS * (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * itemsize
    lines.append(f"MLA formula: layers x (C + Dr) x {itemsize} B = {formula:,} B/token; MHA: layers x 2 x d_model x B")
    return lines


def layer_table(device: str, dtype: torch.dtype, repeats: int) -> list[str]:
    B, T = 8, 256
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    positions = torch.arange(T, device=device).expand(B, T)
    rows = []
    ours = lm(KINDS["MLA (C=128, Dr=32)"], device, dtype)
    rotary = ours.embedding.rotary(positions)
    mla = ours.layers[0].self_attn
    rows.append(("moeformer MultiHeadLatentAttention", lambda: mla(x, x, x, is_causal=True, rotary=rotary)))
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3Attention,
            DeepseekV3RotaryEmbedding,
        )

        hf_config = DeepseekV3Config(
            hidden_size=D,
            num_attention_heads=H,
            num_key_value_heads=H,
            q_lora_rank=None,
            attention_bias=False,
            **{k: v for k, v in MLA.items() if k != "kind"},
        )
        hf_config._attn_implementation = "sdpa"
        theirs = DeepseekV3Attention(hf_config, layer_idx=0).to(device, dtype)
        cos_sin = DeepseekV3RotaryEmbedding(hf_config).to(device)(x, positions)
        rows.insert(0, ("transformers DeepseekV3Attention", lambda: theirs(x, cos_sin, None)[0]))
    except ImportError:
        pass
    mha = lm(KINDS["MHA (8 K/V heads)"], device, dtype).layers[0].self_attn
    mha_rotary = lm(KINDS["MHA (8 K/V heads)"], device, dtype).embedding.rotary(positions)
    rows.append(("moeformer MultiHeadAttention (floor)", lambda: mha(x, x, x, is_causal=True, rotary=mha_rotary)))
    lines = [
        f"\nOne attention layer fwd+bwd, B={B} T={T} d_model={D} heads={H}, causal, {dtype}, {device}",
        f"| {'implementation':38} | {'ms':>8} | {'vs first':>8} |",
        f"|{'-' * 40}|{'-' * 10}|{'-' * 10}|",
    ]
    base = None
    for name, fn in rows:

        def step(fn=fn) -> None:
            out = fn()
            out = out.output if hasattr(out, "output") else out
            out.float().sum().backward()

        t = timed(step, repeats, device)
        base = base or t
        lines.append(f"| {name:38} | {t * 1e3:8.1f} | {t / base:7.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--append", type=Path, help="also append the tables to this Markdown file")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    header = (
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    lines = [header, *decode_table(args.device, dtype, args.repeats), *layer_table(args.device, dtype, args.repeats)]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write(f"\n```\n$ python benchmarks/mla.py --device {args.device} --dtype {args.dtype}\n{text}\n```\n")


if __name__ == "__main__":
    main()
