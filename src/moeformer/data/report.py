"""The data report: what a run read, what it rejected and why, and whether that is too much.

A reader skips lines it cannot use and counts them by reason (:class:`~moeformer.data.readers.ReadReport`).
Here those counts become the plain dict that ``run.json`` records and :func:`format_data_report`
turns into the few lines a run prints at its start, and :func:`check_rejected` fails the run when
more than ``data.max_rejected_fraction`` of the input is defective.

What counts toward that fraction (``DEFECTS``): lines that are not UTF-8, have no tab or too many
columns, an empty source or target, invalid JSON, a JSON value that is not an object, missing keys
or non-string fields: input the file meant as data and we could not read. Blank lines are
reported but not counted: they carry no data (spacing, a trailing blank line). Deliberate
filtering is reported apart and not counted either, because the config asked for it: cleaning's
length / ratio / duplicate filters (``filtered``) and pairs longer than ``model.max_seq_len``
tokens (``too_long``).
"""

from __future__ import annotations

from typing import Any

from moeformer.data import readers
from moeformer.data.filecheck import CorpusError, describe_encoding, read_line_bytes

# Reader rejections that are defects of the input, counted toward data.max_rejected_fraction.
DEFECTS = frozenset(
    {
        readers.UNDECODABLE,
        readers.NO_TAB,
        readers.TOO_MANY_COLUMNS,
        readers.EMPTY_FIELD,
        readers.INVALID_JSON,
        readers.NOT_AN_OBJECT,
        readers.MISSING_KEY,
        readers.NOT_A_STRING,
    }
)
# Each reason in words, for the report and the error.
REASONS = {
    readers.UNDECODABLE: "not valid UTF-8",
    readers.NO_TAB: "no tab between source and target",
    readers.TOO_MANY_COLUMNS: "too many tab-separated columns",
    readers.EMPTY_FIELD: "empty source or target",
    readers.INVALID_JSON: "not valid JSON",
    readers.NOT_AN_OBJECT: "JSON but not an object",
    readers.MISSING_KEY: "no source/target keys",
    readers.NOT_A_STRING: "source or target not a string",
    readers.EMPTY_LINE: "blank line (not counted)",
    readers.EMPTY_DOCUMENT: "empty file (not counted)",
}


def read_summary(read: readers.ReadReport) -> dict[str, Any]:
    """The reading part of the data report, as plain JSON-ready values.

    Keys: ``files`` (paths read), ``lines`` (lines read, all files), ``read`` (records kept:
    pairs, or text lines), ``rejected`` ({reason: count}, every reason), ``first_line``
    ({reason: {"file": path, "line": 1-based number}} of the first rejection of each reason),
    ``rejected_fraction`` (lines rejected for a reason in ``DEFECTS`` / lines read).
    """
    defects = sum(n for reason, n in read.rejected.items() if reason in DEFECTS)
    return {
        "files": list(read.files),
        "lines": read.lines,
        "read": read.kept,
        "rejected": dict(read.rejected),
        "first_line": {reason: {"file": f, "line": n} for reason, (f, n) in read.first.items()},
        "rejected_fraction": defects / read.lines if read.lines else 0.0,
    }


def check_rejected(summary: dict[str, Any], max_fraction: float) -> None:
    """Raise :class:`CorpusError` when more than ``max_fraction`` of the lines read were defective.

    The message names the file(s), each reason with its count and first line, an encoding guess
    when lines were not UTF-8, and ``data.max_rejected_fraction`` to accept the loss instead.
    """
    fraction = summary["rejected_fraction"]
    if fraction <= max_fraction:
        return
    counted = {r: n for r, n in summary["rejected"].items() if r in DEFECTS}
    reasons = "; ".join(f"{REASONS[r]}: {n:,} ({_first(summary, r)})" for r, n in _by_count(counted))
    message = (
        f"{_files(summary['files'])}: {sum(counted.values()):,} of {summary['lines']:,} lines "
        f"({fraction:.1%}) rejected, more than data.max_rejected_fraction = {max_fraction:g}: {reasons}."
    )
    if readers.UNDECODABLE in counted and readers.UNDECODABLE in summary["first_line"]:
        where = summary["first_line"][readers.UNDECODABLE]
        message += f" The file is not UTF-8: {describe_encoding(read_line_bytes(where['file'], where['line']))}."
    suggestion = f"--set data.max_rejected_fraction={_raise_to(fraction)}"
    message += f" To train on the rest anyway, raise data.max_rejected_fraction (e.g. {suggestion})."
    raise CorpusError(message)


def format_data_report(report: dict[str, Any]) -> str:
    """A run's data report in a few lines, for the CLI to print at the start of a run.

    ``report`` is :attr:`moeformer.train.pipeline.PreparedData.report` (or the reading part of
    it). One line when nothing was rejected; otherwise a second line with each reason, its count
    and the line it first occurred on.
    """
    lines = [_headline(report)]
    if report.get("rejected"):
        pieces = (f"{REASONS.get(r, r)}: {n:,} ({_first(report, r)})" for r, n in _by_count(report["rejected"]))
        counts = "; ".join(pieces)
        lines.append(f"  rejected (defective: {_percent(report.get('rejected_fraction', 0.0))} of lines): {counts}")
    if report.get("filtered"):
        counts = ", ".join(f"{r} {n:,}" for r, n in _by_count(report["filtered"]))
        lines.append(f"  filtered by cleaning: {counts}")
    split = _split_line(report)
    if split:
        lines.append(f"  {split}")
    return "\n".join(lines)


def _headline(report: dict[str, Any]) -> str:
    if not report.get("files"):
        return f"data: synthetic corpus, {report.get('pairs', 0):,} pairs"
    kept = f"{report['read']:,} " + ("pairs" if "pairs" in report else "lines") + " kept"
    return f"data: {_files(report['files'])}: {report['lines']:,} lines read, {kept}"


def _split_line(report: dict[str, Any]) -> str:
    if "train" in report:
        text = f"train {report['train']:,} / valid {report['valid']:,} / test {report['test']:,} pairs"
        if report.get("too_long"):
            text += f"; {report['too_long']:,} pairs longer than model.max_seq_len tokens left out"
        return text
    if "tokens" in report:
        return (
            f"{report['tokens']:,} tokens: train {report['train_tokens']:,} tokens / valid "
            f"{report['valid_windows']:,} / test {report['test_windows']:,} windows"
        )
    return ""


def _files(files: list[str]) -> str:
    if len(files) == 1:
        return files[0]
    return f"{len(files)} files ({files[0]}, ...)"


def _first(summary: dict[str, Any], reason: str) -> str:
    where = summary.get("first_line", {}).get(reason)
    if where is None:
        return "first line unknown"
    if len(summary.get("files", [])) > 1:
        return f"first at line {where['line']} of {where['file']}"
    return f"first at line {where['line']}"


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _percent(fraction: float) -> str:
    """Two significant digits, so that one bad line in 30,000 does not print as 0.00%."""
    return f"{fraction * 100:.2g}%"


def _raise_to(fraction: float) -> str:
    """A round value just above ``fraction``, to suggest on the command line."""
    for step in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        if fraction <= step:
            return f"{step:g}"
    return "1"
