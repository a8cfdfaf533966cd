"""The command line's surface is frozen: every subcommand, its positionals and options.

``tests/data/cli_surface.json`` holds, for each command path (``translate``, ``refusal extract``,
...), every argument's flags, dest, nargs, type, default, choices and whether it is required. A
flag that disappears, is renamed or changes its default fails here. After a change that is *meant*
to alter the surface, regenerate the snapshot and commit it with the change::

    MOEFORMER_REGEN_CLI_SURFACE=1 .venv/bin/python -m pytest tests/test_cli_surface.py

Regeneration is never on by default.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from moeformer.cli import build_parser

SNAPSHOT = Path(__file__).parent / "data" / "cli_surface.json"
REGEN = os.environ.get("MOEFORMER_REGEN_CLI_SURFACE") == "1"


def _plain(value: Any) -> Any:
    """A JSON-stable description of a default, type or choice."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value):
        return getattr(value, "__name__", type(value).__name__)
    return repr(value)


def _argument(action: argparse.Action) -> dict[str, Any]:
    return {
        "flags": list(action.option_strings),
        "dest": action.dest,
        "action": type(action).__name__,
        "nargs": _plain(action.nargs),
        "type": _plain(action.type),
        "default": _plain(action.default),
        "choices": _plain(list(action.choices)) if action.choices is not None else None,
        "required": bool(action.required),
    }


def surface(parser: argparse.ArgumentParser, path: str = "") -> dict[str, list[dict[str, Any]]]:
    """Command path -> its arguments (help excluded), walking every level of subcommands."""
    out: dict[str, list[dict[str, Any]]] = {}
    own = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out.update(surface(child, f"{path} {name}".strip()))
            own.append({"subcommands": sorted(action.choices), "dest": action.dest, "required": action.required})
            continue
        own.append(_argument(action))
    out[path or "moeformer"] = own
    return out


def test_cli_surface_matches_the_snapshot():
    current = surface(build_parser())
    if REGEN:
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(json.dumps(dict(sorted(current.items())), indent=1) + "\n")
        pytest.skip(f"regenerated {SNAPSHOT.name}")
    stored = json.loads(SNAPSHOT.read_text())
    assert sorted(current) == sorted(stored), "subcommands added or removed (regenerate the snapshot if meant)"
    for command in stored:
        assert current[command] == stored[command], f"`moeformer {command}`: options changed"


def test_every_subcommand_has_a_handler():
    """Each leaf command sets ``run`` (what main() calls), so a parsed command always does something."""

    def leaves(parser: argparse.ArgumentParser):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield parser
        for action in subs:
            for child in action.choices.values():
                yield from leaves(child)

    for leaf in leaves(build_parser()):
        assert callable(leaf.get_default("run")), leaf.prog
