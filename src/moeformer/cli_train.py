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


def _upcycle(args: argparse.Namespace) -> int:
    from moeformer.train.upcycle import moe_overrides, upcycle_checkpoint

    done = upcycle_checkpoint(args.source, args.out, args.to, experts=args.experts, top_k=args.top_k,
                              granularity=args.granularity, shared=args.shared, seed=args.seed,
                              force=args.force)  # fmt: skip
    m = done.moe
    dense, total = done.parameters
    exact = done.gap["max_abs_logit_diff"] < 1e-4
    print(f"upcycled to {m.kind}: {m.n_experts} routed experts of {m.expert_hidden}, top-{m.top_k}"
          f"{f', {m.n_shared} shared' if m.n_shared else ''}; parameters {dense:,} -> {total:,}")  # fmt: skip
    print(f"on a check batch: max |logit difference| {done.gap['max_abs_logit_diff']:.2e}, mean KL "
          f"{done.gap['mean_kl']:.2e} ({'exact at initialisation' if exact else 'not exact: training starts off'})")
    sets = " ".join(f"--set {o}" for o in moe_overrides(m))
    print(f"wrote {done.out}; train it with the dense run's config:\n  moeformer train CONFIG.toml {sets} "
          f"--set train.init_from={done.out}")
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

    up = sub.add_parser("upcycle", help="turn a trained dense checkpoint into an MoE one to continue training")
    up.add_argument("source", metavar="RUN", help="a dense run directory (its best checkpoint) or checkpoint directory")
    up.add_argument("--out", required=True, help="the new checkpoint directory (must not exist unless --force)")
    up.add_argument("--to", required=True, choices=["topk", "deepseek"], help="topk: every expert a copy of the "
                    "FFN (sparse upcycling, exact at initialisation); deepseek: the copies cut into --granularity "
                    "segments with --shared of them always on")  # fmt: skip
    up.add_argument("--experts", type=int, default=8, help="coarse experts, each the FFN's size (default 8)")
    up.add_argument("--top-k", type=int, default=2, help="coarse experts per token (default 2)")
    up.add_argument("--granularity", type=int, default=1, help="deepseek: segments per expert, m (default 1)")
    up.add_argument("--shared", type=int, default=0, help="deepseek: shared pieces K_s (default 0)")
    up.add_argument("--seed", type=int, default=0, help="seed of the new routers' weights (default 0)")
    up.add_argument("--force", action="store_true", help="replace an --out this tool wrote (default: refuse)")
    up.set_defaults(run=_upcycle)
