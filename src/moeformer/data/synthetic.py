"""A synthetic English -> Chinese corpus of numbers, dates, times and quantities, generated from a seed.

The demo's built-in data: no download, yet a real translation task, because the two languages
order and write these things differently ("at 3:45 pm on May 2nd" -> "5月2日下午3点45分":
the date moves first, "pm" becomes a word before the hour) and counts change numeral system
("3,205 books" -> "三千二百零五本书", with a measure word).

Rules (those of ordinary written Mandarin; one choice where usage varies):

* Arabic numerals for calendar and clock values and for money: years "在2019年", dates
  "2019年5月2日" (always 日, never 号), times "下午3点45分", "3点05分" (minutes two digits), "3点"
  on the hour; prices "$25" -> "25美元", "€9.50" -> "9.50欧元", "£1,200" -> "1200英镑" (no
  thousands separator on the Chinese side).
* Chinese numerals for counts (of things, people, ages, durations), see :func:`chinese_number`:
  十 for 10-19 at the start (十五, 十万), 一十 inside (一百一十); one 零 per run of missing
  places (一百零五, 一千零一十, 一万零一十); 二 in general, but 两 for the count 2 and a
  leading 2 before 千 or 万 (两个, 两千, 两万五千; yet 二百, 二十二).
* Times of day by the English clock: 12 am -> 午夜12点, 1-5 am -> 凌晨, 6-11 am -> 上午,
  12 pm -> 中午12点, 1-5 pm -> 下午, 6-11 pm -> 晚上. The hour stays 12-hour (下午3点).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Pair = tuple[str, str]

_DIGITS = "零一二三四五六七八九"
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_WEEKDAYS = (("Monday", "星期一"), ("Tuesday", "星期二"), ("Wednesday", "星期三"), ("Thursday", "星期四"),
             ("Friday", "星期五"), ("Saturday", "星期六"), ("Sunday", "星期日"))  # fmt: skip
_CURRENCIES = {"$": "美元", "€": "欧元", "£": "英镑"}


@dataclass(frozen=True)
class Noun:
    """A countable thing: English singular and plural, Chinese measure word and noun."""

    singular: str
    plural: str
    measure: str
    chinese: str


NOUNS = (
    Noun("book", "books", "本", "书"), Noun("cat", "cats", "只", "猫"), Noun("dog", "dogs", "只", "狗"),
    Noun("bird", "birds", "只", "鸟"), Noun("car", "cars", "辆", "车"), Noun("bike", "bikes", "辆", "自行车"),
    Noun("cup of tea", "cups of tea", "杯", "茶"), Noun("bottle of water", "bottles of water", "瓶", "水"),
    Noun("apple", "apples", "个", "苹果"), Noun("egg", "eggs", "个", "鸡蛋"), Noun("pen", "pens", "支", "笔"),
    Noun("sheet of paper", "sheets of paper", "张", "纸"), Noun("table", "tables", "张", "桌子"),
    Noun("tree", "trees", "棵", "树"), Noun("letter", "letters", "封", "信"), Noun("chair", "chairs", "把", "椅子"),
    Noun("shirt", "shirts", "件", "衬衫"), Noun("fish", "fish", "条", "鱼"),
    Noun("computer", "computers", "台", "电脑"), Noun("house", "houses", "栋", "房子"),
)  # fmt: skip
_UNITS = (("hour", "hours", "个小时"), ("minute", "minutes", "分钟"), ("day", "days", "天"),
          ("week", "weeks", "个星期"), ("month", "months", "个月"), ("year", "years", "年"))  # fmt: skip
# English subject, Chinese subject, and the subject's forms of "to be", "to have", "was/were".
_SUBJECTS = (("I", "我", "am", "have", "was"), ("You", "你", "are", "have", "were"), ("He", "他", "is", "has", "was"),
             ("She", "她", "is", "has", "was"), ("We", "我们", "are", "have", "were"),
             ("They", "他们", "are", "have", "were"), ("My father", "我父亲", "is", "has", "was"),
             ("My sister", "我姐姐", "is", "has", "was"), ("Our teacher", "我们的老师", "is", "has", "was"),
             ("Tom", "汤姆", "is", "has", "was"), ("Mary", "玛丽", "is", "has", "was"))  # fmt: skip
_CITIES = (("Beijing", "北京"), ("Shanghai", "上海"), ("London", "伦敦"), ("Paris", "巴黎"), ("Tokyo", "东京"),
           ("New York", "纽约"), ("Berlin", "柏林"), ("Sydney", "悉尼"))  # fmt: skip
_VEHICLES = (("train", "火车"), ("bus", "公共汽车"), ("plane", "飞机"), ("ship", "船"))


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------


def chinese_number(n: int, *, counting: bool = False) -> str:
    """``n`` (0 <= n < 10**8) in Chinese numerals; ``counting`` reads a leading 2 as 两 (see module rules)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 10**8:
        raise ValueError(f"chinese_number handles integers 0 <= n < 100,000,000, got {n!r}")
    if n == 0:
        return "零"
    high, low = divmod(n, 10**4)
    text = _section(high) + "万" if high else ""
    if low:
        text += ("零" if high and low < 1000 else "") + _section(low)
    if text.startswith("一十"):
        text = text[1:]
    if counting and (n == 2 or text[:2] in ("二千", "二万")):
        text = "两" + text[1:]
    return text


def _section(n: int) -> str:
    """1 <= n < 10000 with 千/百/十 places, one 零 per run of empty places between digits."""
    out, gap = [], False
    for digit, unit in zip(f"{n:04d}", ("千", "百", "十", "")):
        if digit == "0":
            gap = bool(out)
            continue
        if gap:
            out.append("零")
            gap = False
        out.append(_DIGITS[int(digit)] + unit)
    return "".join(out)


def english_count(n: int) -> str:
    """``n`` as English writes it in running text: digits with thousands commas."""
    return f"{n:,}"


# --------------------------------------------------------------------------------------------
# phrases: each returns (English, Chinese)
# --------------------------------------------------------------------------------------------


def ordinal(day: int) -> str:
    """1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, ... 21st."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def time_phrase(hour: int, minute: int, period: str, *, show_zero: bool = False) -> Pair:
    """A 12-hour clock time: (3, 45, "pm") -> ("3:45 pm", "下午3点45分"); ``show_zero`` writes "3:00 pm"."""
    if not 1 <= hour <= 12 or not 0 <= minute <= 59 or period not in ("am", "pm"):
        raise ValueError(f"time needs hour 1-12, minute 0-59, period 'am' or 'pm'; got {hour}, {minute}, {period!r}")
    english = f"{hour}:{minute:02d} {period}" if minute or show_zero else f"{hour} {period}"
    chinese = f"{_day_part(hour, period)}{hour}点" + (f"{minute:02d}分" if minute else "")
    return english, chinese


def _day_part(hour: int, period: str) -> str:
    if period == "am":
        return "午夜" if hour == 12 else "凌晨" if hour <= 5 else "上午"
    return "中午" if hour == 12 else "下午" if hour <= 5 else "晚上"


def date_phrase(month: int, day: int, year: int | None = None, *, use_ordinal: bool = True) -> Pair:
    """(5, 2) -> ("May 2nd", "5月2日"); with a year -> ("May 2, 2019", "2019年5月2日")."""
    if not 1 <= month <= 12 or not 1 <= day <= _MONTH_DAYS[month - 1]:
        raise ValueError(f"no day {day} in month {month}")
    name = _MONTHS[month - 1]
    if year is not None:
        return f"{name} {day}, {year}", f"{year}年{month}月{day}日"
    return f"{name} {ordinal(day) if use_ordinal else day}", f"{month}月{day}日"


def quantity_phrase(count: int, noun: Noun) -> Pair:
    """(3205, book) -> ("3,205 books", "三千二百零五本书")."""
    english = f"{english_count(count)} {noun.singular if count == 1 else noun.plural}"
    return english, chinese_number(count, counting=True) + noun.measure + noun.chinese


def price_phrase(amount: int | float, currency: str = "$") -> Pair:
    """(25, "$") -> ("$25", "25美元"); cents are kept as written: (9.5, "€") -> ("€9.50", "9.50欧元")."""
    if currency not in _CURRENCIES:
        raise ValueError(f"unknown currency {currency!r}; allowed: {', '.join(_CURRENCIES)}")
    digits = f"{amount:,}" if isinstance(amount, int) else f"{amount:,.2f}"
    return f"{currency}{digits}", digits.replace(",", "") + _CURRENCIES[currency]


def duration_phrase(count: int, unit: int) -> Pair:
    """(2, 0) -> ("2 hours", "两个小时"); ``unit`` indexes hour, minute, day, week, month, year."""
    singular, plural, chinese = _UNITS[unit]
    return f"{count} {singular if count == 1 else plural}", chinese_number(count, counting=True) + chinese


# --------------------------------------------------------------------------------------------
# templates: random phrase -> sentence pair
# --------------------------------------------------------------------------------------------


def _random_time(rng: random.Random) -> Pair:
    minute = rng.choice((0, 15, 30, 45)) if rng.random() < 0.3 else rng.randrange(60)
    return time_phrase(rng.randint(1, 12), minute, rng.choice(("am", "pm")), show_zero=rng.random() < 0.5)


def _random_date(rng: random.Random, with_year: bool = False) -> Pair:
    month = rng.randint(1, 12)
    day = rng.randint(1, _MONTH_DAYS[month - 1] - (month == 2))
    year = rng.randint(1950, 2030) if with_year else None
    return date_phrase(month, day, year, use_ordinal=rng.random() < 0.7)


def _random_count(rng: random.Random) -> int:
    digits = rng.choice((1, 1, 2, 2, 3, 4, 5))
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _subject(rng: random.Random) -> tuple[str, str, str, str, str]:
    return rng.choice(_SUBJECTS)


def _t_time(rng: random.Random) -> Pair:
    en, zh = _random_time(rng)
    subj, subj_zh, *_ = _subject(rng)
    vehicle, vehicle_zh = rng.choice(_VEHICLES)
    frames = [
        (f"at {en}", zh),
        (f"The {vehicle} leaves at {en}.", f"{vehicle_zh}{zh}出发。"),
        (f"{subj} arrived at {en}.", f"{subj_zh}{zh}到了。"),
        (f"{subj} got up at {en}.", f"{subj_zh}{zh}起床了。"),
    ]
    return rng.choice(frames)


def _t_date(rng: random.Random) -> Pair:
    en, zh = _random_date(rng)
    born_en, born_zh = _random_date(rng, with_year=True)
    weekday, weekday_zh = rng.choice(_WEEKDAYS)
    subj, subj_zh, _, _, was = _subject(rng)
    frames = [
        (f"on {en}", zh),
        (f"on {weekday}, {en}", zh + weekday_zh),
        (f"{subj} left on {en}.", f"{subj_zh}{zh}离开了。"),
        (f"{subj} {was} born on {born_en}.", f"{subj_zh}出生于{born_zh}。"),
    ]
    return rng.choice(frames)


def _t_date_time(rng: random.Random) -> Pair:
    (d_en, d_zh), (t_en, t_zh) = _random_date(rng), _random_time(rng)
    we, we_zh = rng.choice((("We", "我们"), ("They", "他们"), ("You", "你们")))
    meet = (f"{we} will meet at {t_en} on {d_en}.", f"{we_zh}将在{d_zh}{t_zh}见面。")
    return rng.choice(((f"at {t_en} on {d_en}", d_zh + t_zh), meet))


def _t_quantity(rng: random.Random) -> Pair:
    en, zh = quantity_phrase(_random_count(rng), rng.choice(NOUNS))
    subj, subj_zh, _, have, _ = _subject(rng)
    frames = [
        (en, zh),
        (f"{subj} {have} {en}.", f"{subj_zh}有{zh}。"),
        (f"{subj} bought {en}.", f"{subj_zh}买了{zh}。"),
    ]
    return rng.choice(frames)


def _t_price(rng: random.Random) -> Pair:
    amount: int | float = rng.randint(1, 5000) if rng.random() < 0.7 else rng.randint(100, 99999) / 100
    en, zh = price_phrase(amount, rng.choice(tuple(_CURRENCIES)))
    noun = rng.choice(NOUNS)
    return rng.choice(((en, zh), (f"This {noun.singular} costs {en}.", f"这{noun.measure}{noun.chinese}要{zh}。")))


def _t_age(rng: random.Random) -> Pair:
    age = rng.randint(1, 99)
    subj, subj_zh, be, _, _ = _subject(rng)
    years, age_zh = "year" if age == 1 else "years", chinese_number(age, counting=True)
    frames = [(f"{subj} {be} {age} {years} old.", f"{subj_zh}{age_zh}岁。"),
              (f"{subj} will be {age} next year.", f"{subj_zh}明年{age_zh}岁。")]  # fmt: skip
    return rng.choice(frames)


def _t_year(rng: random.Random) -> Pair:
    year, bare_year = rng.randint(1900, 2030), rng.randint(1800, 2099)
    subj, subj_zh, _, _, was = _subject(rng)
    city, city_zh = rng.choice(_CITIES)
    frames = [
        (f"in {bare_year}", f"在{bare_year}年"),
        (f"{subj} {was} born in {year}.", f"{subj_zh}出生于{year}年。"),
        (f"{subj} moved to {city} in {year}.", f"{subj_zh}在{year}年搬到了{city_zh}。"),
        (f"{subj} visited {city} in {year}.", f"{subj_zh}在{year}年去了{city_zh}。"),
    ]
    return rng.choice(frames)


def _t_duration(rng: random.Random) -> Pair:
    en, zh = duration_phrase(rng.randint(1, 60) if rng.random() < 0.8 else rng.randint(61, 500), rng.randrange(6))
    subj, subj_zh, *_ = _subject(rng)
    city, city_zh = rng.choice(_CITIES)
    frames = [
        (f"for {en}", zh),
        (f"{subj} waited for {en}.", f"{subj_zh}等了{zh}。"),
        (f"{subj} worked for {en}.", f"{subj_zh}工作了{zh}。"),
        (f"{subj} stayed in {city} for {en}.", f"{subj_zh}在{city_zh}待了{zh}。"),
    ]
    return rng.choice(frames)


# The templates and their weights (roughly the size of each one's space of sentences).
TEMPLATES: dict[str, tuple[Callable[[random.Random], Pair], int]] = {
    "time": (_t_time, 2),
    "date": (_t_date, 2),
    "date_time": (_t_date_time, 3),
    "quantity": (_t_quantity, 4),
    "price": (_t_price, 2),
    "age": (_t_age, 1),
    "year": (_t_year, 2),
    "duration": (_t_duration, 2),
}


def generate_pairs(n: int, seed: int = 0) -> list[Pair]:
    """``n`` (English, Chinese) pairs drawn from every template; the same ``seed`` gives the same list."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(seed)
    makers = [maker for maker, _ in TEMPLATES.values()]
    weights = [weight for _, weight in TEMPLATES.values()]
    return [rng.choices(makers, weights)[0](rng) for _ in range(n)]
