"""Instruction sets (harmful / harmless prompts) read from JSON, JSONL, CSV or plain text, strictly.

Unlike the corpus readers, which skip defective lines, an instruction set is small and curated:
one bad item means the file is not what the caller thinks it is, so every defect raises an
:class:`InstructionError` naming the file, where the defect is and what is allowed::

    load_instructions("harmful_val.json")          # [{"instruction": ..., "category": ...}, ...]
    load_instructions("advbench.csv", field="goal", limit=100)

Formats, chosen by suffix:

- ``.json``: a list of strings, or a list of objects (positions reported as ``index I``, 0-based);
- ``.jsonl``: one string or object per line, blank lines skipped (``line L``, 1-based);
- ``.csv``: a header row, then one instruction per row from one column (``line L``);
- anything else (``.txt``): one instruction per non-blank line, surrounding whitespace stripped.

Objects and CSV rows take ``field`` when given, else the first of :data:`INSTRUCTION_FIELDS`
they hold. Files are UTF-8 (a leading BOM is dropped).
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

# Field names tried, in order, for objects and CSV columns when no field is given.
INSTRUCTION_FIELDS: tuple[str, ...] = ("instruction", "prompt", "goal", "behavior", "text")


class InstructionError(ValueError):
    """An instruction file that is missing, malformed, or holds no usable instruction."""


def read_utf8(path: Path, error: type[ValueError] = InstructionError) -> str:
    """The text of ``path`` decoded as UTF-8 (BOM dropped); ``error`` raised when missing or undecodable."""
    if not path.is_file():
        raise error(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise error(f"{path}: line {line} is not valid UTF-8 (byte {err.start}); the file must be UTF-8") from None


def json_records(
    text: str, path: Path, *, jsonl: bool, error: type[ValueError] = InstructionError
) -> list[tuple[str, object]]:
    """The items of a JSON list (``jsonl=False``) or of a JSONL file, each with where it is.

    Returns ``(where, value)`` pairs, ``where`` being ``"index I"`` (0-based) for a JSON list or
    ``"line L"`` (1-based) for JSONL. Raises ``error`` on invalid JSON (naming the line) or on a
    JSON top level that is not a list.
    """
    if jsonl:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append((f"line {number}", _parse(line, path, error, line_offset=number - 1)))
        return records
    value = _parse(text, path, error)
    if not isinstance(value, list):
        raise error(f"{path}: the top level is a JSON {json_kind(value)}; allowed: a list of strings or of objects")
    return [(f"index {i}", item) for i, item in enumerate(value)]


def _parse(text: str, path: Path, error: type[ValueError], *, line_offset: int = 0) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON at line {err.lineno + line_offset}, column {err.colno}: {err.msg}") from None


def json_kind(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def load_instructions(path: str | Path, *, field: str | None = None, limit: int | None = None) -> list[str]:
    """The instructions of a JSON, JSONL, CSV or text file (format by suffix, see the module docstring).

    ``field`` picks the object key / CSV column (default: the first of :data:`INSTRUCTION_FIELDS`
    present); ``limit`` keeps the first N. Raises :class:`InstructionError` on any defect,
    including a file with no instruction.
    """
    if limit is not None and limit < 1:
        raise InstructionError(f"limit must be a positive number of instructions, got {limit}")
    path = Path(path)
    text = read_utf8(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        records = json_records(text, path, jsonl=suffix == ".jsonl")
        instructions = [_from_item(value, where, path, field) for where, value in records]
    elif suffix == ".csv":
        instructions = _from_csv(text, path, field)
    else:
        instructions = [line.strip() for line in text.splitlines() if line.strip()]
    if not instructions:
        raise InstructionError(f"{path}: empty; it holds no instruction")
    return instructions[:limit]


def _from_item(value: object, where: str, path: Path, field: str | None) -> str:
    """One instruction from a JSON string or object."""
    if isinstance(value, str):
        return _check(value, where, path, "the item")
    if not isinstance(value, dict):
        raise InstructionError(f"{path}: {where} is a JSON {json_kind(value)}; allowed: a string or an object")
    key = _pick_field(list(value), field)
    if key is None:
        keys = ", ".join(repr(k) for k in value) or "none"
        raise InstructionError(f"{path}: {where} has {_wanted(field)} (its keys: {keys})")
    return _check(value[key], where, path, f"field {key!r}")


def _from_csv(text: str, path: Path, field: str | None) -> list[str]:
    """One instruction per data row of a CSV file with a header row."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = list(reader.fieldnames or [])
    key = _pick_field(columns, field)
    if key is None:
        found = ", ".join(repr(c) for c in columns) or "none"
        raise InstructionError(f"{path}: the CSV header has {_wanted(field)} (its columns: {found})")
    instructions = []
    for row in reader:
        where = f"line {reader.line_num}"
        if row[key] is None:
            raise InstructionError(f"{path}: {where}: column {key!r} is missing (the row is shorter than the header)")
        instructions.append(_check(row[key], where, path, f"column {key!r}"))
    return instructions


def _pick_field(keys: list[str], field: str | None) -> str | None:
    """``field`` if given and present, else the first of INSTRUCTION_FIELDS present; None if none is."""
    candidates = (field,) if field is not None else INSTRUCTION_FIELDS
    return next((k for k in candidates if k in keys), None)


def _wanted(field: str | None) -> str:
    """What an object or header lacked, for messages."""
    if field is not None:
        return f"no field {field!r}"
    return "none of the accepted fields " + ", ".join(repr(k) for k in INSTRUCTION_FIELDS) + " (or pass field=...)"


def _check(value: object, where: str, path: Path, what: str) -> str:
    """``value`` if it is a non-empty string; raises InstructionError otherwise."""
    if not isinstance(value, str):
        raise InstructionError(f"{path}: {where}: {what} is a JSON {json_kind(value)}; allowed: a non-empty string")
    if not value.strip():
        raise InstructionError(f"{path}: {where}: {what} is empty; allowed: a non-empty string")
    return value


def sample_instructions(items: list[str], n: int, seed: int) -> list[str]:
    """``n`` of ``items`` drawn without replacement by ``random.Random(seed)``: same seed, same list.

    With ``n >= len(items)`` all items are returned in their original order.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of instructions, got {n}")
    if n >= len(items):
        return list(items)
    return random.Random(seed).sample(items, n)
