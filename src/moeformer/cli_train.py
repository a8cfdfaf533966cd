"""Command line for training (`moeformer demo`, `moeformer train`): parses, calls the library, prints.

Training commands report on stderr what happened beside the results (the data report, warnings,
a taken-over stale lock), and exit with 130 / 143 after a Ctrl-C / SIGTERM that saved a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moeformer.demo import DEMO_STEPS


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _demo(args: argparse.Namespace) -> int:
    from moeformer.demo import run_demo
    from moeformer.train.run import TrainingInterrupted

    try:
        report = run_demo(
            corpus=args.corpus,
            data=args.data,
            data_root=os.environ.get("MOEFORMER_DATA"),  # the folder of the real corpora, as in the tests
            minutes=args.minutes,
            steps=args.steps,
            run_dir=Path(args.out),
            progress=not args.quiet,
            echo=_say,
        )
    except TrainingInterrupted as stop:
        _say(str(stop))
        return stop.exit_code
    print(report)
    return 0


def _train(args: argparse.Namespace) -> int:
    from moeformer.train.run import TrainingInterrupted, run_training
    from moeformer.train.rundir import RunDirError

    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        print(f"moeformer: error: --resume {args.resume} continues that run in its own directory; "
              f"--out {args.out} cannot move it (copy the run directory first)", file=sys.stderr)  # fmt: skip
        return 2
    if not args.config and not args.resume:
        print("moeformer: error: train needs a CONFIG file (or --resume RUN_DIR)", file=sys.stderr)
        return 2
    config = _train_config(args)
    run_dir = Path(args.resume or args.out or Path("runs") / Path(args.config).stem)
    try:
        outcome = run_training(config, run_dir, resume=args.resume is not None, force=args.force,
                               progress=not args.quiet, echo=_say)  # fmt: skip
    except TrainingInterrupted as stop:
        if stop.main:
            _say(str(stop))
        return stop.exit_code
    except RunDirError as err:
        print(f"moeformer: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say(f"interrupted outside the training loop; the checkpoints in {run_dir} are as the last save left them")
        return 130
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


def _train_config(args: argparse.Namespace):  # noqa: ANN202
    from moeformer.config import load_config
    from moeformer.train.run import resume_config

    if args.config:
        return load_config(args.config, args.set)
    return resume_config(Path(args.resume), args.set)


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
    demo.add_argument(
        "--steps", type=int, help=f"training updates (default {DEMO_STEPS}: the same model on every machine)"
    )
    demo.add_argument(
        "--minutes", type=float, help="train for this long instead (results then depend on the machine; default: off)"
    )
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    train = sub.add_parser(
        "train",
        help="train a model from a TOML config, or continue a run (Ctrl-C saves a checkpoint and stops)",
    )
    train.add_argument(
        "config", nargs="?", help="the TOML config; optional with --resume (the run's own config is used)"
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.moe.top_k=2 (repeatable; default: none)",
    )
    train.add_argument("--out", help="run directory (default runs/CONFIG_NAME); must be empty unless --force")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint (default: new run)"
    )
    train.add_argument(
        "--force", action="store_true", help="start afresh in a run directory that holds a run, deleting it"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=_train)
