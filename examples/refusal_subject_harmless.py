"""The refusal subjects' false refusals measured on all of harmless_test, not 200 prompts (issue 15).

``examples/refusal_subject.py`` scores the first ``--n-eval`` (200) harmless_test prompts, where
the standard error of a rate near 0.05 is ~0.016: too coarse to tell the target (<= 0.05) from
0.06. This scores every prompt of harmless_test that fits the context (greedy, 16 new tokens, the
paper's substring score, as the subject script does) on the fine-tuned subjects of ``--out`` and
writes ``harmless_test_all.json`` there, beside the first-200 rate for comparison.

    python examples/refusal_subject_harmless.py [--out runs/refusal-subject] [--subjects deepseek dense]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from refusal_subject import ROOT, TEMPLATE, fitting, subject_runs
from tqdm import tqdm

from moeformer.publish import write_text
from moeformer.refusal import load_chat_lm
from moeformer.refusal.evaluation import complete
from moeformer.refusal.scoring import score_completions
from moeformer.refusal.subject_data import SubjectData, build_subject_data

NEW_TOKENS = 16  # as refusal_subject.py's --new


def score_subject(run: Path, subject: SubjectData, chunk: int = 500) -> dict:
    """Refusal on every harmless_test prompt that fits, in chunks (progress), and its standard error."""
    lm = load_chat_lm(run, template=TEMPLATE)
    sets, dropped = fitting(lm, subject, lm.model.config.max_seq_len - NEW_TOKENS)
    prompts = sets["harmless_eval"]
    if not prompts:
        raise SystemExit(f"{run}: no harmless_test prompt fits the context of {lm.model.config.max_seq_len} tokens")
    labels: list[bool] = []
    for start in tqdm(range(0, len(prompts), chunk), desc=run.name, unit="chunk"):
        labels += score_completions(complete(lm, prompts[start : start + chunk], max_new_tokens=NEW_TOKENS)).labels
    n, rate = len(labels), sum(labels) / len(labels)
    return {
        "prompts": n,
        "refused": sum(labels),
        "rate": rate,
        "standard_error": math.sqrt(rate * (1 - rate) / n),
        "first_200_rate": sum(labels[:200]) / min(200, n),
        "dropped_too_long": dropped["harmless_eval"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "refusal-subject")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subjects", nargs="+", default=["deepseek", "dense"])
    args = parser.parse_args()
    runs = subject_runs(args.out, args.subjects, args.seed)
    missing = [str(r) for r in runs.values() if not (r / "summary.json").exists()]
    if missing:
        raise SystemExit(f"no fine-tuned subject at {', '.join(missing)}: run examples/refusal_subject.py first")
    subject = build_subject_data(args.data / "refusal")
    results = {}
    for name, run in runs.items():
        began = time.monotonic()
        results[name] = {**score_subject(run, subject), "seconds": round(time.monotonic() - began, 1)}
        r = results[name]
        print(f"{name}: {r['refused']} of {r['prompts']} harmless_test prompts refused, {r['rate']:.4f} "
              f"+- {r['standard_error']:.4f} (first 200: {r['first_200_rate']:.3f})")  # fmt: skip
    write_text(args.out / "harmless_test_all.json", json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
