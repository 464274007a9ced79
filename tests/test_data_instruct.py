"""load_instruct_file: fields that are null, blank or not text are refused by line, not trained on as "None"."""

import json

import pytest

from fedlora.data import DataError
from fedlora.data.instruct import load_instruct_file

USER, ANSWER = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}


@pytest.mark.parametrize(
    "record, words",
    [
        ({"instruction": None, "output": "x"}, "'instruction' is null"),
        ({"instruction": "  ", "output": "x"}, "'instruction' is empty"),
        ({"instruction": ["a"], "output": "x"}, "'instruction' must be a string, got list"),
        ({"instruction": "a", "output": None}, "'output' is empty"),
        ({"instruction": "a", "output": 5}, "'output' must be a string, got int 5"),
        ({"instruction": "a", "input": ["q"], "output": "x"}, "'input' must be a string, got list"),
        ({"messages": [USER, {"role": "assistant", "content": None}]}, "no response"),
        ({"messages": [{"role": "user", "content": None}, ANSWER]}, r"the content of message 1 \('user'\) is null"),
        ({"messages": [{"role": "system", "content": ""}, USER, ANSWER]}, r"the content of message 1 \('system'\) is empty"),
        ({"messages": [{"role": None, "content": "hi"}, ANSWER]}, "the role of message 1 is null"),
        ({"messages": [ANSWER]}, "holds only the assistant's answer; it needs at least one message"),
    ],
)
def test_null_blank_or_non_text_fields_are_refused_by_line(tmp_path, record, words):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "fine", "output": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{words}"):
        load_instruct_file(f)


def test_a_null_category_is_refused_and_numbers_are_categories(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "x", "cat": 3}) + "\n" + json.dumps({"instruction": "b", "output": "y", "cat": None}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: the category field 'cat' \(data\.category_field\) is null"):
        load_instruct_file(f, category_field="cat")
    f.write_text(json.dumps({"instruction": "a", "output": "x", "cat": 3}) + "\n" + json.dumps({"instruction": "b", "output": "y", "cat": "3"}) + "\n")
    assert load_instruct_file(f, category_field="cat").label_names == ["3"]


def test_absent_null_or_empty_input_is_no_input(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"instruction": "a", "output": "x"}, {"instruction": "a", "input": None, "output": "x"}, {"instruction": "a", "input": "", "output": "x"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_instruct_file(f).prompts == [[{"role": "user", "content": "a"}]] * 3
    f = tmp_path / "d.csv"
    f.write_text("instruction,input,output\na,,x\na,b,y\n")
    assert [p[0]["content"] for p in load_instruct_file(f).prompts] == ["a", "a\n\nb"]
