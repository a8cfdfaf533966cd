"""Command line for looking inside a checkpoint (`moeformer inspect ...`, `moeformer report`): parses, calls
moeformer.inspect, prints what was written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeformer.inspect.run import Written


def _attention(args: argparse.Namespace) -> int:
    from moeformer.inspect.run import inspect_attention

    limit = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
    written = inspect_attention(
        args.checkpoint, args.text, args.out, target=args.target, which=args.which, font=args.font,
        force=args.force, **limit,
    )  # fmt: skip
    _print_written(written)
    return 0


def _routing(args: argparse.Namespace) -> int:
    from moeformer.inspect.run import inspect_routing

    written = inspect_routing(
        args.checkpoint, args.data, args.out, which=args.which, limit=args.limit, batch_size=args.batch_size,
        text=args.text, target=args.target, progress=not args.quiet, font=args.font, force=args.force,
    )  # fmt: skip
    _print_written(written)
    return 0


def _report(args: argparse.Namespace) -> int:
    from moeformer.inspect.run import write_report

    written = write_report(
        args.checkpoint, args.data, args.out, which=args.which, limit=args.limit, batch_size=args.batch_size,
        text=args.text, target=args.target, max_tokens=args.max_tokens, progress=not args.quiet, font=args.font,
        force=args.force,
    )  # fmt: skip
    _print_written(written)
    return 0


def _print_written(written: Written) -> None:
    item = written.item
    if item is not None:
        print(f"input: {item.source}" + (f"  ->  {item.target}" if item.target is not None else ""))
    for path in written.files:
        print(f"wrote {path}")
    for note in written.notes:  # after the files: what is wrong with them, said once
        print(f"moeformer: note: {note}", file=sys.stderr)


def _common(p: argparse.ArgumentParser, *, data: bool) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory or a run directory")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="in a run directory (default best)")
    p.add_argument("--out", required=True, type=Path, help="output directory, written whole (must not exist "
                   "unless --force)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing --out that this tool wrote; any other "
                   "directory is refused")  # fmt: skip
    p.add_argument("--font", metavar="FILE", help="a .ttf/.otf with Chinese glyphs (default: Noto Sans SC, else a "
                   "system CJK font)")  # fmt: skip
    if data:
        p.add_argument("--data", required=True, metavar="FILE", help="TSV/JSONL pairs (translation), or text (LM)")
        p.add_argument("--limit", type=int, default=1000, help="use at most this many pairs / lines, spread evenly "
                       "over the file (default 1000)")  # fmt: skip
        p.add_argument("--batch-size", type=int, default=32, help="items per forward pass (default 32)")
        p.add_argument("--text", help="the sentence for the per-token pictures (default: the median-length item "
                       "of those read from --data, with its own target)")  # fmt: skip
        p.add_argument("--target", help="translation model: the translation of --text, teacher-forced (default: "
                       "the model's greedy translation)")  # fmt: skip
        p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_inspect_commands(sub: argparse._SubParsersAction) -> None:
    """Add `inspect attention|routing` and `report` to the top-level subparsers of the moeformer CLI."""
    inspect = sub.add_parser("inspect", help="attention maps and expert routing of a checkpoint, as PNG + arrays")
    commands = inspect.add_subparsers(dest="inspect_command", required=True)

    att = commands.add_parser("attention", help="every layer and head's attention map for one input")
    _common(att, data=False)
    att.add_argument("--text", required=True, help="the input sentence (the source, for a translation model)")
    att.add_argument("--target", help="translation model: the target, teacher-forced (default: greedy translation)")
    # The default lives in moeformer.inspect.run (DEFAULT_MAX_TOKENS, a test keeps this help in step);
    # importing it here would slow every command's start.
    att.add_argument("--max-tokens", type=int, help="cut each side to this many tokens (default 32)")
    att.set_defaults(run=_attention)

    rt = commands.add_parser("routing", help="which experts each token goes to; load, entropy, specialisation")
    _common(rt, data=True)
    rt.set_defaults(run=_routing)

    rep = sub.add_parser("report", help="one self-contained HTML page: training curves, attention, routing")
    _common(rep, data=True)
    rep.add_argument("--max-tokens", type=int, default=24, help="tokens per side in the attention maps (default 24)")
    rep.set_defaults(run=_report)
