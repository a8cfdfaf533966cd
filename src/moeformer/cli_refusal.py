"""Command line for the refusal direction (`moeformer refusal ...`): parses, calls moeformer.refusal, prints."""

from __future__ import annotations

import argparse
import json


def _score(args: argparse.Namespace) -> int:
    from moeformer.refusal.scoring import REFUSAL_SUBSTRINGS, load_completions, load_substrings, score_completions

    substrings = load_substrings(args.substrings) if args.substrings else REFUSAL_SUBSTRINGS
    score = score_completions(load_completions(args.file), substrings)
    if args.json:
        print(json.dumps(score.to_dict(), ensure_ascii=False))
    else:
        print(f"refusal score: {score.refusal_score:.3f} ({score.n_refused} of {score.n} completions refuse)")
    return 0


def add_refusal_commands(sub: argparse._SubParsersAction) -> None:
    """Add `refusal` and its subcommands to the top-level subparsers of the moeformer CLI."""
    refusal = sub.add_parser("refusal", help="refusal direction tools (Arditi et al. 2024)")
    commands = refusal.add_subparsers(dest="refusal_command", required=True)

    score = commands.add_parser("score", help="the fraction of completions that contain a refusal phrase")
    score.add_argument("file", metavar="FILE", help='JSON list (or .jsonl) of {"prompt", "response"} objects')
    score.add_argument("--json", action="store_true", help="print one JSON object with each item's label")
    score.add_argument("--substrings", metavar="FILE", help="refusal phrases, one per line (default: the paper's)")
    score.set_defaults(run=_score)
