"""What every moeformer command line parser shares: help that shows defaults, and checked numbers.

:func:`moeformer.cli.build_parser` makes every subparser a :class:`Parser` (``parser_class``), so
options added in any ``cli_*.py`` module show their default without repeating it by hand.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """An option's help gets " (default: X)" unless it mentions a default already.

    Flags (store_true and the like), options without a default (None) and empty lists get
    nothing appended: their help says in words what happens when they are left out.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.nargs == 0:
            return text
        if action.default in (None, argparse.SUPPRESS) or action.default == []:
            return text
        return text + " (default: %(default)s)"


class LayoutFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps the description's lines as written (the top-level overview)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults (see :class:`HelpFormatter`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, or an error that says so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
