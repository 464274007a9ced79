"""load_text_file: user CSV / JSONL files and their error messages."""

import json

import numpy as np
import pytest

from fedlora.data import DataError, load_text_file


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_pair_with_label_names(tmp_path):
    f = write(
        tmp_path / "d.csv",
        'id,premise,hypothesis,label\n1,"A man, sitting.",A man sits.,entailment\n2,"He said ""no"".",He agreed.,contradiction\n3,Dogs bark.,Cats meow.,1\n',
    )
    ds = load_text_file(f, ["premise", "hypothesis"], "label", label_names=["entailment", "neutral", "contradiction"])
    assert ds.text_a == ["A man, sitting.", 'He said "no".', "Dogs bark."]
    assert ds.text_b == ["A man sits.", "He agreed.", "Cats meow."]
    assert ds.labels.tolist() == [0, 2, 1] and ds.labels.dtype == np.int64 and ds.num_classes == 3


def test_csv_single_text_integer_labels(tmp_path):
    f = write(tmp_path / "d.csv", "text,y\ngood,1\nbad,0\nfine,2\n")
    ds = load_text_file(f, "text", "y")
    assert ds.text_b is None and ds.labels.tolist() == [1, 0, 2] and ds.num_classes == 3


def test_jsonl_regression_and_classification(tmp_path):
    rows = [{"a": "x y", "b": "y z", "score": 4.5}, {"a": "p", "b": "q", "score": "0.25"}]
    f = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_text_file(f, ("a", "b"), "score", regression=True)
    assert ds.labels.dtype == np.float32 and ds.labels.tolist() == [4.5, 0.25] and ds.num_classes is None
    f = write(tmp_path / "c.jsonl", '{"t": "hi", "l": "pos"}\n{"t": "ho", "l": 0}\n')
    ds = load_text_file(f, "t", "l", label_names=["neg", "pos"])
    assert ds.labels.tolist() == [1, 0] and ds.label_names == ["neg", "pos"]


def test_missing_column_lists_columns_found(tmp_path):
    f = write(tmp_path / "d.csv", "sentence,label\nhello,1\n")
    with pytest.raises(DataError, match=r"d\.csv:2: missing column\(s\) \['text'\]; columns found: \['sentence', 'label'\]"):
        load_text_file(f, "text", "label")
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing column\(s\) \['label'\]; columns found: \['text'\]"):
        load_text_file(f, "text", "label")


def test_bad_json_names_line(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0,}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        load_text_file(f, "text", "label")
    f = write(tmp_path / "e.jsonl", '["a", 1]\n')
    with pytest.raises(DataError, match=r"e\.jsonl:1: expected a JSON object"):
        load_text_file(f, "text", "label")


@pytest.mark.parametrize(
    "label, names, message",
    [
        ("maybe", ["no", "yes"], r"unknown label 'maybe'; expected one of \['no', 'yes'\]"),
        ("2", ["no", "yes"], r"unknown label '2'"),
        ("pos", None, r"unknown label 'pos'.*pass label_names"),
        ("-1", None, r"unknown label '-1'"),
        ("1.5", None, r"unknown label '1.5'"),
    ],
)
def test_unknown_label(tmp_path, label, names, message):
    f = write(tmp_path / "d.csv", f"text,label\nok,1\nbad,{label}\n")
    with pytest.raises(DataError, match=rf"d\.csv:3: {message}"):
        load_text_file(f, "text", "label", label_names=names)


def test_bad_regression_label_and_empty_text(tmp_path):
    f = write(tmp_path / "d.csv", "text,score\nok,1.0\nbad,high\n")
    with pytest.raises(DataError, match=r"d\.csv:3: label 'high' is not a number"):
        load_text_file(f, "text", "score", regression=True)
    f = write(tmp_path / "e.csv", "text,label\n  ,1\n")
    with pytest.raises(DataError, match=r"e\.csv:2: empty text in column 'text'"):
        load_text_file(f, "text", "label")


@pytest.mark.parametrize("name, text", [("d.csv", ""), ("h.csv", "text,label\n"), ("d.jsonl", ""), ("b.jsonl", "\n\n")])
def test_empty_file(tmp_path, name, text):
    with pytest.raises(DataError, match="empty file"):
        load_text_file(write(tmp_path / name, text), "text", "label")


def test_ragged_csv_and_other_errors(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\na,1,extra\n")
    with pytest.raises(DataError, match=r"d\.csv:2: more fields"):
        load_text_file(f, "text", "label")
    f = write(tmp_path / "s.csv", "text,label\na\n")
    with pytest.raises(DataError, match=r"s\.csv:2: fewer fields"):
        load_text_file(f, "text", "label")
    with pytest.raises(DataError, match="not found"):
        load_text_file(tmp_path / "nope.csv", "text", "label")
    with pytest.raises(DataError, match="unsupported file type"):
        load_text_file(write(tmp_path / "d.parquet", "x"), "text", "label")
    with pytest.raises(DataError, match="one or two columns"):
        load_text_file(f, ["a", "b", "c"], "label")


@pytest.mark.parametrize("label", ["99999999999999999999", "1e300", "2147483648"])
def test_huge_integer_label_is_one_error_naming_the_line(tmp_path, label):
    """JSON numbers past int64 (and ids no head has) are refused with the line, not an OverflowError."""
    f = write(tmp_path / "d.jsonl", f'{{"text": "a", "label": 1}}\n{{"text": "b", "label": {label}}}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: label .* is too large for a class id"):
        load_text_file(f, "text", "label")
    if label.isdigit():  # a CSV's "1e300" is no integer string: an unknown label
        f = write(tmp_path / "d.csv", f"text,label\na,1\nb,{label}\n")
        with pytest.raises(DataError, match=r"d\.csv:3: label .* too large for a class id"):
            load_text_file(f, "text", "label")
    assert load_text_file(write(tmp_path / "ok.jsonl", '{"text": "a", "label": 2147483647}\n'), "text", "label").labels.tolist() == [2**31 - 1]


@pytest.mark.parametrize("value, kind", [('["a", "b"]', "a list"), ('{"x": 1}', "an object"), ("5", "a number"), ("true", "a boolean"), ("null", "null")])
def test_jsonl_text_that_is_no_string_is_refused(tmp_path, value, kind):
    f = write(tmp_path / "d.jsonl", f'{{"text": "fine", "label": 0}}\n{{"text": {value}, "label": 1}}\n')
    with pytest.raises(DataError, match=rf"d\.jsonl:2: column 'text' holds {kind}, not a text string"):
        load_text_file(f, "text", "label")


def test_csv_header_naming_a_column_twice_is_refused(tmp_path):
    f = write(tmp_path / "d.csv", "text,text,label\na,b,1\n")
    with pytest.raises(DataError, match=r"d\.csv:1: the header names column\(s\) \['text'\] more than once"):
        load_text_file(f, "text", "label")
    ds = load_text_file(write(tmp_path / "e.csv", "text,label,,\na,1,,\n"), "text", "label")  # unnamed columns are never read
    assert ds.text_a == ["a"] and ds.labels.tolist() == [1]
