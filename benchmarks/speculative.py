"""Self-speculative decoding with trained MTP modules vs plain greedy decoding, same model, one process.

    python benchmarks/speculative.py [--run runs/mtp-comparison/runs/v3-mtp-seed0] [--batches 1 8]
                                     [--drafts 1 2] [--prompt 16] [--new 48] [--prompts 64]
                                     [--repeats 5] [--threads 1]

The run is a DecoderLM trained with ``[model.mtp]`` (``examples/mtp_comparison.py`` makes one);
prompts are the first ``--prompt`` tokens of the last ``--prompts`` windows of its own corpus
(held out from training by the pipeline). Timed per call: the whole greedy generation of ``--new``
tokens (prefill included), plain (:func:`greedy_generate`) and speculative
(:func:`speculative_generate`) with each ``--drafts`` count K (up to the model's MTP depth), in
turn, ``--repeats`` rounds, median; the tokens are checked identical. Also timed, one pass each
over a cache of the prompt: the main model on 1 and on K + 1 new tokens and each MTP module on 1,
which bound what speculation can gain: a main pass that yields t tokens on average costs
main(K + 1) + MTP_1(1) + ... + MTP_K(1) instead of t plain passes, so the ideal speed-up is about
t * main(1) / (main(K + 1) + sum MTP_k(1)). Compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def _prompts(run: Path, tokenizer: object, length: int, count: int) -> torch.Tensor:
    config = json.loads((run / "run.json").read_text())["config"]["data"]
    text = Path(config["path"]).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.encode(text[-200_000:]), dtype=torch.long)  # type: ignore[attr-defined]
    window = config["seq_len"] + 1
    usable = ids[len(ids) % window :].view(-1, window)[-count:]
    return usable[:, :length]


def _pass_costs(model: torch.nn.Module, prompt: torch.Tensor, K: int, repeats: int) -> dict[str, float]:
    """ms of one main pass on 1 and on K + 1 new tokens, and of MTP modules 1 ... K on one each,
    over a cache of ``prompt``."""
    B, P = prompt.shape
    keep = torch.zeros(B, dtype=torch.long)
    cache = model.new_cache(P + K + 1)
    out = model(prompt, cache=cache, reports=False)

    def main(tokens: torch.Tensor) -> None:
        model(tokens, cache=cache, reports=False)
        cache.forget_last(tokens.shape[1], keep)

    def mtp() -> None:  # one new position through each module, as the chain drafts
        for k, drafts in enumerate(caches, start=1):
            model.mtp_step(out.residual[:, -1:], prompt[:, -1:], cache=drafts, depth=k)
            drafts.forget_last(1, keep)

    caches = [model.new_mtp_cache(P + 1, depth=k) for k in range(1, K + 1)]
    for k, drafts in enumerate(caches, start=1):
        model.mtp_step(out.residual, prompt, cache=drafts, depth=k)
    n = repeats * 10
    return {"main1": _median_ms(lambda: main(prompt[:, -1:]), n),
            "mainK": _median_ms(lambda: main(prompt[:, -K - 1 :]), n), "mtp": _median_ms(mtp, n)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/mtp-comparison/runs/v3-mtp-seed0"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--drafts", type=int, nargs="+", help="drafts per main pass (default: 1 ... MTP depth)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=64, help="prompts for the acceptance rate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not (args.run / "run.json").exists():
        sys.exit(f"{args.run}: no trained run; make one with: python examples/mtp_comparison.py (or pass --run)")
    from moeformer.checkpoint_io import load_checkpoint
    from moeformer.decode import greedy_generate

    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.run, which="best")
    model = loaded.model.eval()
    depth = len(model.mtp)
    if not depth:
        sys.exit(f"{args.run}: this model has no MTP module ([model.mtp]); nothing drafts")
    drafts = args.drafts or list(range(1, depth + 1))
    if not all(1 <= k <= depth for k in drafts):
        sys.exit(f"--drafts {drafts}: this model's MTP depth is {depth}, so 1 to {depth} drafts per pass")
    prompts = _prompts(args.run, loaded.tokenizers.source, args.prompt, args.prompts)
    print(f"# {args.run}: {sum(p.numel() for p in model.parameters()):,} parameters, MTP depth {depth}; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s)")  # fmt: skip
    print("| batch | drafts per pass | acceptance (by depth) | tokens per main pass | plain tokens/s "
          "| speculative tokens/s | speed-up | pass ms: main 1 tok / main K+1 tok / MTP 1..K "
          "| ideal speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for batch in args.batches:
            x = prompts[:batch]
            plain = greedy_generate(model, x, max_new_tokens=args.new)
            for K in drafts:
                _row(model, prompts, x, plain, K, args)


def _row(model: torch.nn.Module, prompts: torch.Tensor, x: torch.Tensor, plain: torch.Tensor, K: int,
         args: argparse.Namespace) -> None:  # fmt: skip
    from moeformer.decode import greedy_generate, speculative_generate

    batch = x.shape[0]
    fast = speculative_generate(model, x, max_new_tokens=args.new, draft_tokens=K)
    if not torch.equal(plain, fast.tokens):
        sys.exit(f"batch {batch}, {K} drafts: speculative tokens differ from greedy ones (a bug: please report it)")
    drafted, accepted, passes, chunks = [0] * K, [0] * K, 0, prompts.split(batch)
    for chunk in chunks:
        r = speculative_generate(model, chunk, max_new_tokens=args.new, draft_tokens=K)
        drafted = [a + b for a, b in zip(drafted, r.drafted_at, strict=True)]
        accepted = [a + b for a, b in zip(accepted, r.accepted_at, strict=True)]
        passes += r.passes + 1  # the prompt's pass gives the first token
    a = sum(accepted) / max(sum(drafted), 1)
    by_depth = " / ".join(f"{x / max(d, 1):.2f}" for x, d in zip(accepted, drafted, strict=True))
    per_pass = len(chunks) * args.new / passes  # new tokens per row per main pass, the prompt's included
    plain_times, fast_times = [], []
    for _ in range(args.repeats):  # round robin: load changes hit both alike
        plain_times.append(_median_ms(lambda: greedy_generate(model, x, max_new_tokens=args.new), 1))
        fast_times.append(
            _median_ms(lambda: speculative_generate(model, x, max_new_tokens=args.new, draft_tokens=K), 1)
        )
    t_plain, t_fast = statistics.median(plain_times), statistics.median(fast_times)
    cost = _pass_costs(model, x, K, args.repeats)
    ideal = per_pass * cost["main1"] / (cost["mainK"] + cost["mtp"])
    tokens = batch * args.new
    print(f"| {batch} | {K} | {a:.2f} ({by_depth}) | {per_pass:.2f} | {1000 * tokens / t_plain:.0f} "
          f"| {1000 * tokens / t_fast:.0f} | {t_plain / t_fast:.2f}x "
          f"| {cost['main1']:.2f} / {cost['mainK']:.2f} / {cost['mtp']:.2f} | {ideal:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
