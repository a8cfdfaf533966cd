"""Tests for the synthetic English -> Chinese corpus (moeformer.data.synthetic), against hand-checked Chinese."""

from __future__ import annotations

import re

import pytest

from moeformer.data.synthetic import (
    NOUNS,
    chinese_number,
    date_phrase,
    duration_phrase,
    generate_pairs,
    ordinal,
    price_phrase,
    quantity_phrase,
    time_phrase,
)

NOUN = {noun.singular: noun for noun in NOUNS}
MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
               "November", "December")  # fmt: skip
MONTHS = {name: i + 1 for i, name in enumerate(MONTH_NAMES)}
CJK = re.compile(r"[\u4e00-\u9fff]")

# Hand-checked readings (plain numerals, not counting).
NUMBERS = [
    (0, "零"),
    (1, "一"),
    (2, "二"),
    (10, "十"),
    (11, "十一"),
    (15, "十五"),
    (20, "二十"),
    (99, "九十九"),
    (100, "一百"),
    (101, "一百零一"),
    (105, "一百零五"),
    (110, "一百一十"),
    (1000, "一千"),
    (1001, "一千零一"),
    (1010, "一千零一十"),
    (3205, "三千二百零五"),
    (10000, "一万"),
    (10010, "一万零一十"),
    (10100, "一万零一百"),
    (12345, "一万二千三百四十五"),
    (20000, "二万"),
    (100000, "十万"),
    (150000, "十五万"),
    (1000100, "一百万零一百"),
    (99999999, "九千九百九十九万九千九百九十九"),
]


@pytest.mark.parametrize(("n", "expected"), NUMBERS)
def test_chinese_number(n, expected):
    """Chinese numerals: 十 for a leading 10-19, one 零 per gap, 万 groups."""
    assert chinese_number(n) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [(2, "两"), (2000, "两千"), (2002, "两千零二"), (20000, "两万"), (25000, "两万五千"), (22, "二十二"), (200, "二百"),
     (12, "十二"), (3, "三")],
)  # fmt: skip
def test_counting_form_uses_liang(n, expected):
    """Counting: 两 for the count 2 and a leading 2 before 千/万, 二 elsewhere."""
    assert chinese_number(n, counting=True) == expected


@pytest.mark.parametrize("bad", [-1, 10**8, 1.5, True, "3"])
def test_chinese_number_range(bad):
    """Out-of-range or non-integer input is rejected with the allowed range."""
    with pytest.raises(ValueError, match="0 <= n < 100,000,000"):
        chinese_number(bad)


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((3, 45, "pm"), {}, ("3:45 pm", "下午3点45分")),
        ((12, 0, "am"), {}, ("12 am", "午夜12点")),
        ((12, 0, "am"), {"show_zero": True}, ("12:00 am", "午夜12点")),
        ((12, 0, "pm"), {"show_zero": True}, ("12:00 pm", "中午12点")),
        ((12, 5, "pm"), {}, ("12:05 pm", "中午12点05分")),
        ((4, 15, "am"), {}, ("4:15 am", "凌晨4点15分")),
        ((7, 5, "am"), {}, ("7:05 am", "上午7点05分")),
        ((6, 0, "pm"), {}, ("6 pm", "晚上6点")),
        ((11, 59, "pm"), {}, ("11:59 pm", "晚上11点59分")),
    ],
)
def test_time_phrase(args, kwargs, expected):
    """Clock times: period word before the hour, 点/分, minutes two digits, 12 am/pm as midnight/noon."""
    assert time_phrase(*args, **kwargs) == expected


def test_date_and_date_time():
    """Dates month-first in English, year-month-day in Chinese; the date moves before the time."""
    assert date_phrase(5, 2) == ("May 2nd", "5月2日")
    assert date_phrase(5, 2, use_ordinal=False) == ("May 2", "5月2日")
    assert date_phrase(10, 4, 2000) == ("October 4, 2000", "2000年10月4日")
    (t_en, t_zh), (d_en, d_zh) = time_phrase(3, 45, "pm"), date_phrase(5, 2)
    assert (f"at {t_en} on {d_en}", d_zh + t_zh) == ("at 3:45 pm on May 2nd", "5月2日下午3点45分")


@pytest.mark.parametrize(
    ("day", "expected"),
    [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"), (13, "13th"), (21, "21st"),
     (22, "22nd"), (31, "31st")],
)  # fmt: skip
def test_ordinal(day, expected):
    """English ordinal suffixes, 11th-13th included."""
    assert ordinal(day) == expected


def test_quantities_prices_durations():
    """Counts take Chinese numerals and a measure word; prices keep Arabic digits."""
    assert quantity_phrase(3205, NOUN["book"]) == ("3,205 books", "三千二百零五本书")
    assert quantity_phrase(1, NOUN["book"]) == ("1 book", "一本书")
    assert quantity_phrase(2, NOUN["cup of tea"]) == ("2 cups of tea", "两杯茶")
    assert quantity_phrase(20000, NOUN["car"]) == ("20,000 cars", "两万辆车")
    assert price_phrase(25) == ("$25", "25美元")
    assert price_phrase(9.5, "€") == ("€9.50", "9.50欧元")
    assert price_phrase(1200, "£") == ("£1,200", "1200英镑")
    assert duration_phrase(2, 0) == ("2 hours", "两个小时")
    assert duration_phrase(1, 2) == ("1 day", "一天")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: time_phrase(13, 0, "pm"), "hour 1-12"),
        (lambda: time_phrase(1, 0, "noon"), "period 'am' or 'pm'"),
        (lambda: date_phrase(2, 30), "no day 30 in month 2"),
        (lambda: price_phrase(3, "¥"), "unknown currency"),
        (lambda: generate_pairs(-1), "non-negative"),
    ],
)
def test_invalid_inputs(call, message):
    """Impossible times, dates, currencies and counts are rejected with the reason."""
    with pytest.raises(ValueError, match=message):
        call()


def test_generate_pairs_is_deterministic_and_diverse():
    """Same seed, same pairs; nearly all distinct; English side has no Chinese, Chinese side no Latin."""
    pairs = generate_pairs(1000, seed=0)
    assert pairs == generate_pairs(1000, seed=0)
    assert generate_pairs(0) == []
    assert len(set(pairs)) > 950
    assert all(en and zh and not CJK.search(en) and not re.search(r"[A-Za-z]", zh) for en, zh in pairs)


def test_generate_pairs_covers_every_template():
    """Dates, times, quantities, prices, ages, years and durations all appear."""
    chinese = "".join(zh for _, zh in generate_pairs(500, seed=1))
    for marker in ("月", "点", "本", "美元", "岁", "年", "个小时", "星期", "见面"):
        assert marker in chinese, marker


def test_numbers_carry_over_consistently():
    """Every Arabic number on the Chinese side is a number (or month) on the English side; ages read right."""
    for en, zh in generate_pairs(2000, seed=2):
        english_numbers = {float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", en)}
        english_numbers |= {float(number) for name, number in MONTHS.items() if name in en}
        assert {float(x) for x in re.findall(r"\d+(?:\.\d+)?", zh)} <= english_numbers, (en, zh)
        age = re.search(r"(\d+) years? old\.$", en)
        if age:
            assert zh.endswith(chinese_number(int(age.group(1)), counting=True) + "岁。"), (en, zh)


def test_train_and_held_out_seeds_barely_overlap():
    """A held-out set from another seed shares few pairs with the training set."""
    train = set(generate_pairs(2000, seed=0))
    held_out = generate_pairs(500, seed=1)
    assert sum(pair in train for pair in held_out) / len(held_out) < 0.05
