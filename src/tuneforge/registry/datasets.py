"""Dataset reports: validate an uploaded file once, line by line, and keep what was found with the file.

The report (format, example count, statistics, every problem with its line) is what job creation checks,
so a job with a bad file fails at once with the line-level report, and no worker ever reads the file first.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, load_examples
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.spec.api import DataProblemObject, DatasetReport

MAX_PROBLEMS_KEPT = 200

__all__ = ["MIN_TRAINING_EXAMPLES", "inspect_dataset"]


def inspect_dataset(path: Path, *, display_name: str) -> DatasetReport:
    """Validate every record of a JSONL file; problems name display_name, never the server path."""
    try:
        examples, fmt = load_examples(path, "auto", min_examples=1)
    except DataError as exc:
        problems = [replace(p, file=display_name) for p in exc.problems]
        headline = f"{display_name}: {len(problems)} problem(s)"
        summary = str(DataError(problems, headline=headline)).replace(str(path), display_name)
        return DatasetReport(
            valid=False, problems=[_problem(p) for p in problems[:MAX_PROBLEMS_KEPT]], problems_total=len(problems),
            summary=summary,
        )
    conversations = [example.as_messages() for example in examples]
    chars = [sum(len(str(m.get("content") or "")) for m in messages) for messages in conversations]
    turns = [len(messages) for messages in conversations]
    assistant = sum(1 for messages in conversations for m in messages if m.get("role") == "assistant")
    stats = {
        "examples": len(examples),
        "characters": sum(chars),
        "characters_per_example": {"min": min(chars), "mean": round(statistics.fmean(chars), 1), "max": max(chars)},
        "messages_per_example": {"min": min(turns), "mean": round(statistics.fmean(turns), 2), "max": max(turns)},
        "assistant_messages": assistant,
        "with_system_prompt": sum(1 for messages in conversations if messages and messages[0].get("role") == "system"),
    }
    return DatasetReport(valid=True, format=fmt, examples=len(examples), stats=stats,
                         summary=f"{display_name}: {len(examples)} {fmt} examples")


def _problem(problem: DataProblem) -> DataProblemObject:
    return DataProblemObject(line=problem.line, kind=problem.kind, field=problem.field, expected=problem.expected, found=problem.found)
