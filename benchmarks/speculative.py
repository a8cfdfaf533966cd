"""Self-speculative decoding with a trained MTP module vs plain greedy decoding, same model, one process.

    python benchmarks/speculative.py [--run runs/mtp-comparison/runs/v3-mtp-seed0] [--batches 1 8]
                                     [--prompt 16] [--new 48] [--prompts 64] [--repeats 5] [--threads 1]

The run is a DecoderLM trained with ``[model.mtp]`` (``examples/mtp_comparison.py`` makes one);
prompts are the first ``--prompt`` tokens of the last ``--prompts`` windows of its own corpus
(held out from training by the pipeline). Timed per call: the whole greedy generation of ``--new``
tokens (prefill included), plain (:func:`greedy_generate`) and speculative
(:func:`speculative_generate`), in turn, ``--repeats`` rounds, median; the tokens are checked
identical. Also timed, one pass each over a cache of the prompt: the main model on 1 and on 2 new
tokens and the MTP module on 1, which bound what speculation can gain: with acceptance a, each
main pass yields 1 + a tokens and costs main(2) + MTP(1 or 2) instead of main(1), so the ideal
speed-up is about (1 + a) * main(1) / (main(2) + MTP(1)). Compare ratios, not absolute times.
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


def _pass_costs(model: torch.nn.Module, prompt: torch.Tensor, repeats: int) -> dict[str, float]:
    """ms of one main pass on 1 and 2 new tokens and one MTP pass on 1, over a cache of ``prompt``."""
    B = prompt.shape[0]
    every = torch.ones(B, dtype=torch.bool)
    cache, drafts = model.new_cache(prompt.shape[1] + 8), model.new_mtp_cache(prompt.shape[1] + 8)
    out = model(prompt, cache=cache, reports=False)
    model.mtp_step(out.residual, prompt, cache=drafts)
    one, two = prompt[:, -1:], prompt[:, -2:]

    def main(tokens: torch.Tensor) -> None:
        model(tokens, cache=cache, reports=False)
        for _ in range(tokens.shape[1]):
            cache.drop_last(every)

    def mtp() -> None:
        model.mtp_step(out.residual[:, -1:], one, cache=drafts)
        drafts.drop_last(every)

    n = repeats * 10
    return {"main1": _median_ms(lambda: main(one), n), "main2": _median_ms(lambda: main(two), n),
            "mtp1": _median_ms(mtp, n)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/mtp-comparison/runs/v3-mtp-seed0"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=64, help="prompts for the acceptance rate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not (args.run / "run.json").exists():
        sys.exit(f"{args.run}: no trained run; make one with: python examples/mtp_comparison.py (or pass --run)")
    from moeformer.checkpoint_io import load_checkpoint
    from moeformer.decode import greedy_generate, speculative_generate

    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.run, which="best")
    model = loaded.model.eval()
    if not len(model.mtp):
        sys.exit(f"{args.run}: this model has no MTP module ([model.mtp]); nothing drafts")
    prompts = _prompts(args.run, loaded.tokenizers.source, args.prompt, args.prompts)
    print(f"# {args.run}: {sum(p.numel() for p in model.parameters()):,} parameters; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    print("| batch | acceptance | plain tokens/s | speculative tokens/s | speed-up | main passes (plain / spec.) "
          "| pass ms: main 1 tok / main 2 tok / MTP 1 tok | ideal speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for batch in args.batches:
            x = prompts[:batch]
            plain = greedy_generate(model, x, max_new_tokens=args.new)
            fast = speculative_generate(model, x, max_new_tokens=args.new)
            if not torch.equal(plain, fast.tokens):
                sys.exit(f"batch {batch}: speculative tokens differ from greedy ones (a bug: please report it)")
            drafted = accepted = 0
            for chunk in prompts.split(batch):
                r = speculative_generate(model, chunk, max_new_tokens=args.new)
                drafted, accepted = drafted + r.drafted, accepted + r.accepted
            a = accepted / max(drafted, 1)
            plain_times, fast_times = [], []
            for _ in range(args.repeats):  # round robin: load changes hit both alike
                plain_times.append(_median_ms(lambda x=x: greedy_generate(model, x, max_new_tokens=args.new), 1))
                fast_times.append(_median_ms(lambda x=x: speculative_generate(model, x, max_new_tokens=args.new), 1))
            t_plain, t_fast = statistics.median(plain_times), statistics.median(fast_times)
            cost = _pass_costs(model, x, args.repeats)
            ideal = (1 + a) * cost["main1"] / (cost["main2"] + cost["mtp1"])
            tokens = batch * args.new
            print(f"| {batch} | {a:.2f} | {1000 * tokens / t_plain:.0f} | {1000 * tokens / t_fast:.0f} "
                  f"| {t_plain / t_fast:.2f}x | {args.new} / {fast.passes + 1} "
                  f"| {cost['main1']:.2f} / {cost['main2']:.2f} / {cost['mtp1']:.2f} | {ideal:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
