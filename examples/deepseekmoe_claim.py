"""DeepSeekMoE's claim at equal compute, tested by steps on a mixed real corpus (issue 20).

The claim (Dai et al. 2024, arXiv 2401.06066, Table 1 and Figure 3): at equal active and total
parameters, fine-grained experts + a shared expert (DeepSeekMoE) beat GShard-style top-2, which
beats a dense FFN of the same active size; the shared expert and finer segmentation each help.

    python examples/deepseekmoe_claim.py [--data ../shared/data] [--out runs/deepseekmoe-claim]
        [--steps 800] [--seeds 0 1 2] [--jobs 2] [--variants dense gshard deepseek ...]

Stages, each resumable (Ctrl-C and run again: finished runs are kept, unfinished ones resume
from their latest checkpoint):
1. corpus: Shakespeare, wikitext-2 (valid + test), Tatoeba's English side and the Alpaca
   instructions of the refusal splits, cut into ~2,000-character chunks and shuffled
   together, so that the held-out windows at the end of the text mix every source.
2. runs: ``moeformer train configs/deepseekmoe-claim.toml --set ...`` for every variant and seed,
   ``--jobs`` at a time with one thread each; budgets are steps, never wall time.
3. analysis (:mod:`deepseekmoe_analysis`): table, curves, paired per-seed differences, routing
   specialisation and the disable-top-experts test, written to ``OUT/results.{json,md}`` and PNGs.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from deepseekmoe_analysis import analyse
from experiment_runs import run_all, train_command

from moeformer.moe.layer import segment_experts
from moeformer.publish import write_text

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "deepseekmoe-claim.toml"
N_COARSE, K_COARSE, COARSE_HIDDEN = 8, 2, 256  # GShard's layer: 8 experts of 256, top-2 (= dense d_ff 512 active)
CHUNK_CHARS = 2000


def _deepseek(m: int, shared: int) -> dict[str, object]:
    """DeepSeekMoE's layer: GShard's segmented m ways, ``shared`` of the m*N pieces always on."""
    s = segment_experts(n_experts=N_COARSE, top_k=K_COARSE, d_ff=COARSE_HIDDEN, granularity=m, n_shared=shared)
    # DeepSeekMoE does not renormalise the chosen gates (its eq. 4-5); GShard's top-2 does
    return {"kind": "deepseek", **s, "normalize": False, "balance_loss": 0.01}


VARIANTS: dict[str, dict[str, object]] = {
    "dense": {},
    "gshard": {
        "kind": "topk",
        "n_experts": N_COARSE,
        "top_k": K_COARSE,
        "expert_hidden": COARSE_HIDDEN,
        "balance_loss": 0.01,
    },  # fmt: skip
    "deepseek": _deepseek(4, 1),  # the paper's configuration: m = 4, one shared expert
    "deepseek-no-shared": _deepseek(4, 0),
    "deepseek-m1": _deepseek(1, 1),
    "deepseek-m2": _deepseek(2, 1),
    "deepseek-m8": _deepseek(8, 1),
}
MAIN = ("dense", "gshard", "deepseek")  # run first: the claim itself; then the ablations


def _chunks(paragraphs: list[str], size: int = CHUNK_CHARS) -> list[str]:
    """Consecutive paragraphs joined into pieces of about ``size`` characters."""
    out, current = [], ""
    for p in paragraphs:
        if current and len(current) + len(p) > size:
            out.append(current)
            current = ""
        current = f"{current}\n{p}" if current else p
    return out + ([current] if current else [])


def _wikitext(text: str) -> list[str]:
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def read_sources(data: Path) -> dict[str, list[str]]:
    """Paragraph lists by source; raises FileNotFoundError naming the first missing file."""
    import json

    paths = {
        "shakespeare": [data / "tinyshakespeare" / "input.txt"],
        "wikitext": [data / "wikitext-2" / "valid.txt", data / "wikitext-2" / "test.txt"],
        "tatoeba_en": [data / "cmn-eng" / "cmn.txt"],
        "alpaca": [data / "refusal" / "splits" / f"harmless_{s}.json" for s in ("train", "val", "test")],
    }
    for path in (p for ps in paths.values() for p in ps):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (--data must be the folder holding {', '.join(paths)}' files)")
    read = {k: [p.read_text(encoding="utf-8") for p in ps] for k, ps in paths.items()}
    return {
        "shakespeare": [p for p in re.split(r"\n\s*\n", read["shakespeare"][0]) if p.strip()],
        "wikitext": [p for t in read["wikitext"] for p in _wikitext(t)],
        "tatoeba_en": [line.split("\t")[0].strip() for line in read["tatoeba_en"][0].splitlines() if "\t" in line],
        "alpaca": [row["instruction"].strip() for t in read["alpaca"] for row in json.loads(t)],
    }


def build_corpus(data: Path, out: Path) -> dict[str, dict[str, int]]:
    """Write the shuffled-chunk corpus to ``out`` (atomically; kept if present). Returns sizes by source."""
    sources = read_sources(data)
    chunks = [(name, c) for name, paras in sources.items() for c in _chunks(paras)]
    random.Random(0).shuffle(chunks)
    sizes = {name: {"chunks": 0, "characters": 0} for name in sources}
    for name, c in chunks:
        sizes[name]["chunks"] += 1
        sizes[name]["characters"] += len(c)
    if not out.exists():
        write_text(out, "\n\n".join(c for _, c in chunks) + "\n")
    return sizes


def run_command(variant: str, seed: int, steps: int, corpus: Path, run_dir: Path) -> list[str]:
    """The ``moeformer train`` command of one run (a fresh run; :func:`experiment_runs.train_one` resumes)."""
    sets = [f"data.path={corpus}", f"train.seed={seed}", f"data.seed={seed}", f"train.steps={steps}"]
    sets += [f"model.moe.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in VARIANTS[variant].items()]
    return train_command(BASE_CONFIG, run_dir, sets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "deepseekmoe-claim")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--analyse-only", action="store_true", help="skip training; analyse the finished runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus.txt"
    sizes = build_corpus(args.data, corpus)
    order = [v for v in MAIN if v in args.variants] + [v for v in args.variants if v not in MAIN]
    jobs = [(v, s) for s in args.seeds for v in order]  # seed-major: whole paired sets first
    if not args.analyse_only:
        runs = [(args.out / "runs" / f"{v}-seed{s}", v, s) for v, s in jobs]
        run_all([(d, run_command(v, s, args.steps, corpus, d)) for d, v, s in runs], args.jobs)
    written = analyse(args.out, order, args.seeds, sizes, VARIANTS)
    print("\n".join(str(p) for p in written))


if __name__ == "__main__":
    main()
