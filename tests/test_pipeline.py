"""prepare(): bad corpora stop the run before any tokenizer is trained, with a message naming the
file and what is wrong; the data report says what was read and rejected; BLEU samples are spread."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from moeformer.config import Config, config_from_dict
from moeformer.data.filecheck import CorpusError
from moeformer.data.report import format_data_report
from moeformer.train import pipeline
from moeformer.train.pipeline import prepare


def translation_config(path: Path | str, corpus: str = "tsv", **data) -> Config:
    table = {"corpus": corpus, "path": str(path), "valid_size": 20, "test_size": 10, **data}
    return config_from_dict(
        {"model": {"preset": "transformer-tiny", "vocab_size": 10}, "data": table, "train": {"bleu_samples": 8}}
    )


def lm_config(path: Path | str, **data) -> Config:
    table = {"corpus": "text", "path": str(path), "valid_size": 2, "test_size": 2, "seq_len": 16, **data}
    return config_from_dict({"model": {"preset": "lm-tiny", "vocab_size": 10}, "data": table})


def tsv_lines(n: int) -> list[str]:
    return [f"Sentence {i} goes here.\t第{i}句在这里。" for i in range(n)]


def write_tsv(tmp_path: Path, lines: list[bytes], name: str = "pairs.tsv") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def no_tokenizer_training(monkeypatch):
    """Fail the test if prepare() gets as far as training a tokenizer: errors must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tokenizer was trained before the corpus was checked")

    monkeypatch.setattr(pipeline, "train_tokenizer", refuse)
    monkeypatch.setattr(pipeline, "train_tokenizer_pair", refuse)


# --------------------------------------------------------------------------------------------
# Rejected lines: reported, and fatal above data.max_rejected_fraction
# --------------------------------------------------------------------------------------------

SHAKESPEARE = [
    "First Citizen:",
    "Before we proceed any further, hear me speak.",
    "Café and crème brûlée for the señor, said Cléopâtre.",
    "Résumé: the naïve élève fled to Zürich.",
    "All:",
    "Speak, speak.",
    "Où est la déjà-vu façade?",
    "Ève's fiancé sang a fête song.",
]


def test_latin1_text_corpus_fails_naming_file_reason_and_key(tmp_path, no_tokenizer_training):
    """A Latin-1 Shakespeare (half its lines not UTF-8) stops with the file, the reason, the first
    line, the encoding guess and data.max_rejected_fraction; it used to train on the rest silently."""
    path = tmp_path / "input.txt"
    path.write_bytes("\n".join(SHAKESPEARE * 50).encode("latin-1"))
    with pytest.raises(CorpusError) as info:
        prepare(lm_config(path))
    message = str(info.value)
    assert str(path) in message
    assert "200 of 400 lines (50.0%)" in message
    assert "not valid UTF-8: 200 (first at line 3)" in message
    assert "Latin-1" in message and "iconv" in message
    assert "data.max_rejected_fraction" in message


def test_latin1_translation_corpus_fails(tmp_path, no_tokenizer_training):
    lines = [f"Café {i} ouvert.\tcafé {i}".encode("latin-1") for i in range(40)] + [
        line.encode() for line in tsv_lines(60)
    ]
    path = write_tsv(tmp_path, lines)
    with pytest.raises(CorpusError, match=r"pairs\.tsv: 40 of 100 lines \(40\.0%\) rejected.*first at line 1"):
        prepare(translation_config(path))


def test_rejections_under_the_threshold_are_reported_with_first_line(tmp_path):
    """A few bad lines train, and the report names each reason with its count and first line."""
    lines = [line.encode() for line in tsv_lines(200)]
    lines[4] = b"no tab on this line"
    lines[9] = b"bad \xff bytes\there"
    lines[150] = b""  # a blank line: reported, not counted
    path = write_tsv(tmp_path, lines)
    prepared = prepare(translation_config(path, max_rejected_fraction=0.02))
    report = prepared.report
    assert report["files"] == [str(path)] and report["lines"] == 200 and report["read"] == 197
    assert report["rejected"] == {"no_tab": 1, "undecodable": 1, "empty_line": 1}
    assert report["first_line"]["no_tab"] == {"file": str(path), "line": 5}
    assert report["first_line"]["undecodable"]["line"] == 10
    assert report["rejected_fraction"] == pytest.approx(2 / 200)
    text = format_data_report(report)
    assert "no tab between source and target: 1 (first at line 5)" in text
    assert "not valid UTF-8: 1 (first at line 10)" in text
    assert len(text.splitlines()) <= 4


def test_rejections_over_a_raised_threshold_train(tmp_path):
    lines = [line.encode() for line in tsv_lines(100)] + [b"no tab"] * 5
    path = write_tsv(tmp_path, lines)
    with pytest.raises(CorpusError, match="data.max_rejected_fraction = 0.01"):
        prepare(translation_config(path))
    assert prepare(translation_config(path, max_rejected_fraction=0.05)).report["rejected"] == {"no_tab": 5}


def test_jsonl_defects_count_toward_the_threshold(tmp_path, no_tokenizer_training):
    lines = [b'{"src": "a", "tgt": "b"}'] * 50 + [b"{not json"] * 3
    path = write_tsv(tmp_path, lines, name="pairs.jsonl")
    with pytest.raises(CorpusError, match=r"not valid JSON: 3 \(first at line 51\)"):
        prepare(translation_config(path, corpus="jsonl"))


def test_clean_corpus_report_is_short(tmp_path):
    path = write_tsv(tmp_path, [line.encode() for line in tsv_lines(100)])
    text = format_data_report(prepare(translation_config(path)).report)
    assert "rejected" not in text
    assert text.splitlines()[0] == f"data: {path}: 100 lines read, 100 pairs kept"


# --------------------------------------------------------------------------------------------
# Files that are not text: each says what it is
# --------------------------------------------------------------------------------------------

NOT_TEXT = {
    "empty": (b"", "empty"),
    "blank": (b"\n \n\t\n", "only whitespace"),
    "png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "PNG image"),
    "gzip": (gzip.compress(b"Hi.\t\xe5\x97\xa8\xe3\x80\x82\n" * 50), "gzip-compressed"),
    "utf16-bom": ("Hi.\t嗨。\nRun!\t跑！\n".encode("utf-16"), "UTF-16-LE"),
    "utf16-be": ("Hi.\t嗨。\nRun.\t跑。\n".encode("utf-16-be"), "UTF-16-BE"),
    "binary": (b"\x01\x02\x00\x00\x00\x07abc\x00\x00\xff" * 20, "NUL bytes"),
}


@pytest.mark.parametrize("kind", sorted(NOT_TEXT))
@pytest.mark.parametrize("corpus", ["tsv", "text"])
def test_files_that_are_not_text_are_named(tmp_path, no_tokenizer_training, kind, corpus):
    """Empty, blank, PNG, gzip, UTF-16 and binary files each get their own message naming the file
    (they used to fail with 'valid as a count must be in [0, 0]' or '0 tokens are too few')."""
    content, words = NOT_TEXT[kind]
    path = tmp_path / f"corpus.{kind}"
    path.write_bytes(content)
    config = translation_config(path) if corpus == "tsv" else lm_config(path)
    with pytest.raises(CorpusError, match=words) as info:
        prepare(config)
    assert str(path) in str(info.value)
    assert "valid as a count" not in str(info.value) and "too few" not in str(info.value)


def test_missing_file_names_the_resolved_path(tmp_path, no_tokenizer_training):
    path = tmp_path / "nowhere" / "cmn.txt"
    with pytest.raises(CorpusError, match=f"no such file or directory: {path}.*config file's directory"):
        prepare(translation_config(path))


def test_too_few_pairs_names_the_split_keys(tmp_path, no_tokenizer_training):
    path = write_tsv(tmp_path, [line.encode() for line in tsv_lines(25)])
    with pytest.raises(CorpusError, match=r"pairs\.tsv: 25 usable pairs.*data\.valid_size \(20\).*data\.test_size"):
        prepare(translation_config(path))


def test_text_directory_skips_empty_files_and_checks_the_others(tmp_path, no_tokenizer_training):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes("x".encode("utf-16"))
    with pytest.raises(CorpusError, match=r"b\.txt: the file is UTF-16"):
        prepare(lm_config(tmp_path))


# --------------------------------------------------------------------------------------------
# Validation BLEU samples
# --------------------------------------------------------------------------------------------


def test_bleu_samples_are_spread_over_a_length_sorted_validation_set(tmp_path, monkeypatch):
    """On a length-sorted corpus (Tatoeba's order) the BLEU pairs cover the whole length range,
    not the shortest ones; the same subset on every call."""
    seen = []
    monkeypatch.setattr(pipeline, "_bleu_evaluator", lambda tok, pairs, lang: seen.append(list(pairs)))
    lines = [f"{'word ' * (i // 40)}end {i}.\t{'词' * (i // 40)}完{i}。".encode() for i in range(400)]
    config = translation_config(write_tsv(tmp_path, lines), valid_size=80, test_size=10)
    prepared = prepare(config)
    prepare(config)
    first, again = seen
    assert first == again and len(first) == 8
    valid_lengths = sorted(len(s) for s, _ in prepared_valid(config))
    sample_lengths = [len(s) for s, _ in first]
    assert max(sample_lengths) >= valid_lengths[len(valid_lengths) * 3 // 4]  # reaches the long end
    assert min(sample_lengths) <= valid_lengths[len(valid_lengths) // 4]  # and the short end
    assert prepared.report["too_long"] == 0


def prepared_valid(config: Config) -> list[tuple[str, str]]:
    from moeformer.data.splits import split_pairs

    pairs, _ = pipeline.read_pairs(config)
    return split_pairs(pairs, valid=config.data.valid_size, test=config.data.test_size, seed=config.data.seed).valid


def test_missing_file_given_relative_names_the_absolute_path(tmp_path, monkeypatch, no_tokenizer_training):
    """A relative path (from --set, relative to the current directory) is named as the absolute path tried."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorpusError, match=f"no such file or directory: {tmp_path / 'rel' / 'x.tsv'} "):
        prepare(translation_config(Path("rel") / "x.tsv"))
