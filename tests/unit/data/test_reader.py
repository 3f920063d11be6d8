"""The bad-input corpus, and every file type: a clear problem or record for each, never a traceback or hang."""

import gzip
import json

import pytest

from conftest import chat, write_jsonl
from tuneforge.data.loading import load_examples
from tuneforge.data.problems import DataError
from tuneforge.data.reader import UnusableInput, iter_records
from tuneforge.data.writer import write_records

GOOD = [chat(f"question {i}", f"answer {i}") for i in range(12)]


def problems(path):
    return [(line, item.kind) for line, item in iter_records(path) if not isinstance(item, dict)]


def test_binary_garbage_is_unusable(tmp_path):
    path = tmp_path / "blob.jsonl"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(UnusableInput, match="binary content"):
        list(iter_records(path))


def test_empty_file_has_no_records(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert list(iter_records(path)) == []
    with pytest.raises(DataError, match="at least 10 examples"):
        load_examples(path, "chat", min_examples=10)


def test_bom_and_crlf_are_read_as_plain_jsonl(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in GOOD) + b"\r\n")
    examples, fmt = load_examples(path)
    assert fmt == "chat" and len(examples) == 12 and examples[0].record["messages"][0]["content"] == "question 0"


def test_a_50mb_single_line_is_reported_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as handle:
        handle.write(json.dumps(GOOD[0]).encode() + b"\n")
        handle.write(b'{"messages": "' + b"x" * (50 * 1024 * 1024) + b'"}\n')
        handle.write(json.dumps(GOOD[1]).encode() + b"\n")
    items = list(iter_records(path))
    assert [type(item).__name__ for _, item in items] == ["dict", "DataProblem", "dict"]
    assert items[1][0] == 2 and items[1][1].kind == "line_too_long"


def test_deep_nesting_nan_and_non_objects(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [
        GOOD[0],
        '{"messages": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"messages": NaN}',
        "[1, 2, 3]",
        '{"a": 1',
        GOOD[1],
    ])
    assert problems(path) == [(2, "too_deep"), (3, "not_json"), (4, "wrong_type"), (5, "not_json")]


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + '{"text": "café"}'.encode("latin-1") + b"\n")
    assert problems(path) == [(2, "not_utf8")]


def test_truncated_gzip_reports_where_it_ends(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD * 50))
    path.write_bytes(data[: len(data) // 2])
    items = list(iter_records(path))
    assert isinstance(items[-1][1], type(items[-1][1])) and items[-1][1].kind == "truncated_file"
    assert sum(isinstance(item, dict) for _, item in items) > 0


def test_csv_with_missing_columns(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text("instruction,input,output\nAdd,2+2,4\nSubtract,5-3\n\nMultiply,,6\n")
    items = list(iter_records(path))
    assert items[0] == (2, {"instruction": "Add", "input": "2+2", "output": "4"})
    assert items[1][0] == 3 and items[1][1].kind == "missing_column"
    assert items[2] == (5, {"instruction": "Multiply", "input": "", "output": "6"})


def test_json_array_streams_and_names_the_element_line(tmp_path):
    path = tmp_path / "array.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in GOOD[:3]) + ',\n{"messages": oops}\n]')
    items = list(iter_records(path))
    assert [line for line, _ in items] == [2, 3, 4, 5] and items[3][1].kind == "not_json"


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.json.gz", "d.csv", "d.csv.gz", "d.parquet"])
def test_every_file_type_round_trips(tmp_path, name):
    path = tmp_path / name
    assert write_records(path, GOOD) == 12
    examples, fmt = load_examples(path)
    assert fmt == "chat" and [e.record["messages"] for e in examples] == [r["messages"] for r in GOOD]


def test_a_missing_file_or_directory_is_unusable(tmp_path):
    with pytest.raises(UnusableInput, match="no such file"):
        list(iter_records(tmp_path / "nope.jsonl"))
    with pytest.raises(UnusableInput, match="a directory"):
        list(iter_records(tmp_path))
