"""Tests for the corpus readers (moeformer.data.readers): defects are skipped and counted, never fatal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeformer.data.readers import (
    ReadReport,
    read_documents,
    read_jsonl,
    read_parallel,
    read_tsv,
)


def write_bytes(tmp_path: Path, name: str, lines: list[bytes]) -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# --------------------------------------------------------------------------------------------
# TSV / Tatoeba
# --------------------------------------------------------------------------------------------


def test_tsv_keeps_good_lines_and_counts_each_defect(tmp_path):
    """Tatoeba lines are kept; no-tab, extra-column, empty, empty-field and non-UTF-8 lines are counted."""
    path = write_bytes(
        tmp_path,
        "cmn.txt",
        [
            "\ufeffHi.\t嗨。\tCC-BY 2.0 (France) Attribution: tatoeba.org #538123".encode(),
            "Run!\t跑！".encode(),
            "I am angry! 我森气辣！".encode(),
            b"a\tb\tc\td",
            b"",
            b"   ",
            "\t空".encode(),
            b"Bad \xff\xfe bytes\t\xe4\xbd",
            "Wait.\t等等。\r".encode(),
        ],
    )
    pairs, report = read_tsv(path)
    assert pairs == [("Hi.", "嗨。"), ("Run!", "跑！"), ("Wait.", "等等。")]
    assert report.kept == 3
    assert report.rejected == {"no_tab": 1, "too_many_columns": 1, "empty_line": 2, "empty_field": 1, "undecodable": 1}
    assert report.n_rejected == 6


def test_tsv_two_columns_rejects_a_third(tmp_path):
    """With max_columns=2 (plain TSV) a line with an extra column is rejected, not truncated."""
    path = write_bytes(tmp_path, "pairs.tsv", [b"a\tb", b"c\td\te"])
    pairs, report = read_tsv(path, max_columns=2)
    assert pairs == [("a", "b")]
    assert report.rejected == {"too_many_columns": 1}


def test_tsv_rejects_max_columns_below_two(tmp_path):
    """A TSV reader needs at least source and target columns."""
    with pytest.raises(ValueError, match="max_columns must be at least 2"):
        read_tsv(write_bytes(tmp_path, "x.tsv", [b"a\tb"]), max_columns=1)


def test_tsv_without_final_newline_keeps_last_line(tmp_path):
    """The last line counts even without a trailing newline, and no phantom empty line appears."""
    path = tmp_path / "x.tsv"
    path.write_bytes(b"a\tb\nc\td")
    pairs, report = read_tsv(path)
    assert pairs == [("a", "b"), ("c", "d")]
    assert report.rejected == {}


def test_read_report_reject_accumulates():
    """reject() counts per reason."""
    report = ReadReport()
    for reason in ("x", "y", "x"):
        report.reject(reason)
    assert report.rejected == {"x": 2, "y": 1} and report.n_rejected == 3


# --------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------


def test_jsonl_default_keys_and_defects(tmp_path):
    """src/tgt, source/target and en/zh objects are read; every malformed line is counted by reason."""
    lines = [
        json.dumps({"src": "Hi.", "tgt": "嗨。"}, ensure_ascii=False).encode(),
        json.dumps({"en": "Run!", "zh": "跑！"}, ensure_ascii=False).encode(),
        json.dumps({"source": "Go.", "target": "走。", "id": 3}, ensure_ascii=False).encode(),
        b"{not json",
        b"[1, 2]",
        b'{"src": "only source"}',
        b'{"src": 1, "tgt": "x"}',
        b'{"src": " ", "tgt": "x"}',
        b"",
        b'{"src": "\xff", "tgt": "x"}',
    ]
    pairs, report = read_jsonl(write_bytes(tmp_path, "data.jsonl", lines))
    assert pairs == [("Hi.", "嗨。"), ("Run!", "跑！"), ("Go.", "走。")]
    assert report.rejected == {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_key": 1,
        "not_a_string": 1,
        "empty_field": 1,
        "empty_line": 1,
        "undecodable": 1,
    }


def test_jsonl_custom_keys(tmp_path):
    """Given keys replace the defaults: an object with only src/tgt is then missing its keys."""
    lines = [b'{"english": "a", "chinese": "b"}', b'{"src": "c", "tgt": "d"}']
    pairs, report = read_jsonl(write_bytes(tmp_path, "d.jsonl", lines), source_key="english", target_key="chinese")
    assert pairs == [("a", "b")]
    assert report.rejected == {"missing_key": 1}


def test_jsonl_needs_both_keys_or_neither(tmp_path):
    """One key alone is an error naming both parameters."""
    with pytest.raises(ValueError, match="source_key and target_key"):
        read_jsonl(write_bytes(tmp_path, "d.jsonl", [b"{}"]), source_key="en")


def test_read_parallel_picks_the_format_by_suffix(tmp_path):
    """.jsonl is read as JSONL, other suffixes as TSV; an unknown format is named in the error."""
    jsonl = write_bytes(tmp_path, "d.jsonl", [b'{"src": "a", "tgt": "b"}'])
    tsv = write_bytes(tmp_path, "d.txt", [b"c\td"])
    assert read_parallel(jsonl)[0] == [("a", "b")]
    assert read_parallel(tsv)[0] == [("c", "d")]
    assert read_parallel(tsv, format="tsv", max_columns=2)[0] == [("c", "d")]
    with pytest.raises(ValueError, match="unknown parallel format 'csv'"):
        read_parallel(tsv, format="csv")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# plain-text documents
# --------------------------------------------------------------------------------------------


def test_documents_from_a_directory(tmp_path):
    """Files in sorted order, one document each; empty files and undecodable lines counted."""
    (tmp_path / "b.txt").write_bytes(b"second\n\nwith a blank line\n")
    (tmp_path / "a.txt").write_bytes(b"first \xff line\nkept line\n")
    (tmp_path / "c.txt").write_bytes(b"")
    (tmp_path / "ignored.md").write_bytes(b"not a corpus file\n")
    documents, report = read_documents(tmp_path)
    assert documents == ["kept line", "second\n\nwith a blank line"]
    assert report.kept == 4
    assert report.rejected == {"undecodable": 1, "empty_document": 1}


def test_documents_from_a_list_and_a_missing_path(tmp_path):
    """A list of files is read in the given order; a missing path raises FileNotFoundError naming it."""
    (tmp_path / "x.txt").write_text("x\n", encoding="utf-8")
    (tmp_path / "y.txt").write_text("y\n", encoding="utf-8")
    assert read_documents([tmp_path / "y.txt", tmp_path / "x.txt"])[0] == ["y", "x"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_documents(tmp_path / "nope.txt")


def test_report_counts_lines_and_keeps_the_first_line_of_each_reason(tmp_path):
    """Lines read, files read, and the (file, 1-based line) of each reason's first rejection."""
    path = write_bytes(tmp_path, "p.tsv", [b"a\tb", b"no tab", b"bad \xff", b"c\td", b"again no tab", b"x\t"])
    _, report = read_tsv(path)
    assert (report.lines, report.kept, report.files) == (6, 2, [str(path)])
    assert report.first == {"no_tab": (str(path), 2), "undecodable": (str(path), 3), "empty_field": (str(path), 6)}


def test_document_report_names_the_file_of_each_first(tmp_path):
    """Across several documents, line numbers restart per file and the first names its file."""
    (tmp_path / "a.txt").write_bytes(b"one\ntwo\n")
    (tmp_path / "b.txt").write_bytes(b"three\nfour \xe9\n")
    (tmp_path / "c.txt").write_bytes(b"")
    _, report = read_documents(tmp_path)
    assert report.lines == 4
    assert report.first == {"undecodable": (str(tmp_path / "b.txt"), 2), "empty_document": (str(tmp_path / "c.txt"), 1)}


# --------------------------------------------------------------------------------------------
# real corpora
# --------------------------------------------------------------------------------------------


def test_tatoeba_cmn_real_file(shared_data):
    """cmn.txt: 29,391 pairs kept; the one line with a space instead of a tab is reported, not fatal."""
    pairs, report = read_tsv(shared_data("cmn-eng", "cmn.txt"))
    assert report.kept == len(pairs) == 29_391
    assert report.rejected == {"no_tab": 1}
    assert pairs[0] == ("Hi.", "嗨。")
    assert all(s and t and "\t" not in s + t for s, t in pairs)


def test_tinyshakespeare_real_file(shared_data):
    """input.txt reads as one document equal to the file's text (its final newline aside)."""
    path = shared_data("tinyshakespeare", "input.txt")
    documents, report = read_documents(path)
    text = path.read_text(encoding="utf-8")
    assert documents == [text.removesuffix("\n")]
    assert report.kept == 40_000 and report.rejected == {}
