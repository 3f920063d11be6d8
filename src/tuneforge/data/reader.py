"""Stream records out of a data file, one at a time, with their line numbers.

Problems that make a line unreadable (bad UTF-8, not JSON, not an object, too long) come out of the
stream as DataProblem values in the record's place, so a validator can report every bad line in one
pass without holding the file in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tuneforge.data.problems import DataError, DataProblem, json_type

MAX_LINE_BYTES = 8 * 1024 * 1024  # one example over 8 MiB is a data mistake, not a long conversation
MAX_JSON_DEPTH = 64


def _reject_constant(name: str) -> float:
    # NaN and Infinity are not JSON; Python's parser accepts them unless told otherwise.
    raise ValueError(f"{name} is not valid JSON")


def _depth(value: object, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping once it passes limit."""
    depth, frontier = 0, [value]
    while frontier and depth <= limit:
        nxt = []
        for item in frontier:
            if isinstance(item, dict):
                nxt.extend(item.values())
            elif isinstance(item, list):
                nxt.extend(item)
        frontier, depth = nxt, depth + 1 if nxt else depth
    return depth


def iter_jsonl(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, dict | DataProblem]]:
    """Yield (line number, record or problem) for every non-blank line of a JSONL file."""
    path = Path(path)
    name = str(path)
    with open(path, "rb") as handle:
        line_no = 0
        while True:
            raw = handle.readline(max_line_bytes + 1)
            if not raw:
                return
            line_no += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                # Skip the rest of the oversized line without reading it into memory.
                while raw and not raw.endswith(b"\n"):
                    raw = handle.readline(1024 * 1024)
                yield line_no, DataProblem(
                    name, line_no, "line_too_long", "", f"a line of at most {max_line_bytes} bytes", "a longer line"
                )
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark, as Windows editors write it
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, DataProblem(
                    name, line_no, "not_utf8", "", "UTF-8 text", f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
                )
                continue
            text = text.strip()
            if not text:
                continue
            try:
                value = json.loads(text, parse_constant=_reject_constant)
            except RecursionError:
                yield line_no, DataProblem(name, line_no, "too_deep", "", f"JSON nested at most {MAX_JSON_DEPTH} deep", "deeper nesting")
                continue
            except ValueError as exc:
                detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                column = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
                yield line_no, DataProblem(name, line_no, "not_json", "", "a JSON object", f"invalid JSON ({detail}{column})")
                continue
            if not isinstance(value, dict):
                yield line_no, DataProblem(name, line_no, "wrong_type", "", "a JSON object per line", json_type(value))
                continue
            if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
                yield line_no, DataProblem(name, line_no, "too_deep", "", f"JSON nested at most {MAX_JSON_DEPTH} deep", "deeper nesting")
                continue
            yield line_no, value


def check_readable(path: str | Path) -> Path:
    """Fail early, with one clear sentence, when a data path cannot be opened at all."""
    path = Path(path)
    if not path.exists():
        raise DataError([DataProblem(str(path), 0, "no_such_file", "", "an existing data file", "no such file")])
    if path.is_dir():
        raise DataError([DataProblem(str(path), 0, "not_a_file", "", "a data file", "a directory")])
    return path
