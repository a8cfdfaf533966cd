"""Is this corpus file text we can read? Empty, binary, compressed and UTF-16 files named as such.

The readers decode UTF-8 line by line and skip what does not decode, which is right for a stray
bad byte and wrong for a whole file of another kind: a PNG or a gzip archive would give a
handful of "lines", a UTF-16 file none, and the run would fail later with a message about split
sizes or token counts. :func:`check_text_file` looks at the first bytes before any reading and
says what the file is instead; :func:`describe_encoding` names the likely 8-bit encoding of a
line that is not UTF-8 (Latin-1 / Windows-1252 or GBK), for the rejection error.
"""

from __future__ import annotations

from pathlib import Path

_HEAD = 64 * 1024  # bytes looked at: enough to see NUL patterns, small enough to be instant

# Leading bytes of the binary formats a corpus path most often points at by mistake.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"\x1f\x8b", "gzip-compressed: decompress it first (gunzip)"),
    (b"BZh91AY&SY", "bzip2-compressed: decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed: decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive: extract the text file from it"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive: extract the text file from it"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
# Byte-order marks of the UTF-16/32 encodings (UTF-32 first: its LE mark starts with UTF-16's).
_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "UTF-32-LE"),
    (b"\x00\x00\xfe\xff", "UTF-32-BE"),
    (b"\xff\xfe", "UTF-16-LE"),
    (b"\xfe\xff", "UTF-16-BE"),
)


class CorpusError(ValueError):
    """A corpus file that cannot be trained on as it is; the message names the file and what to do."""


def check_text_file(path: str | Path) -> None:
    """Raise :class:`CorpusError` if ``path`` is missing, empty, whitespace only, binary or UTF-16/32.

    Only the first 64 KiB are read. A file that passes may still hold lines that are not UTF-8:
    the readers count those, and :mod:`moeformer.data.report` decides whether there are too many.
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if not path.is_file():
        raise CorpusError(f"{path}: not a regular file")
    with open(path, "rb") as fh:
        head = fh.read(_HEAD)
    problem = describe_head(head, complete=len(head) < _HEAD)
    if problem is not None:
        raise CorpusError(f"{path}: {problem}")


def describe_head(head: bytes, *, complete: bool) -> str | None:
    """What is wrong with a file that starts with ``head`` (``complete``: that is the whole file), or None."""
    if not head:
        return "the file is empty (0 bytes)"
    if complete and not head.strip():
        return f"the file holds only whitespace ({len(head)} bytes), no text"
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return _convert(encoding, "it starts with that encoding's byte-order mark")
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"this is {what}, not a text file; data.path must name a UTF-8 text file"
    if b"\x00" in head:
        return _nul_problem(head)
    return None


def _nul_problem(head: bytes) -> str:
    """NUL bytes never occur in UTF-8 text: UTF-16 without a byte-order mark, or a binary file."""
    even, odd = head[0::2], head[1::2]
    nul_even, nul_odd = even.count(0) / max(1, len(even)), odd.count(0) / max(1, len(odd))
    # ASCII-range text in UTF-16 has a NUL in (nearly) every second byte and none in the others.
    if nul_odd > 0.3 and nul_even < 0.05:
        return _convert("UTF-16-LE", "every second byte is NUL")
    if nul_even > 0.3 and nul_odd < 0.05:
        return _convert("UTF-16-BE", "every second byte is NUL")
    return f"it contains NUL bytes (first at byte {head.index(0)}): a binary file, not UTF-8 text"


def _convert(encoding: str, evidence: str) -> str:
    return (
        f"the file is {encoding} encoded ({evidence}); corpora must be UTF-8: convert it, e.g. "
        f"`iconv -f {encoding} -t UTF-8 FILE > FILE.utf8`"
    )


def read_line_bytes(path: str | Path, line: int) -> bytes:
    """The raw bytes of 1-based ``line`` of ``path`` (without its line end); b"" past the end."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == line:
                return raw.rstrip(b"\n").rstrip(b"\r")
    return b""


def describe_encoding(raw: bytes) -> str:
    """A guess at the encoding of a line that is not UTF-8, with the ``iconv`` command to convert it.

    GBK (simplified Chinese) is named when the line decodes as GBK and most of its two-byte
    characters have a trail byte >= 0x80 (GB2312's range; Latin-1 accents followed by an ASCII
    letter, as in "déjà", would otherwise pass for GBK); else Latin-1 / Windows-1252, the usual
    culprit for European text (any bytes decode as Latin-1, so that guess cannot be checked).
    """
    if _looks_gbk(raw):
        return "it looks GBK encoded (Chinese); convert it with `iconv -f GBK -t UTF-8 FILE > FILE.utf8`"
    sample = raw.decode("cp1252", errors="replace")
    if len(sample) > 60:
        sample = sample[:57] + "..."
    return (
        f"it looks Latin-1 / Windows-1252 encoded (read so, the line is {sample!r}); convert it with "
        "`iconv -f WINDOWS-1252 -t UTF-8 FILE > FILE.utf8`"
    )


def _looks_gbk(raw: bytes) -> bool:
    try:
        raw.decode("gbk")
    except UnicodeDecodeError:
        return False
    high = low = i = 0
    while i < len(raw):
        if raw[i] < 0x80:
            i += 1
            continue
        if i + 1 < len(raw) and raw[i + 1] >= 0x80:
            high += 1
        else:
            low += 1
        i += 2
    return high > 0 and high >= 4 * low
