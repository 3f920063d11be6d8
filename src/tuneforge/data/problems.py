"""Line-level data problems and the error that carries them to the user.

A problem names the file, the line (or row), the field path (`messages[2].role`), what was expected
and what was found, so a user can fix the data without guessing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DataProblem:
    file: str
    line: int  # 1-based line (JSONL) or row; 0 when the problem concerns the whole file
    kind: str  # short machine name: not_json, missing_field, wrong_type, unknown_role, ...
    field: str  # field path inside the record, "" for the whole record
    expected: str
    found: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} expected {self.expected}, found {self.found}"

    def to_dict(self) -> dict:
        return asdict(self)


class DataError(ValueError):
    """The data cannot be used as it is; `problems` says where and why."""

    def __init__(self, problems: list[DataProblem], *, headline: str | None = None, shown_per_kind: int = 5):
        self.problems = problems
        counts = Counter(p.kind for p in problems)
        file = problems[0].file if problems else "data"
        lines = [headline or f"{file}: {len(problems)} problem(s) in the data"]
        for kind, count in counts.most_common():
            lines.append(f"  {kind} ({count}):")
            shown = [p for p in problems if p.kind == kind][:shown_per_kind]
            lines.extend(f"    {p}" for p in shown)
            if count > len(shown):
                lines.append(f"    ... and {count - len(shown)} more")
        super().__init__("\n".join(lines))


def short_repr(value: object, limit: int = 60) -> str:
    """A value as the user wrote it, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_type(value: object) -> str:
    """The JSON name of a Python value's type, for 'expected a string, found a number' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
