"""Command line: parses arguments, calls the library, prints. No model logic lives here."""

from __future__ import annotations

import argparse
import sys

from moeformer.config import ConfigError


def _demo(args: argparse.Namespace) -> int:
    from moeformer.demo import run_demo

    report = run_demo(steps=args.steps, seed=args.seed, progress=not args.quiet)
    print(f"Seq2SeqTransformer: {report.config_summary}, {report.parameters:,} parameters")
    print("\nUntrained (random weights):")
    for src, hyp in report.before:
        print(f"  {src!r:28} -> {hyp!r}")
    print(f"\nTrained {len(report.losses)} steps: loss {report.losses[0]:.3f} -> {report.losses[-1]:.3f}")
    for src, hyp in report.after:
        print(f"  {src!r:28} -> {hyp!r}")
    print("\nTokens per routed expert in the last training step:")
    for layer, load in report.expert_load.items():
        print(f"  {layer:10} " + " ".join(f"{int(n):4d}" for n in load))
    return 0


def _info(args: argparse.Namespace) -> int:
    from moeformer.config import load_config
    from moeformer.models import build_model

    config = load_config(args.config).model
    model = build_model(config)
    print(model)
    print(f"\n{type(model).__name__}: {model.num_parameters():,} parameters")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from moeformer.presets import PRESETS

    for name, values in PRESETS.items():
        att = values["attention"]
        print(
            f"{name:18} {values['arch']:8} d_model={values['d_model']:<5} layers={values['n_layers']:<3} "
            f"heads={att['n_heads']:<3} kv_heads={att.get('n_kv_heads', att['n_heads']):<3} "
            f"d_ff={values['ffn']['d_ff']:<5} {values['norm_position']}-{values['norm']} "
            f"{values['position']} {values['ffn']['activation']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build, train briefly and run a small English->Chinese Transformer")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    info = sub.add_parser("info", help="build the model of a TOML config and print its layers and size")
    info.add_argument("config")
    info.set_defaults(run=_info)
    presets = sub.add_parser("presets", help="list the named model sizes")
    presets.set_defaults(run=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        print("moeformer: error: --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"moeformer: config error: {err}", file=sys.stderr)
        return 2
