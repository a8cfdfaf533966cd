"""Attention backends and KV-cache decoding, timed in one run (ratios matter, not seconds).

    python benchmarks/attention.py [--device cpu|cuda] [--dtype float32|bfloat16]

Table 1: multi-head attention forward+backward, the readable reference ("reference") against
torch's fused kernel ("sdpa"), both through moeformer's MultiHeadAttention, and torch's own
nn.MultiheadAttention as the external reference.
Table 2: greedy generation of N tokens with a DecoderLM, with the KV cache against re-running the
full prefix at every step (the floor the cache must beat).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from moeformer import preset
from moeformer.layers.attention import MultiHeadAttention
from moeformer.models.decoder import DecoderLM


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_table(device: str, dtype: torch.dtype, repeats: int) -> None:
    B, T, D, H = 8, 256, 512, 8
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    rows = []
    torch_mha = torch.nn.MultiheadAttention(D, H, batch_first=True, device=device, dtype=dtype)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T, device=device, dtype=dtype)

    def run_torch() -> None:
        torch_mha(x, x, x, attn_mask=causal, need_weights=False)[0].sum().backward()

    rows.append(("nn.MultiheadAttention (torch)", timed(run_torch, repeats, device)))
    for backend in ("sdpa", "reference"):
        mha = MultiHeadAttention(D, H, backend=backend).to(device, dtype)

        def run(mha: MultiHeadAttention = mha) -> None:
            mha(x, x, x, is_causal=True).output.sum().backward()

        rows.append((f"moeformer MultiHeadAttention, {backend}", timed(run, repeats, device)))
    base = rows[0][1]
    print(f"\nCausal self-attention fwd+bwd, B={B} T={T} d={D} heads={H}, {dtype}, {device}")
    print(f"| {'implementation':40} | {'ms':>8} | {'vs torch':>8} |\n|{'-' * 42}|{'-' * 10}|{'-' * 10}|")
    for name, t in rows:
        print(f"| {name:40} | {t * 1e3:8.2f} | {t / base:7.2f}x |")


def generation_table(device: str, dtype: torch.dtype, repeats: int) -> None:
    torch.manual_seed(0)
    model = DecoderLM(preset("lm-small", vocab_size=8000)).to(device, dtype).eval()
    prompt = torch.randint(0, 8000, (4, 32), device=device)
    n_new = 64

    @torch.no_grad()
    def with_cache() -> None:
        cache = model.new_cache()
        ids = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
        for _ in range(n_new - 1):
            ids = model(ids, cache=cache).logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def without_cache() -> None:
        seq = prompt
        for _ in range(n_new):
            nxt = model(seq).logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)

    t_cache, t_full = timed(with_cache, repeats, device), timed(without_cache, repeats, device)
    print(f"\nGreedy generation, lm-small (d=384, 6 layers, GQA 6/2), batch 4, prompt 32, {n_new} new tokens")
    print(f"| {'method':40} | {'ms':>8} | {'tokens/s':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, t in (("full forward every step (floor)", t_full), ("KV cache", t_cache)):
        print(f"| {name:40} | {t * 1e3:8.1f} | {4 * n_new / t:9.0f} | {t_full / t:7.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    attention_table(args.device, dtype, args.repeats)
    generation_table(args.device, dtype, args.repeats)


if __name__ == "__main__":
    main()
