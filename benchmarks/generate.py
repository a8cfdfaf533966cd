"""Greedy decoding with the KV cache: moeformer's ``greedy_generate`` vs transformers' ``generate``.

    python benchmarks/generate.py [--models dense deepseek] [--batches 1 8] [--prompt 32] [--new 64]
                                  [--vocab 8192] [--repeats 5] [--threads N] [--compile] [--prepared]
                                  [--append BENCHMARKS.md]

Both models are ``preset("lm-small")`` DecoderLMs (d 384, 6 layers, GQA 6/2, SwiGLU d_ff 1024) built
with a fixed seed: ``dense``, and ``deepseek``, whose FFNs are DeepSeekMoE layers (the segmentation
of a top-2 of 8 layer of hidden d_ff / 2 with granularity 4 and 1 shared expert: 31 routed
experts of 128, top-7, + 1 shared of 128; ``moeformer.moe.segment_experts``). Each is exported with
``moeformer.interop.convert.export_hf`` into a temporary directory and loaded back with
``AutoModelForCausalLM.from_pretrained``, so both libraries run the SAME weights in float32.

Timed per call: the whole generation of ``--new`` tokens after a ``--prompt``-token random prompt
(prefill included), greedy; transformers with ``do_sample=False``, ``max_new_tokens`` =
``min_new_tokens`` = ``--new`` and no EOS. Implementations run round robin (one call each, in
turn, ``--repeats`` rounds, median), in one process, so a change in the machine's load hits all
alike; compare ratios, not absolute times. ``--compile`` adds ``greedy_generate(compile=True)``
(its first call, which compiles, is left out of the timing and reported below the table).
``--prepared`` adds the same calls on the model from ``prepare_for_decoding(model, batch)``
(each product in its fastest layout for the batch, chosen by timing; prepared once per model and
batch before the timed calls, as a compile is; its time and choices are reported below the table),
and a floor: the prepared model's matrix products for the same number of steps and nothing else
(no prompt, attention, norms or argmax), the step time these kernels cannot go below.
Generated tokens are compared with transformers': the table says whether they are identical.
``--threads`` sets torch's intra-op threads (default: torch's own choice, the core count).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from markdown_log import append_table


def build_lm(kind: str, vocab: int) -> torch.nn.Module:
    """The lm-small DecoderLM of ``kind`` ("dense" or "deepseek"), seed 0, eval mode."""
    from moeformer import build_model, preset
    from moeformer.moe import segment_experts

    overrides: dict = {"vocab_size": vocab}
    if kind == "deepseek":
        seg = segment_experts(n_experts=8, top_k=2, d_ff=512, granularity=4, n_shared=1)
        overrides["moe"] = {"kind": "deepseek", **seg}
    elif kind != "dense":
        raise SystemExit(f"--models: unknown {kind!r}; allowed: dense, deepseek")
    torch.manual_seed(0)
    return build_model(preset("lm-small", **overrides)).eval()


def load_hf(model: torch.nn.Module, folder: str) -> torch.nn.Module:
    """``model`` exported to ``folder`` and loaded back as a transformers model (float32, eval)."""
    from transformers import AutoModelForCausalLM

    from moeformer.interop.convert import export_hf

    export_hf(model, folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # never stop early: every call makes --new tokens
    hf.generation_config.pad_token_id = 0
    return hf


def runners(
    model: torch.nn.Module,
    hf: torch.nn.Module,
    new: int,
    compiled: bool,
    prepared: torch.nn.Module | None,
    batch: int,
) -> dict[str, Callable]:
    """Implementation name -> function of the prompt (B, T) returning the new tokens (B, new).
    ``prepared``: the model from ``prepare_for_decoding`` for ``batch`` (its rows and the floor's
    are added; the floor returns no tokens)."""
    from moeformer.decode.greedy import greedy_generate

    def ours(prompt: torch.Tensor) -> torch.Tensor:
        return greedy_generate(model, prompt, max_new_tokens=new)

    def theirs(prompt: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
            )
        return out[:, prompt.shape[1] :]

    out = {"transformers generate": theirs, "moeformer greedy_generate": ours}
    if compiled:

        def ours_compiled(prompt: torch.Tensor) -> torch.Tensor:
            return greedy_generate(model, prompt, max_new_tokens=new, compile=True)

        out["moeformer greedy_generate compile=True"] = ours_compiled
    if prepared is not None:
        out["moeformer prepared greedy_generate"] = lambda p: greedy_generate(prepared, p, max_new_tokens=new)
        if compiled:
            out["moeformer prepared greedy_generate compile=True"] = lambda p: greedy_generate(
                prepared, p, max_new_tokens=new, compile=True
            )
        out[FLOOR] = products_floor(prepared, batch, new)
    return out


FLOOR = "floor: the prepared model's matrix products alone"


def products_floor(prepared: torch.nn.Module, batch: int, new: int) -> Callable:
    """``new`` decoding steps' matrix products and nothing else: each linear of ``prepared`` once
    at ``batch`` rows, each MoE layer's experts (the kernel the preparation chose) once on a random
    routing of ``batch`` tokens. No prompt, attention, norms or sampling: what a step cannot go below
    with these kernels."""
    from moeformer.decode.prepared import PreparedLinear

    calls: list[Callable[[], object]] = []
    inside_experts: set[int] = set()
    for layer in prepared.modules():
        experts, router = getattr(layer, "experts", None), getattr(layer, "router", None)
        if experts is None or router is None:
            continue
        inside_experts.update(id(m) for m in experts.modules())
        E, D, K = router.n_experts, router.weight.shape[1], router.top_k
        x, index, weights = torch.randn(batch, D), torch.rand(batch, E).argsort(-1)[:, :K], torch.rand(batch, K)
        calls.append(functools.partial(experts, x, index, weights))
    for m in prepared.modules():
        if isinstance(m, PreparedLinear) and id(m) not in inside_experts:
            calls.append(functools.partial(m, torch.randn(batch, m.in_features)))

    @torch.no_grad()
    def floor(prompt: torch.Tensor) -> None:
        for _ in range(new):
            for call in calls:
                call()

    return floor


def _timed(fn: Callable, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(prompt)
    return time.perf_counter() - start


def bench_model(kind: str, args: argparse.Namespace, folder: str, notes: list[str]) -> list[str]:
    """Table rows for one model: every batch size, every implementation (compile times go to ``notes``)."""
    model = build_lm(kind, args.vocab)
    hf = load_hf(model, folder)
    rows = []
    for batch in args.batches:
        prompt = torch.randint(1, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        prepared = None
        if args.prepared:
            from moeformer.decode.prepared import prepare_for_decoding

            prepared, plan = prepare_for_decoding(model, batch)
            notes.append(f"{kind} prepared for {plan.summary()}")
        impls = runners(model, hf, args.new, args.compile, prepared, batch)
        reference = None
        same: dict[str, bool | None] = {FLOOR: None}
        for name, fn in impls.items():  # warm-up (and compilation), and the tokens to compare
            start = time.perf_counter()
            tokens = fn(prompt)
            if name.endswith("compile=True"):
                seconds = time.perf_counter() - start
                notes.append(f"{kind} batch {batch}: first call of {name} (compiles) {seconds:.1f} s")
            if name == FLOOR:
                continue
            reference = tokens if reference is None else reference
            same[name] = tokens.shape == (batch, args.new) and torch.equal(tokens, reference)
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.repeats):  # round robin
            for name, fn in impls.items():
                times[name].append(_timed(fn, prompt))
        base = statistics.median(times["transformers generate"])
        for name in impls:
            t = statistics.median(times[name])
            rows.append(
                f"| {kind} | {batch} | {name} | {t * 1e3:.0f} | {batch * args.new / t:.0f} | {base / t:.2f}x | "
                f"{'-' if same[name] is None else 'yes' if same[name] else 'NO'} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["dense", "deepseek"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="add the compiled decode step's rows")
    parser.add_argument("--prepared", action="store_true", help="add rows for the model prepared for decoding")
    parser.add_argument("--append", help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    header = (
        f"Greedy generation, lm-small (d 384, 6 layers, GQA 6/2), vocab {args.vocab}, prompt {args.prompt}, "
        f"{args.new} new tokens, float32; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(header, file=sys.stderr)
    lines = [
        header,
        "",
        "| model | batch | implementation | ms (median) | tokens/s | vs transformers | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            lines += bench_model(kind, args, f"{tmp}/{kind}", notes)
    table = "\n".join(lines + ([""] + notes if notes else []))
    print(table)
    if args.append:
        append_table(args.append, table)


if __name__ == "__main__":
    main()
