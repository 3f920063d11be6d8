"""Stream records out of a data file, one at a time, with their line (or row) numbers.

JSONL, a JSON array, CSV and Parquet, each optionally gzip-compressed, are read without loading the
file whole. Problems that make a record unreadable (bad UTF-8, not JSON, too long, too deep, a torn
gzip) come out of the stream as DataProblem values in the record's place, so a validator reports
every bad line in one pass. A file that cannot be read at all raises UnusableInput; one that would cost
more than its InputLimits (inflated bytes, compression ratio, lines, records) raises InputTooLarge.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.problems import DataError, DataProblem, json_type

MAX_LINE_BYTES = 8 * 1024 * 1024  # one example over 8 MiB is a data mistake, not a long conversation
MAX_JSON_DEPTH = 64
SCAN_CHUNK = 1 << 20
FILE_TYPES = ("jsonl", "json", "csv", "parquet")
Record = tuple[int, "dict | DataProblem"]


class UnusableInput(DataError):
    """The file cannot be read as data at all (missing, binary, unknown type): nothing to validate."""


class InputTooLarge(UnusableInput):
    """Reading the file would cost more than its InputLimits allow (a decompression or record bomb)."""

    def __init__(self, path: Path, *, found: str, expected: str):
        super().__init__([DataProblem(str(path), 0, "too_large", "", expected, found)],
                         headline=f"{path} {found} (expected {expected})")


@dataclass(frozen=True)
class InputLimits:
    """What reading one untrusted file may cost; None means unbounded (the CLI reads the user's own files).

    Inflated bytes, the compression ratio and lines are counted in one pass over the decompressed bytes
    before any record is parsed (hundreds of MB/s, so a bomb is refused in seconds, not after minutes of
    parsing); records are counted while parsing (a JSON array can hold many per line)."""

    max_inflated_bytes: int | None = None
    max_ratio: float | None = None  # inflated / stored bytes of a gzip file ...
    ratio_floor_bytes: int = 64 << 20  # ... checked only past this many inflated bytes: small files always pass
    max_lines: int | None = None  # newlines, blank lines included (each costs a parse step)
    max_records: int | None = None


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{int(n)} bytes"


def check_limits(path: str | Path, limits: InputLimits) -> None:
    """Raise InputTooLarge when the file inflates past its limits or has too many lines; a torn gzip
    passes (the record stream reports it, with its line)."""
    path = Path(path)
    if file_type(path) == "parquet":
        return  # columnar: its rows are counted as records; its pages decompress one row group at a time
    compressed = _compressed(path)
    inflated_cap = limits.max_inflated_bytes
    ratio_cap = None
    if compressed and limits.max_ratio is not None:
        ratio_cap = max(limits.ratio_floor_bytes, int(limits.max_ratio * path.stat().st_size))
    inflated = lines = 0
    last = b"\n"
    try:
        with _open_binary(path) as handle:
            while chunk := handle.read(SCAN_CHUNK):
                inflated += len(chunk)
                lines += chunk.count(b"\n")
                last = chunk[-1:]
                if inflated_cap is not None and inflated > inflated_cap:
                    raise InputTooLarge(path, found=f"inflates past {_size(inflated_cap)}",
                                        expected=f"at most {_size(inflated_cap)} decompressed")
                if ratio_cap is not None and inflated > ratio_cap:
                    raise InputTooLarge(path, found=f"inflates to more than {limits.max_ratio:g} times its size",
                                        expected=f"a compression ratio of at most {limits.max_ratio:g} "
                                                 f"past {_size(limits.ratio_floor_bytes)}")
                _check_lines(path, lines, limits)
    except (EOFError, zlib.error, OSError):
        return
    _check_lines(path, lines + (last != b"\n"), limits)  # a last line without its newline is a line too


def _check_lines(path: Path, lines: int, limits: InputLimits) -> None:
    if limits.max_lines is not None and lines > limits.max_lines:
        raise InputTooLarge(path, found=f"has more than {limits.max_lines:,} lines",
                            expected=f"at most {limits.max_lines:,} lines, blank ones included")


def _count_records(records: Iterator[Record], path: Path, max_records: int) -> Iterator[Record]:
    for count, record in enumerate(records, 1):
        if count > max_records:
            raise InputTooLarge(path, found=f"has more than {max_records:,} records",
                                expected=f"at most {max_records:,} records")
        yield record


def _unusable(path: Path, expected: str, found: str) -> UnusableInput:
    return UnusableInput([DataProblem(str(path), 0, "unusable_input", "", expected, found)])


def _reject_constant(name: str) -> float:
    # NaN and Infinity are not JSON; Python's parser accepts them unless told otherwise.
    raise ValueError(f"{name} is not valid JSON")


def _too_deep(value: object, limit: int) -> bool:
    depth, frontier = 0, [value]
    while frontier:
        depth += 1
        if depth > limit:
            return True
        frontier = [v for item in frontier if isinstance(item, (dict, list))
                    for v in (item.values() if isinstance(item, dict) else item) if isinstance(v, (dict, list))]
    return False


def _parse_record(text: str, name: str, line: int) -> dict | DataProblem:
    """One JSON object, or the problem that stops it from being one."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return DataProblem(name, line, "too_deep", "", f"JSON nested at most {MAX_JSON_DEPTH} deep", "deeper nesting")
    except ValueError as exc:
        detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        return DataProblem(name, line, "not_json", "", "a JSON object", f"invalid JSON ({detail})")
    if not isinstance(value, dict):
        return DataProblem(name, line, "wrong_type", "", "a JSON object per record", json_type(value))
    # Nesting cannot be deeper than the number of brackets: count them (fast) before walking the record.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _too_deep(value, MAX_JSON_DEPTH):
        return DataProblem(name, line, "too_deep", "", f"JSON nested at most {MAX_JSON_DEPTH} deep", "deeper nesting")
    return value


def _compressed(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def file_type(path: str | Path) -> str:
    """jsonl, json, csv or parquet, from the name (a .gz suffix is looked through) or the content."""
    path = Path(path)
    suffixes = [s.lower().lstrip(".") for s in path.suffixes]
    if suffixes and suffixes[-1] in ("gz", "gzip"):
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind in ("jsonl", "ndjson"):
        return "jsonl"
    if kind in FILE_TYPES:
        return kind
    with _open_binary(path) as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    return "json" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[") else "jsonl"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if _compressed(path) else open(path, "rb")


def check_readable(path: str | Path) -> Path:
    """Fail early, with one clear sentence, when a data path cannot be read as data at all."""
    path = Path(path)
    if not path.exists():
        raise _unusable(path, "an existing data file", "no such file")
    if path.is_dir():
        raise _unusable(path, "a data file", "a directory")
    if file_type(path) != "parquet":
        try:
            with _open_binary(path) as handle:
                head = handle.read(8192)
        except (OSError, EOFError, zlib.error) as exc:
            raise _unusable(path, "a readable (gzip) file", f"{type(exc).__name__}: {exc}") from None
        if b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise _unusable(path, "a text data file (JSONL, JSON, CSV) or Parquet", "binary content (NUL bytes)")
    return path


def _iter_lines(path: Path, max_line_bytes: int, byte_range: tuple[int, int, int] | None = None
                ) -> Iterator[tuple[int, bytes | DataProblem]]:
    """Raw lines with numbers; an over-long line is skipped without being read into memory.

    byte_range (start, end, number of the line at start - 1) reads only the lines starting in [start, end)."""
    name = str(path)
    line_no = 0
    handle = _open_binary(path)
    end = None
    if byte_range is not None:
        start, end, line_no = byte_range
        handle.seek(start)
    try:
        while end is None or handle.tell() < end:
            try:
                raw = handle.readline(max_line_bytes + 1)
            except (EOFError, zlib.error, OSError) as exc:
                yield line_no + 1, DataProblem(name, line_no + 1, "truncated_file", "", "a complete gzip stream",
                                               f"the file ends early ({exc})")
                return
            if not raw:
                return
            line_no += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = handle.readline(1 << 20)
                yield line_no, DataProblem(name, line_no, "line_too_long", "", f"a line of at most {max_line_bytes} bytes",
                                           "a longer line")
                continue
            yield line_no, raw
    finally:
        handle.close()


def _decode(raw: bytes, name: str, line: int) -> str | DataProblem:
    if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark, as Windows editors write it
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DataProblem(name, line, "not_utf8", "", "UTF-8 text", f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}")


def _iter_jsonl(path: Path, max_line_bytes: int, byte_range: tuple[int, int, int] | None = None) -> Iterator[Record]:
    name = str(path)
    for line_no, raw in _iter_lines(path, max_line_bytes, byte_range):
        if isinstance(raw, DataProblem):
            yield line_no, raw
            continue
        text = _decode(raw, name, line_no)
        if isinstance(text, DataProblem):
            yield line_no, text
        elif text.strip():  # CRLF endings and blank lines are fine
            yield line_no, _parse_record(text, name, line_no)


def _iter_json_array(path: Path, max_line_bytes: int) -> Iterator[Record]:
    """The elements of a top-level JSON array, streamed; numbers are the element's starting line."""
    name = str(path)
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    handle = _open_binary(path)
    reader = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="strict")
    buffer, line, started, done = "", 1, False, False

    def fill() -> bool:
        nonlocal buffer
        chunk = reader.read(1 << 16)
        buffer += chunk
        return bool(chunk)

    try:
        while not done:
            stripped = buffer.lstrip(" \t\r\n,")
            line += buffer[: len(buffer) - len(stripped)].count("\n")
            buffer = stripped
            if not buffer and not fill():
                if not started:
                    return
                yield line, DataProblem(name, line, "not_json", "", "a JSON array closed with ]", "the file ends early")
                return
            if not buffer:
                continue
            if not started:
                if buffer[0] != "[":
                    yield line, DataProblem(name, line, "not_json", "", "a JSON array of records", f"{buffer[:20]!r}")
                    return
                started, buffer = True, buffer[1:]
                continue
            if buffer[0] == "]":
                done = True
                continue
            try:
                value, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError as exc:
                if len(buffer) <= max_line_bytes and fill():
                    continue  # the element continues in the next chunk
                where = line + buffer[: exc.pos].count("\n")
                yield where, DataProblem(name, where, "not_json", "", "a JSON array of records",
                                         f"invalid JSON ({exc.msg}); the rest of the array cannot be read")
                return
            except RecursionError:
                yield line, DataProblem(name, line, "too_deep", "", f"JSON nested at most {MAX_JSON_DEPTH} deep",
                                        "deeper nesting; the rest of the array cannot be read")
                return
            if not isinstance(value, dict):
                yield line, DataProblem(name, line, "wrong_type", "", "a JSON object per record", json_type(value))
            elif _too_deep(value, MAX_JSON_DEPTH):
                yield line, DataProblem(name, line, "too_deep", "", f"JSON nested at most {MAX_JSON_DEPTH} deep",
                                        "deeper nesting")
            else:
                yield line, value
            line += buffer[:end].count("\n")
            buffer = buffer[end:]
    except UnicodeDecodeError as exc:
        yield line, DataProblem(name, line, "not_utf8", "", "UTF-8 text", f"byte 0x{exc.object[exc.start]:02x}")
    except (EOFError, zlib.error, OSError) as exc:
        yield line, DataProblem(name, line, "truncated_file", "", "a complete gzip stream", f"the file ends early ({exc})")
    finally:
        reader.close()


def _cell(value: str) -> object:
    """CSV cells are text; a cell holding a JSON array or object (e.g. messages) is parsed."""
    stripped = value.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped, parse_constant=_reject_constant)
        except ValueError:
            return value
    return value


def _iter_csv(path: Path, max_line_bytes: int) -> Iterator[Record]:
    name = str(path)
    handle = _open_binary(path)
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="strict", newline="")
    csv.field_size_limit(max_line_bytes)
    try:
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            return
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            yield 1, DataProblem(name, 1, "bad_header", "", "distinct column names", f"columns {header}")
            return
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, DataProblem(name, start, "bad_csv", "", "a CSV row", str(exc))
                return
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield start, DataProblem(name, start, "missing_column" if len(row) < len(header) else "extra_column", "",
                                         f"{len(header)} columns ({', '.join(header)})", f"{len(row)} columns")
                continue
            yield start, {key: _cell(value) for key, value in zip(header, row)}
    except UnicodeDecodeError as exc:
        yield reader.line_num + 1, DataProblem(name, reader.line_num + 1, "not_utf8", "", "UTF-8 text",
                                               f"byte 0x{exc.object[exc.start]:02x}")
    except (EOFError, zlib.error, OSError) as exc:
        yield reader.line_num + 1, DataProblem(name, reader.line_num + 1, "truncated_file", "", "a complete gzip stream",
                                               f"the file ends early ({exc})")
    finally:
        text.close()


def _iter_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for a torn or foreign file
        raise _unusable(path, "a Parquet file", f"{type(exc).__name__}: {exc}") from None
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, {k: v for k, v in record.items() if v is not None}
    except Exception as exc:
        yield row + 1, DataProblem(str(path), row + 1, "truncated_file", "", "readable Parquet row groups",
                                   f"{type(exc).__name__}: {exc}")


def splittable(path: str | Path) -> bool:
    """Can the file be read in byte ranges (uncompressed JSONL), e.g. by several processes at once?"""
    return file_type(path) == "jsonl" and not _compressed(Path(path))


def line_aligned_ranges(path: str | Path, parts: int) -> list[tuple[int, int, int]]:
    """Split an uncompressed JSONL file into up to `parts` (start, end, lines before start) byte ranges
    that begin at line starts."""
    size = Path(path).stat().st_size
    bounds = [0]
    with open(path, "rb") as handle:
        for k in range(1, parts):
            handle.seek(max(bounds[-1], size * k // parts))
            handle.readline()
            if handle.tell() < size and handle.tell() > bounds[-1]:
                bounds.append(handle.tell())
        bounds.append(size)
        ranges, lines = [], 0
        for start, end in zip(bounds, bounds[1:]):
            ranges.append((start, end, lines))
            handle.seek(start)
            remaining = end - start
            while remaining:
                block = handle.read(min(remaining, 1 << 22))
                lines += block.count(b"\n")
                remaining -= len(block)
    return ranges


def iter_records(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES,
                 byte_range: tuple[int, int, int] | None = None, limits: InputLimits | None = None) -> Iterator[Record]:
    """Yield (line or row number, record or problem) for every record of a data file.

    byte_range (from line_aligned_ranges) reads one part of an uncompressed JSONL file. With limits, the
    file is measured first (InputTooLarge before any record), and the stream raises InputTooLarge past
    max_records."""
    path = check_readable(path)
    if byte_range is not None:
        return _iter_jsonl(path, max_line_bytes, byte_range)
    if limits is None:
        return _records_of(path, max_line_bytes)
    check_limits(path, limits)
    records = _records_of(path, max_line_bytes)
    return records if limits.max_records is None else _count_records(records, path, limits.max_records)


def _records_of(path: Path, max_line_bytes: int) -> Iterator[Record]:
    kind = file_type(path)
    if kind == "parquet":
        return _iter_parquet(path)
    if kind == "csv":
        return _iter_csv(path, max_line_bytes)
    if kind == "json":
        return _iter_json_array(path, max_line_bytes)
    return _iter_jsonl(path, max_line_bytes)
