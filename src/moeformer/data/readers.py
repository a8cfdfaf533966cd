"""Corpus readers: parallel text (TSV, Tatoeba, JSONL) and plain-text documents, read defensively.

Real corpora have defects: a space where the tab should be, a stray column, an empty line, bytes
that are not UTF-8. Readers never stop on one; each bad line is skipped and counted by reason in
a :class:`ReadReport`, so a caller can show what was dropped and why::

    pairs, report = read_tsv("cmn.txt")      # Tatoeba: English<TAB>Chinese<TAB>attribution
    report.kept, report.rejected             # 29391, {"no_tab": 1}

Files are read as bytes and decoded line by line (UTF-8, a leading BOM dropped, CRLF accepted),
so one undecodable line costs that line only. The report also counts the lines read and keeps,
per reason, where it first happened (file and 1-based line number), so that a caller can point
at the line (:mod:`moeformer.data.report` decides which reasons are defects of the input).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Pair = tuple[str, str]

# Rejection reasons, the keys of ReadReport.rejected.
EMPTY_LINE = "empty_line"
UNDECODABLE = "undecodable"
NO_TAB = "no_tab"
TOO_MANY_COLUMNS = "too_many_columns"
EMPTY_FIELD = "empty_field"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_KEY = "missing_key"
NOT_A_STRING = "not_a_string"
EMPTY_DOCUMENT = "empty_document"

# Key pairs tried, in order, when read_jsonl is given no keys.
JSONL_KEYS: tuple[Pair, ...] = (("src", "tgt"), ("source", "target"), ("en", "zh"))


@dataclass
class ReadReport:
    """What a reader kept and what it skipped, counted by reason (lines, or files for ``empty_document``)."""

    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    lines: int = 0  # lines read, over every file
    files: list[str] = field(default_factory=list)  # the files read, in order
    first: dict[str, tuple[str, int]] = field(default_factory=dict)  # reason -> (file, 1-based line) of its first

    def reject(self, reason: str, where: tuple[str, int] | None = None) -> None:
        """Count one ``reason``; ``where`` (file, line) is kept for the first of each reason."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if where is not None:
            self.first.setdefault(reason, where)

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


def iter_lines(path: str | Path, report: ReadReport) -> Iterator[str]:
    """Decoded lines of ``path`` without their line ends; undecodable lines counted and skipped."""
    for _, line in numbered_lines(path, report):
        yield line


def numbered_lines(path: str | Path, report: ReadReport) -> Iterator[tuple[tuple[str, int], str]]:
    """((file, 1-based line number), decoded line) for each line of ``path`` that is valid UTF-8."""
    name = str(path)
    report.files.append(name)
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            report.lines += 1
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield (name, number), raw.decode("utf-8")
            except UnicodeDecodeError:
                report.reject(UNDECODABLE, (name, number))


def iter_tsv(path: str | Path, report: ReadReport, *, max_columns: int = 3) -> Iterator[Pair]:
    """(source, target) from the first two tab-separated columns of each line.

    ``max_columns`` is 3 for the Tatoeba format (a third column of attribution, ignored) and 2
    for plain two-column TSV; a line with more columns is rejected as ``too_many_columns``.
    """
    if max_columns < 2:
        raise ValueError(f"max_columns must be at least 2 (source and target), got {max_columns}")
    for where, line in numbered_lines(path, report):
        if not line.strip():
            report.reject(EMPTY_LINE, where)
            continue
        columns = line.split("\t")
        if len(columns) < 2:
            report.reject(NO_TAB, where)
        elif len(columns) > max_columns:
            report.reject(TOO_MANY_COLUMNS, where)
        elif not columns[0].strip() or not columns[1].strip():
            report.reject(EMPTY_FIELD, where)
        else:
            report.kept += 1
            yield columns[0], columns[1]


def read_tsv(path: str | Path, *, max_columns: int = 3) -> tuple[list[Pair], ReadReport]:
    """All pairs of a TSV / Tatoeba file and the report of what was skipped."""
    report = ReadReport()
    pairs = list(iter_tsv(path, report, max_columns=max_columns))
    return pairs, report


def iter_jsonl(
    path: str | Path, report: ReadReport, *, source_key: str | None = None, target_key: str | None = None
) -> Iterator[Pair]:
    """(source, target) from one JSON object per line.

    With no keys given, each object uses the first of :data:`JSONL_KEYS` it holds both keys of
    ("src"/"tgt", "source"/"target", "en"/"zh"); give both keys to read other fields.
    """
    if (source_key is None) != (target_key is None):
        raise ValueError(f"give both source_key and target_key or neither, got {source_key!r} and {target_key!r}")
    candidates = JSONL_KEYS if source_key is None else ((source_key, target_key),)
    for where, line in numbered_lines(path, report):
        if not line.strip():
            report.reject(EMPTY_LINE, where)
            continue
        pair, reason = _pair_from_json(line, candidates)  # type: ignore[arg-type]
        if pair is None:
            report.reject(reason, where)
        else:
            report.kept += 1
            yield pair


def _pair_from_json(line: str, candidates: tuple[Pair, ...]) -> tuple[Pair | None, str]:
    """The pair in one JSONL line, or None and the reason it has none."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None, INVALID_JSON
    if not isinstance(obj, dict):
        return None, NOT_AN_OBJECT
    keys = next((k for k in candidates if k[0] in obj and k[1] in obj), None)
    if keys is None:
        return None, MISSING_KEY
    source, target = obj[keys[0]], obj[keys[1]]
    if not isinstance(source, str) or not isinstance(target, str):
        return None, NOT_A_STRING
    if not source.strip() or not target.strip():
        return None, EMPTY_FIELD
    return (source, target), ""


def read_jsonl(
    path: str | Path, *, source_key: str | None = None, target_key: str | None = None
) -> tuple[list[Pair], ReadReport]:
    """All pairs of a JSONL file and the report of what was skipped."""
    report = ReadReport()
    pairs = list(iter_jsonl(path, report, source_key=source_key, target_key=target_key))
    return pairs, report


def read_parallel(
    path: str | Path, *, format: Literal["auto", "tsv", "jsonl"] = "auto", **options: object
) -> tuple[list[Pair], ReadReport]:
    """Pairs of a parallel file; ``format="auto"`` reads ``.jsonl``/``.json`` as JSONL, anything else as TSV."""
    if format == "auto":
        format = "jsonl" if Path(path).suffix.lower() in (".jsonl", ".json") else "tsv"
    if format == "tsv":
        return read_tsv(path, **options)  # type: ignore[arg-type]
    if format == "jsonl":
        return read_jsonl(path, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown parallel format {format!r}; allowed: 'auto', 'tsv', 'jsonl'")


def read_document(path: str | Path, report: ReadReport) -> str:
    """One plain-text document, its lines joined by "\\n"; undecodable lines counted and dropped."""
    lines = []
    for line in iter_lines(path, report):
        report.kept += 1
        lines.append(line)
    return "\n".join(lines)


def read_documents(paths: str | Path | Iterable[str | Path], *, pattern: str = "*.txt") -> tuple[list[str], ReadReport]:
    """Plain-text documents (one per file) for language modelling.

    ``paths`` is a file, a directory (its files matching ``pattern``, in sorted order) or a list
    of files. Empty files are skipped and counted as ``empty_document``.
    """
    report = ReadReport()
    documents = []
    for path in document_paths(paths, pattern):
        text = read_document(path, report)
        if text.strip():
            documents.append(text)
        else:
            report.reject(EMPTY_DOCUMENT, (str(path), 1))
    return documents, report


def document_paths(paths: str | Path | Iterable[str | Path], pattern: str = "*.txt") -> list[Path]:
    """The files :func:`read_documents` reads for ``paths``, in order."""
    if isinstance(paths, (str, Path)):
        root = Path(paths)
        if root.is_dir():
            return sorted(p for p in root.glob(pattern) if p.is_file())
        if not root.exists():
            raise FileNotFoundError(f"no such corpus file or directory: {root}")
        return [root]
    return [Path(p) for p in paths]
