"""Two translation runs on the same test split, compared pair by pair: is the BLEU gap more than noise?

One seed per model gives one BLEU each, and on 1,000 short Tatoeba sentences a few points can
come from which sentences happen to be in the test split. Paired bootstrap resampling (Koehn
2004; sacrebleu's ``PairedTest``, ``test_type="bs"``) resamples the test sentences, scores both
systems on each resample and reports each system's mean and 95% interval and the p-value of the
difference. Both runs must share the data config (same split); the test pairs are rebuilt by the
training pipeline, decoded greedily as the end-of-run test score is, and scored against the
references in the run's ``data.zh_script`` (simplified for the Tatoeba configs) and as given.

    python examples/translation_paired.py runs/tatoeba-en-zh-topk-v2 runs/tatoeba-en-zh-expert-choice-v2
        [--which best|latest] [--samples 1000] [--out runs/paired-topk-vs-ec.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from moeformer.checkpoint_io import load_checkpoint
from moeformer.data.chinese import convert_script
from moeformer.data.config import DataConfig
from moeformer.evaluate.metrics import bleu_tokenizer
from moeformer.evaluate.translation import evaluate_translation
from moeformer.publish import write_text
from moeformer.train.pipeline import prepare
from moeformer.train.run import resume_config


def test_hypotheses(run: Path, which: str) -> tuple[list[tuple[str, str]], list[str], DataConfig]:
    """The run's test pairs (as the pipeline splits them), its checkpoint's greedy outputs and its data config."""
    loaded = load_checkpoint(run, which=which)
    config = resume_config(run)
    pairs = prepare(config, tokenizers=loaded.tokenizers).test_pairs
    result = evaluate_translation(loaded.model.eval(), loaded.tokenizers, pairs, target_lang=config.data.target_lang,
                                  zh_script=config.data.zh_script, overlong="cut")  # fmt: skip
    return pairs, result.hypotheses, config.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs=2, help="two run directories of the same data config")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--which", choices=["best", "latest"], default="best",
                        help="each run's checkpoint: best by validation loss (the run's own test score), or its last")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    (pairs, first, data), (other_pairs, second, other_data) = (test_hypotheses(r, args.which) for r in args.runs)
    if pairs != other_pairs or data != other_data:
        raise SystemExit("the two runs do not share their data config and test split: nothing to pair")
    given = [t for _, t in pairs]
    references = {"as given": given}
    if data.zh_script != "keep":
        references[data.zh_script] = [convert_script(t, data.zh_script) for t in given]
    names = [r.name for r in args.runs]
    report: dict[str, dict] = {}
    print(f"{len(pairs)} test pairs; {args.which} checkpoints; paired bootstrap, {args.samples} resamples; "
          f"baseline: {names[0]}")
    print("| references | metric | " + " | ".join(names) + " | p (difference) |")
    print("|---|---|---|---|---|")
    for label, refs in references.items():
        metrics = {"BLEU": BLEU(tokenize=bleu_tokenizer(data.target_lang)), "chrF": CHRF()}
        test = PairedTest(list(zip(names, (first, second), strict=True)), metrics, [refs], test_type="bs",
                          n_samples=args.samples)  # fmt: skip
        _, scores = test()
        for metric, results in scores.items():
            if metric == "System":  # the names, in order
                continue
            cells = [f"{r.score:.1f} ({r.mean:.1f} +- {r.ci:.1f})" for r in results]
            p = results[1].p_value
            print(f"| {label} | {metric} | {' | '.join(cells)} | {p:.3f} |")
            report.setdefault(label, {})[metric] = {
                name: {"score": r.score, "mean": float(r.mean), "ci95": float(r.ci)}
                for name, r in zip(names, results, strict=True)
            } | {"p_value": p}
    if args.out:
        summary = {"runs": [str(r) for r in args.runs], "which": args.which, "samples": args.samples,
                   "pairs": len(pairs), "results": report}  # fmt: skip
        write_text(args.out, json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
