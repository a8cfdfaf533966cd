"""What drawing found that a user should know, said once, instead of warnings on their terminal.

matplotlib reports a character no font can draw with one ``UserWarning`` per glyph ("Glyph 27721
(...) missing from font(s) DejaVu Sans."), and :func:`~moeformer.inspect.fonts.plot_style` warns
(:class:`~moeformer.inspect.fonts.CJKFontWarning`) once per picture when no Chinese font exists.
Both are one font problem: :func:`collecting_notes` records every warning raised inside its block
and turns them into :class:`Notes`, which the commands return and the command line prints once.
Warnings that say nothing to a user (matplotlib widening a one-point axis) are dropped; any other
warning becomes a note of its own, so nothing is lost.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from moeformer.inspect.fonts import FONT_PACKAGE, CJKFontWarning

_GLYPH = re.compile(r"^Glyph (\d+) \(.*\) missing from (?:current )?font\(s\) (.*?)\.?$")
# matplotlib widening an axis of one point or one step: the picture is right, there is nothing to do.
_HARMLESS = ("Attempting to set identical", "makes transformation singular")
_SHOWN = 20  # missing characters listed in the note; the rest are counted


@dataclass
class Notes:
    """The font problem (characters that show as boxes, no CJK font) and any other warning, once each."""

    missing: dict[str, str] = field(default_factory=dict)  # character -> the font(s) that lacked it
    no_cjk_font: bool = False
    other: list[str] = field(default_factory=list)

    def add(self, message: warnings.WarningMessage) -> None:
        text = str(message.message)
        glyph = _GLYPH.match(text)
        if glyph:
            self.missing.setdefault(chr(int(glyph.group(1))), glyph.group(2))
        elif issubclass(message.category, CJKFontWarning):
            self.no_cjk_font = True
        elif not any(h in text for h in _HARMLESS) and text not in self.other:
            self.other.append(text)

    def messages(self) -> list[str]:
        """One line for the font problem (if any), then one per other warning."""
        out = [self._font_message()] if self.missing or self.no_cjk_font else []
        return out + self.other

    def _font_message(self) -> str:
        parts = []
        if self.missing:
            chars = list(self.missing)  # in the order drawn
            shown = " ".join(chars[:_SHOWN]) + (f" and {len(chars) - _SHOWN} more" if len(chars) > _SHOWN else "")
            fonts = sorted(set(self.missing.values()))
            parts.append(f"{len(chars)} characters have no glyph in the font(s) used ({', '.join(fonts)}) and show "
                         f"as boxes in the pictures: {shown}")  # fmt: skip
        if self.no_cjk_font:
            parts.append(f"no font with Chinese glyphs was found; install one with `pip install 'moeformer[inspect]'` "
                         f"(Noto Sans SC, package {FONT_PACKAGE}) or a system CJK font (Debian: apt-get install "
                         "fonts-noto-cjk)")  # fmt: skip
        else:
            parts.append("pass --font FILE with a font that has them")
        return "; ".join(parts)


@contextmanager
def collecting_notes(notes: Notes) -> Iterator[Notes]:
    """Record every warning raised inside the block into ``notes`` instead of showing it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # each glyph and each picture, so none is lost to the registry
        try:
            yield notes
        finally:
            for message in caught:
                notes.add(message)
