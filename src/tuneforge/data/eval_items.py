"""Eval data files: one item per record, in OpenAI's shape `{"item": {...}, "sample": {...}}` or bare.

A record whose keys are `item` (an object) and optionally `sample` (an object) is OpenAI's shape; any
other object is the item itself. Read by the upload validator (purpose `evals`) and by the eval-run
recipe, with the streaming reader's limits and line-level problems.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.problems import DataError, DataProblem, json_type
from tuneforge.data.reader import InputLimits, iter_records


@dataclass(frozen=True)
class EvalRow:
    line: int
    item: dict[str, Any]
    sample: dict[str, Any] | None


def row_of(record: dict[str, Any], *, file: str, line: int) -> EvalRow | DataProblem:
    if "item" in record and set(record) <= {"item", "sample"}:
        item, sample = record["item"], record.get("sample")
        if not isinstance(item, dict):
            return DataProblem(file, line, "wrong_type", "item", "an object", json_type(item))
        if sample is not None and not isinstance(sample, dict):
            return DataProblem(file, line, "wrong_type", "sample", "an object", json_type(sample))
        return EvalRow(line, item, sample)
    return EvalRow(line, record, None)


def iter_eval_rows(path: str | Path, *, display_name: str | None = None,
                   limits: InputLimits | None = None) -> Iterator[EvalRow | DataProblem]:
    """Every record as an EvalRow, or the problem in its place (not JSON, not an object, ...)."""
    name = display_name or str(path)
    for line, record in iter_records(path, limits=limits):
        if isinstance(record, DataProblem):
            yield DataProblem(name, record.line, record.kind, record.field, record.expected, record.found)
        elif not isinstance(record, dict):
            yield DataProblem(name, line, "wrong_type", "", "an object (an item)", json_type(record))
        else:
            yield row_of(record, file=name, line=line)


def load_eval_rows(path: str | Path, *, display_name: str | None = None) -> list[EvalRow]:
    """All rows, or DataError with every problem."""
    rows, problems = [], []
    for row in iter_eval_rows(path, display_name=display_name):
        (problems if isinstance(row, DataProblem) else rows).append(row)
    if problems:
        raise DataError(problems)
    if not rows:
        raise DataError([DataProblem(display_name or str(path), 0, "too_few_examples", "", "at least 1 item", "0")])
    return rows
