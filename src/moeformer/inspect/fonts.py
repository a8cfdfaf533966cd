"""A font with Chinese glyphs for matplotlib, found and registered at plot time.

matplotlib's default DejaVu Sans has no Han characters: without help every Chinese token label
becomes an empty box and matplotlib warns "Glyph ... missing from font(s)". The font we use is
**Noto Sans SC** (Google/Adobe's Source Han Sans, the Simplified Chinese subset, SIL Open Font
License 1.1), shipped on PyPI by the data-only package ``pylopdf-fonts-zh-cn`` (no dependencies,
17 MB: ``pip install 'moeformer[inspect]'``; the files are Noto's own ``SubsetOTF/SC``). It also
covers Latin, digits and CJK punctuation, so one family renders mixed English/Chinese labels.

The HTML report embeds the same font, cut down with fontTools (a matplotlib dependency) to the
few characters the page uses (:func:`font_subset`, ~15 KB), so its Chinese text renders in a
browser on a machine without CJK fonts, still with no request to any other address.

Resolution order: an explicit font file; that package; a CJK family matplotlib already knows
(e.g. Debian's ``fonts-noto-cjk`` or ``fonts-wqy-microhei``); otherwise a :class:`CJKFontWarning`
says that Chinese will show as boxes and how to install the font. Nothing is changed globally:
:func:`plot_style` sets the family only inside its ``with`` block.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

FONT_PACKAGE = "pylopdf-fonts-zh-cn"
# CJK families a system may already have (Debian fonts-noto-cjk, fonts-wqy-*, macOS, Windows).
SYSTEM_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "PingFang SC",
    "Microsoft YaHei",
    "SimHei",
)
LATIN_FALLBACK = "DejaVu Sans"  # matplotlib's own; glyphs missing from the CJK font fall back to it


class CJKFontWarning(UserWarning):
    """No font with Chinese glyphs was found: Chinese labels will render as boxes."""


@dataclass(frozen=True)
class CJKFont:
    family: str | None  # the family name matplotlib knows it by; None when none was found
    path: Path | None  # the font file, when we registered one
    source: str  # "file", "package", "system" or "none"


def package_font_path() -> Path | None:
    """Noto Sans SC from the ``pylopdf-fonts-zh-cn`` package, when it is installed."""
    try:
        import pylopdf_fonts_zh_cn
    except ImportError:
        return None
    path = Path(pylopdf_fonts_zh_cn.sans_path())
    return path if path.is_file() else None


@lru_cache(maxsize=8)
def find_cjk_font(path: str | None = None) -> CJKFont:
    """The CJK font to plot with, registered with matplotlib's font manager (once per file)."""
    from matplotlib import font_manager

    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"font file not found: {path}")
        return CJKFont(_register(Path(path)), Path(path), "file")
    packaged = package_font_path()
    if packaged is not None:
        return CJKFont(_register(packaged), packaged, "package")
    known = {f.name: Path(f.fname) for f in font_manager.fontManager.ttflist}
    for family in SYSTEM_FAMILIES:
        if family in known:
            return CJKFont(family, known[family], "system")
    return CJKFont(None, None, "none")


def _register(path: Path) -> str:
    from matplotlib import font_manager

    font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


@contextmanager
def plot_style(font_path: str | Path | None = None) -> Iterator[CJKFont]:
    """matplotlib without a display (Agg), its font family set to [CJK font, DejaVu Sans].

    Warns (:class:`CJKFontWarning`) once per call site when no CJK font is available.
    """
    import matplotlib

    matplotlib.use("Agg")
    font = find_cjk_font(None if font_path is None else str(font_path))
    if font.family is None:
        warnings.warn(
            "no font with Chinese glyphs found: Chinese token labels will show as boxes. Install one with "
            f"`pip install 'moeformer[inspect]'` (Noto Sans SC, package {FONT_PACKAGE}) or a system CJK font "
            "(Debian: apt-get install fonts-noto-cjk)",
            CJKFontWarning,
            stacklevel=3,
        )
    families = [font.family, LATIN_FALLBACK] if font.family else [LATIN_FALLBACK]
    with matplotlib.rc_context({"font.family": families, "axes.unicode_minus": False}):
        yield font


def font_subset(text: str, font_path: str | Path | None = None) -> bytes | None:
    """The CJK font cut down to the non-ASCII characters of ``text`` (OpenType bytes), or None
    when there are none, no font file was found, or the file is a collection (.ttc)."""
    import io

    from fontTools import subset
    from fontTools.ttLib import TTFont

    wanted = {ord(ch) for ch in text if ord(ch) > 0x7F}
    font = find_cjk_font(None if font_path is None else str(font_path))
    if not wanted or font.path is None or font.path.suffix.lower() not in (".otf", ".ttf"):
        return None
    face = TTFont(str(font.path), lazy=True)
    subsetter = subset.Subsetter(subset.Options())
    subsetter.populate(unicodes=wanted)
    subsetter.subset(face)
    buffer = io.BytesIO()
    face.save(buffer)
    return buffer.getvalue()
