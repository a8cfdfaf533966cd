"""Tests for the instruction loader (moeformer.refusal.instructions): every format, every defect named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeformer.refusal.instructions import InstructionError, load_instructions, sample_instructions


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path: Path, name: str, value: object) -> Path:
    return write(tmp_path, name, json.dumps(value))


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def test_json_list_of_strings(tmp_path):
    path = write_json(tmp_path, "a.json", ["Write a poem", "Explain tides"])
    assert load_instructions(path) == ["Write a poem", "Explain tides"]


def test_json_objects_take_the_first_accepted_field(tmp_path):
    """"instruction" wins over "prompt"; an object with only "goal" uses "goal"; other keys ignored."""
    items = [{"prompt": "p", "instruction": "i", "category": "c"}, {"goal": "g"}, {"behavior": "b"}, {"text": "t"}]
    assert load_instructions(write_json(tmp_path, "a.json", items)) == ["i", "g", "b", "t"]


def test_json_strings_and_objects_may_mix(tmp_path):
    assert load_instructions(write_json(tmp_path, "a.json", ["s", {"prompt": "p"}])) == ["s", "p"]


def test_explicit_field(tmp_path):
    path = write_json(tmp_path, "a.json", [{"instruction": "i", "question": "q"}])
    assert load_instructions(path, field="question") == ["q"]


def test_jsonl_objects_and_strings_blank_lines_skipped(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"instruction": "one"}\n\n"two"\n   \n{"goal": "three"}\n')
    assert load_instructions(path) == ["one", "two", "three"]


def test_csv_column_chosen_by_header(tmp_path):
    """AdvBench-style CSV: "goal" is picked; a quoted comma and a BOM are handled."""
    path = write(tmp_path, "a.csv", '\ufeffgoal,target\n"Say hi, twice",Sure\nCount to 3,Sure\n')
    assert load_instructions(path) == ["Say hi, twice", "Count to 3"]
    assert load_instructions(path, field="target") == ["Sure", "Sure"]


def test_txt_one_per_nonblank_line(tmp_path):
    path = write(tmp_path, "a.txt", "  first  \r\n\nsecond\n\n")
    assert load_instructions(path) == ["first", "second"]


def test_unknown_suffix_reads_as_text(tmp_path):
    assert load_instructions(write(tmp_path, "prompts", "a\nb\n")) == ["a", "b"]


def test_limit_keeps_the_first_n(tmp_path):
    path = write(tmp_path, "a.txt", "a\nb\nc\n")
    assert load_instructions(path, limit=2) == ["a", "b"]
    assert load_instructions(path, limit=10) == ["a", "b", "c"]


def test_real_harmful_val(shared_data):
    """The split the refusal direction is selected on: a JSON list of {"instruction", "category"}."""
    path = shared_data("refusal", "splits", "harmful_val.json")
    instructions = load_instructions(path)
    assert len(instructions) == len(json.loads(path.read_text(encoding="utf-8")))
    assert all(isinstance(s, str) and s.strip() for s in instructions)
    assert load_instructions(path, limit=5) == instructions[:5]


# --------------------------------------------------------------------------------------------
# Errors: each names the file, where, and what is allowed
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InstructionError, match=r"nope\.json: no such file"):
        load_instructions(tmp_path / "nope.json")


def test_undecodable_utf8_names_the_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(InstructionError, match=r"a\.txt: line 2 is not valid UTF-8"):
        load_instructions(path)


def test_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path, "a.json", '[\n  "ok",\n  "missing quote\n]')
    with pytest.raises(InstructionError, match=r"a\.json: invalid JSON at line 3"):
        load_instructions(path)


def test_invalid_jsonl_names_the_line(tmp_path):
    path = write(tmp_path, "a.jsonl", '"ok"\n\n{"instruction": \n')
    with pytest.raises(InstructionError, match=r"a\.jsonl: invalid JSON at line 3"):
        load_instructions(path)


def test_json_top_level_not_a_list(tmp_path):
    path = write_json(tmp_path, "a.json", {"instruction": "x"})
    with pytest.raises(InstructionError, match=r"top level is a JSON object; allowed: a list"):
        load_instructions(path)


@pytest.mark.parametrize("item, kind", [(3, "number"), ([1], "list"), (None, "null")])
def test_item_neither_string_nor_object(tmp_path, item, kind):
    path = write_json(tmp_path, "a.json", ["ok", item])
    with pytest.raises(InstructionError, match=rf"index 1 is a JSON {kind}; allowed: a string or an object"):
        load_instructions(path)


def test_object_without_field_lists_its_keys_and_the_accepted_fields(tmp_path):
    path = write_json(tmp_path, "a.json", [{"instruction": "ok"}, {"question": "q", "id": 7}])
    with pytest.raises(InstructionError) as info:
        load_instructions(path)
    message = str(info.value)
    assert "index 1" in message and "'question', 'id'" in message
    assert all(repr(k) in message for k in ("instruction", "prompt", "goal", "behavior", "text"))


def test_object_without_explicit_field(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"prompt": "p"}\n')
    with pytest.raises(InstructionError, match=r"line 1 has no field 'goal' \(its keys: 'prompt'\)"):
        load_instructions(path, field="goal")


def test_non_string_value(tmp_path):
    path = write_json(tmp_path, "a.json", [{"instruction": ["a", "b"]}])
    with pytest.raises(InstructionError, match=r"index 0: field 'instruction' is a JSON list; allowed: a non-empty"):
        load_instructions(path)


@pytest.mark.parametrize("items", [["ok", "  "], [{"prompt": ""}]])
def test_empty_value(tmp_path, items):
    path = write_json(tmp_path, "a.json", items)
    with pytest.raises(InstructionError, match=r"is empty; allowed: a non-empty string"):
        load_instructions(path)


def test_csv_header_without_field_lists_columns(tmp_path):
    path = write(tmp_path, "a.csv", "question,answer\nq,a\n")
    with pytest.raises(InstructionError, match=r"CSV header has none of the accepted fields .*'question', 'answer'"):
        load_instructions(path)


def test_csv_short_row_and_empty_cell(tmp_path):
    with pytest.raises(InstructionError, match=r"line 3: column 'prompt' is missing"):
        load_instructions(write(tmp_path, "a.csv", "id,prompt\n1,ok\n2\n"))
    with pytest.raises(InstructionError, match=r"line 2: column 'prompt' is empty"):
        load_instructions(write(tmp_path, "b.csv", "id,prompt\n1,\n"))


@pytest.mark.parametrize("name, text", [("a.json", "[]"), ("a.jsonl", "\n\n"), ("a.txt", " \n"), ("a.csv", "goal\n")])
def test_zero_instructions_is_empty(tmp_path, name, text):
    with pytest.raises(InstructionError, match=r"empty; it holds no instruction"):
        load_instructions(write(tmp_path, name, text))


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(tmp_path, limit):
    with pytest.raises(InstructionError, match=rf"limit must be a positive number of instructions, got {limit}"):
        load_instructions(write(tmp_path, "a.txt", "a\n"), limit=limit)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sample_is_deterministic_for_a_seed():
    items = [f"item {i}" for i in range(50)]
    first = sample_instructions(items, 10, seed=42)
    assert first == sample_instructions(items, 10, seed=42)
    assert len(first) == 10 and len(set(first)) == 10 and set(first) <= set(items)
    assert first != sample_instructions(items, 10, seed=43)
    assert items == [f"item {i}" for i in range(50)]  # the input is not shuffled in place


def test_sample_of_n_at_least_len_returns_all_in_order():
    items = ["a", "b", "c"]
    assert sample_instructions(items, 3, seed=0) == items
    assert sample_instructions(items, 10, seed=0) == items


def test_sample_n_must_be_positive():
    with pytest.raises(ValueError, match=r"n must be a positive number"):
        sample_instructions(["a"], 0, seed=0)
