"""InputLimits: an untrusted file is refused before it inflates past its bounds or holds too many lines or
records, small files never are, and validation keeps no per-record Python objects."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import pytest

from conftest import chat, write_jsonl
from tuneforge.data.reader import InputLimits, InputTooLarge, check_limits, iter_records
from tuneforge.data.validation import validate_file


def gz(path, data: bytes):
    path.write_bytes(gzip.compress(data, compresslevel=9))
    return path


def test_the_ratio_is_checked_only_past_the_floor(tmp_path):
    small = gz(tmp_path / "small.jsonl.gz", b"\n" * (1 << 20))  # 1000:1, but only 1 MiB
    check_limits(small, InputLimits(max_ratio=10, ratio_floor_bytes=8 << 20))
    big = gz(tmp_path / "big.jsonl.gz", b"\n" * (16 << 20))
    with pytest.raises(InputTooLarge, match="inflates to more than 10 times its size"):
        check_limits(big, InputLimits(max_ratio=10, ratio_floor_bytes=8 << 20))


def test_inflated_bytes_and_lines_are_bounded_blank_lines_included(tmp_path):
    path = gz(tmp_path / "d.jsonl.gz", b"\n" * (3 << 20))
    with pytest.raises(InputTooLarge, match="inflates past 2 MiB"):
        check_limits(path, InputLimits(max_inflated_bytes=2 << 20))
    with pytest.raises(InputTooLarge, match="has more than 1,000 lines"):
        check_limits(path, InputLimits(max_lines=1000))
    exact = write_jsonl(tmp_path / "exact.jsonl", [chat("q", "a")] * 9 + ['{"messages": []}'.rstrip()])
    check_limits(exact, InputLimits(max_lines=10))
    (tmp_path / "unterminated.jsonl").write_text(exact.read_text() + "{}")  # an 11th line without its newline
    with pytest.raises(InputTooLarge):
        check_limits(tmp_path / "unterminated.jsonl", InputLimits(max_lines=10))


def test_records_are_counted_while_reading_a_json_array_on_one_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([chat("q", "a")] * 50))
    records = iter_records(path, limits=InputLimits(max_lines=10, max_records=20))
    with pytest.raises(InputTooLarge, match="has more than 20 records"):
        list(records)


def test_validation_reports_a_bound_as_one_whole_file_problem(tmp_path):
    path = gz(tmp_path / "bomb.jsonl.gz", b'{"text": "a"}\n' * 100_000)
    report = validate_file(path, limits=InputLimits(max_lines=1000))
    assert report.unusable and list(report.counts) == ["too_large"]
    problem = report.samples["too_large"][0]
    assert (problem.line, problem.found) == (0, "has more than 1,000 lines")
    assert validate_file(path).valid  # without limits (the CLI on one's own file), nothing is refused


def test_validation_keeps_no_python_object_per_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": 1}'] * 100_000)
    tracemalloc.start()
    report = validate_file(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.records == 100_000 and report.counts["wrong_type"] == 100_000
    assert peak < 2 << 20, f"peak {peak / (1 << 20):.1f} MiB"
