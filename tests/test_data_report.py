"""Tests for moeformer.data.report: which rejections count, the threshold, the printed report."""

from __future__ import annotations

import pytest

from moeformer.data.filecheck import CorpusError
from moeformer.data.readers import ReadReport
from moeformer.data.report import check_rejected, format_data_report, read_summary


def report_of(lines: int, **rejected: int) -> ReadReport:
    report = ReadReport(kept=lines - sum(rejected.values()), lines=lines, files=["a.txt", "b.txt"])
    for reason, n in rejected.items():
        for i in range(n):
            report.reject(reason, ("b.txt", 7 + i))
    return report


def test_blank_lines_do_not_count_toward_the_threshold():
    summary = read_summary(report_of(100, empty_line=30, no_tab=1))
    assert summary["rejected_fraction"] == pytest.approx(0.01)
    check_rejected(summary, 0.01)  # exactly at the threshold: allowed
    with pytest.raises(CorpusError, match=r"2 files \(a\.txt, \.\.\.\): 1 of 100 lines \(1\.0%\)"):
        check_rejected(summary, 0.005)


def test_threshold_zero_and_one():
    check_rejected(read_summary(report_of(10)), 0.0)
    check_rejected(read_summary(report_of(10, undecodable=10)), 1.0)


def test_report_with_several_files_names_the_file_of_each_first():
    text = format_data_report(read_summary(report_of(100, no_tab=2)))
    assert text.splitlines()[0] == "data: 2 files (a.txt, ...): 100 lines read, 98 lines kept"
    assert "no tab between source and target: 2 (first at line 7 of b.txt)" in text


def test_synthetic_report_is_one_line_per_fact():
    text = format_data_report({"pairs": 500, "filtered": {}, "train": 400, "valid": 50, "test": 50, "too_long": 3})
    assert text.splitlines() == [
        "data: synthetic corpus, 500 pairs",
        "  train 400 / valid 50 / test 50 pairs; 3 pairs longer than model.max_seq_len tokens left out",
    ]
