"""Tests for moeformer.data.filecheck: files that are not UTF-8 text are named for what they are."""

from __future__ import annotations

import pytest

from moeformer.data.filecheck import CorpusError, check_text_file, describe_encoding, describe_head


@pytest.mark.parametrize(
    "head, words",
    [
        (b"", "empty"),
        (b"  \n\n", "only whitespace"),
        ("Hello\tworld\n".encode("utf-16-le"), "UTF-16-LE encoded (every second byte is NUL)"),
        ("Hello\tworld\n".encode("utf-16-be"), "UTF-16-BE encoded (every second byte is NUL)"),
        ("Hi".encode("utf-32"), "UTF-32-LE"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG image"),
        (b"\x1f\x8b\x08\x00", "gzip-compressed"),
        (b"PK\x03\x04\x14\x00", "zip archive"),
        (b"abc\x00\x00\x00\x01\x02\x03\x00def\x00", "NUL bytes (first at byte 3)"),
    ],
)
def test_describe_head_names_the_kind_of_file(head, words):
    assert words in describe_head(head, complete=True)


def test_text_passes():
    assert describe_head("Hi.\t嗨。\n".encode(), complete=True) is None
    assert describe_head("\ufeffHi.\t嗨。\n".encode(), complete=True) is None  # UTF-8 with a BOM
    assert describe_head(b"caf\xe9\n", complete=True) is None  # Latin-1: left to the rejection count
    assert describe_head(b"   ", complete=False) is None  # whitespace at the start of a long file


def test_check_text_file_names_the_file(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes(b"")
    with pytest.raises(CorpusError, match=f"{path}: the file is empty"):
        check_text_file(path)
    with pytest.raises(CorpusError, match="no such file"):
        check_text_file(tmp_path / "absent.tsv")
    with pytest.raises(CorpusError, match="not a regular file"):
        check_text_file(tmp_path)


def test_encoding_guess_latin1_and_gbk():
    """French in Latin-1 (accents before ASCII letters, which GBK could decode) is Latin-1; Chinese in GBK is GBK."""
    assert "Latin-1" in describe_encoding("Déjà vu, été.".encode("latin-1"))
    assert "'Déjà vu, été.'" in describe_encoding("Déjà vu, été.".encode("latin-1"))
    assert "GBK" in describe_encoding("我们走吧，好吗？".encode("gbk"))
