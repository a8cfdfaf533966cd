"""Command line for training (`moeformer demo`, `moeformer train`): parses, calls the library, prints.

Training commands report on stderr what happened beside the results (the data report, warnings,
a taken-over stale lock), and exit with 130 / 143 after a Ctrl-C / SIGTERM that saved a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _demo(args: argparse.Namespace) -> int:
    from moeformer.demo import run_demo

    print(
        run_demo(
            corpus=args.corpus,
            data=args.data,
            minutes=args.minutes,
            steps=args.steps,
            run_dir=Path(args.out),
            progress=not args.quiet,
        )
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from moeformer.config import load_config
    from moeformer.train.run import run_training

    config = load_config(args.config, args.set)
    run_dir = Path(args.resume or args.out or Path("runs") / Path(args.config).stem)
    outcome = run_training(config, run_dir, resume=args.resume is not None, progress=not args.quiet)
    if not outcome.main:  # under torchrun, rank 0 reports
        return 0
    print(f"trained {outcome.result.step} steps ({outcome.result.stopped_by}); run directory: {run_dir}")
    if outcome.result.best:
        print("best validation: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.result.best.items()))
    if outcome.test_scores:
        print("test: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.test_scores.items()))
        for src, ref, hyp in outcome.samples:
            print(f"  {src!r} -> {hyp!r} (reference {ref!r})")
    return 0


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    """Add `demo` and `train` to the top-level subparsers of the moeformer CLI."""
    demo = sub.add_parser("demo", help="train a small DeepSeekMoE translator and show BLEU and translations")
    demo.add_argument(
        "--corpus",
        choices=["synthetic", "tatoeba"],
        default="synthetic",
        help="synthetic: generated English->Chinese numbers and dates (offline); tatoeba: real pairs",
    )
    demo.add_argument("--data", help="path to the Tatoeba cmn.txt (default: ../shared/data/cmn-eng/cmn.txt)")
    demo.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    demo.add_argument("--steps", type=int, help="stop after this many updates instead (e.g. for a quick check)")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    train = sub.add_parser("train", help="train a model from a TOML config")
    train.add_argument("config")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.moe.top_k=2 (repeatable)",
    )
    train.add_argument("--out", help="run directory (default runs/CONFIG_NAME)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(run=_train)
