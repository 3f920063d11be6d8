"""Write records to a data file whose type follows its name (.jsonl, .json, .csv, .parquet, each .gz).

The file appears complete or not at all: records go to a temporary file beside it, which is renamed
into place only after the last record was written and flushed.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

OUTPUT_TYPES = ("jsonl", "json", "csv", "parquet")


def output_type(path: str | Path) -> tuple[str, bool]:
    """(file type, gzip?) from the name; unknown names are refused rather than guessed."""
    suffixes = [s.lower().lstrip(".") for s in Path(path).suffixes]
    compressed = bool(suffixes) and suffixes[-1] in ("gz", "gzip")
    if compressed:
        suffixes = suffixes[:-1]
    kind = "jsonl" if suffixes and suffixes[-1] == "ndjson" else (suffixes[-1] if suffixes else "")
    if kind not in OUTPUT_TYPES:
        raise ValueError(f"{path}: expected a name ending in .jsonl, .json, .csv or .parquet (optionally .gz)")
    if kind == "parquet" and compressed:
        raise ValueError(f"{path}: Parquet compresses itself; drop the .gz")
    return kind, compressed


def _cell(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def write_records(path: str | Path, records: Iterable[dict]) -> int:
    """Write every record; returns how many. Nothing is left behind if writing fails."""
    path = Path(path)
    kind, compressed = output_type(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = list(records)
            count = len(rows)
            pq.write_table(pa.Table.from_pylist(rows), staging)
        else:
            raw = gzip.open(staging, "wb") if compressed else open(staging, "wb")
            with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
                if kind == "jsonl":
                    for record in records:
                        text.write(json.dumps(record, ensure_ascii=False) + "\n")
                        count += 1
                elif kind == "json":
                    text.write("[\n")
                    for record in records:
                        text.write((",\n" if count else "") + json.dumps(record, ensure_ascii=False))
                        count += 1
                    text.write("\n]\n")
                else:
                    writer = None
                    for record in records:
                        if writer is None:
                            writer = csv.DictWriter(text, fieldnames=list(record))
                            writer.writeheader()
                        writer.writerow({key: _cell(value) for key, value in record.items()})
                        count += 1
        with open(staging, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return count
