"""Tests for corpus cleaning (moeformer.data.cleaning): normalisation, filters and their report."""

from __future__ import annotations

import pytest

from moeformer.config import ConfigError
from moeformer.data.cleaning import CleaningConfig, clean_pairs, clean_text
from moeformer.data.readers import read_tsv


@pytest.mark.parametrize(
    ("raw", "form", "expected"),
    [
        ("ｆｕｌｌ\u3000ｗｉｄｔｈ？", "NFKC", "full width?"),  # full-width letters, ideographic space
        ("你好吗？", "NFKC", "你好吗?"),
        ("你好吗？", "NFC", "你好吗？"),  # NFC keeps full-width punctuation
        ("  many   spaces\there \n", "NFKC", "many spaces here"),
        ("a\x00b\x07c\x1bd", "NFKC", "abcd"),  # control characters dropped
        ("zero\u200bwidth\ufeff", "NFKC", "zerowidth"),
        ("cafe\u0301", "NFC", "café"),  # combining accent composed
        ("ﬁle", "none", "ﬁle"),  # no normalisation: the ligature stays
        ("ﬁle", "NFKC", "file"),
        ("👍🏽 ok", "NFKC", "👍🏽 ok"),  # emoji with a skin-tone modifier untouched
    ],
)
def test_clean_text(raw, form, expected):
    """clean_text normalises, drops control/invisible characters and collapses whitespace."""
    assert clean_text(raw, form) == expected


def test_clean_pairs_counts_every_reason():
    """Each filter rejects its own pair and counts it; survivors keep their order."""
    config = CleaningConfig(min_chars=2, max_chars=20, max_ratio=4.0)
    pairs = [
        ("Hello there.", "你好。"),  # kept
        ("  Hello   there. ", "你好。"),  # cleans into a duplicate of the first
        ("\x07", "空"),  # empty after clean-up
        ("A", "一"),  # too short (1 < 2)
        ("x" * 21, "太长了"),  # too long (21 > 20)
        ("This is rather long.", "短"),  # too short on the target side
        ("This is long text.", "很短"),  # ratio 18 / 2 = 9 > 4
        ("Bye.", "再见。"),  # kept
    ]
    kept, report = clean_pairs(pairs, config)
    assert kept == [("Hello there.", "你好。"), ("Bye.", "再见。")]
    assert report.kept == 2 and report.changed == 0
    assert report.rejected == {"duplicate": 1, "empty": 1, "too_short": 2, "too_long": 1, "length_ratio": 1}
    assert report.kept + report.n_rejected == len(pairs)


def test_clean_pairs_counts_changed_pairs_and_can_keep_duplicates():
    """changed counts pairs the clean-up rewrote; dedupe=False keeps repeats."""
    pairs = [("Hi ", "嗨"), ("Hi", "嗨"), ("Hi", "嗨")]
    kept, report = clean_pairs(pairs, CleaningConfig(dedupe=False, max_ratio=None))
    assert kept == [("Hi", "嗨")] * 3
    assert report.changed == 1 and report.rejected == {}


def test_clean_pairs_cleans_the_chinese_side_as_chinese():
    """CleaningConfig.chinese: that side keeps "？" (and gets it for "?" after CJK); the other is NFKC'd."""
    pairs = [("Are you OK？", "你好吗?"), ("你好吗？", "Are you OK？")]
    assert clean_pairs(pairs, CleaningConfig(chinese="target"))[0] == [
        ("Are you OK?", "你好吗？"),
        ("你好吗?", "Are you OK？"),  # a Chinese side keeps its full-width marks wherever they are
    ]
    assert clean_pairs(pairs, CleaningConfig(chinese="source"))[0][1] == ("你好吗？", "Are you OK?")
    assert clean_pairs(pairs)[0][0] == ("Are you OK?", "你好吗?")  # default: NFKC on both sides, as before


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"min_chars": 0}, "min_chars", "must be at least 1"),
        ({"min_chars": 5, "max_chars": 4}, "max_chars", ">= min_chars"),
        ({"max_ratio": 0.5}, "max_ratio", ">= 1"),
        ({"unicode_form": "NFD"}, "unicode_form", "one of 'NFKC', 'NFC', 'none'"),
        ({"min_chars": "3"}, "min_chars", "expected int"),
        ({"chinese": "zh"}, "chinese", "one of 'none', 'source', 'target', 'both'"),
    ],
)
def test_config_errors_name_the_field(options, field, message):
    """A bad CleaningConfig value raises ConfigError keyed by the field, saying what is allowed."""
    with pytest.raises(ConfigError, match=message) as info:
        CleaningConfig(**options)
    assert info.value.key == field


def test_config_rejects_unknown_and_positional_arguments():
    """CleaningConfig is keyword-only: a misspelled key fails loudly."""
    with pytest.raises(TypeError):
        CleaningConfig(max_char=10)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        CleaningConfig("NFKC")  # type: ignore[misc]


def test_clean_real_tatoeba(shared_data):
    """On cmn.txt the defaults keep almost everything, and every kept pair meets the limits."""
    pairs, _ = read_tsv(shared_data("cmn-eng", "cmn.txt"))
    config = CleaningConfig()
    kept, report = clean_pairs(pairs, config)
    assert report.kept + report.n_rejected == len(pairs)
    assert report.kept > 0.99 * len(pairs)
    assert set(report.rejected) <= {"length_ratio", "duplicate", "too_long"}
    assert len(set(kept)) == len(kept)
    for source, target in kept:
        shorter, longer = sorted((len(source), len(target)))
        assert 1 <= shorter and longer <= config.max_chars and longer / shorter <= config.max_ratio
        assert source == " ".join(source.split()) and "？" not in target  # collapsed spaces, NFKC folded "？"
