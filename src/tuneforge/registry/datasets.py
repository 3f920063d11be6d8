"""Dataset reports: validate an uploaded file once, line by line, and keep what was found with the file.

The report (format, example count, statistics, every problem with its line) is what job creation checks,
so a job with a bad file fails at once with the line-level report, and no worker ever reads the file first.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tuneforge.data.loading import MIN_TRAINING_EXAMPLES
from tuneforge.data.problems import DataProblem
from tuneforge.data.validation import validate_file
from tuneforge.spec.api import DataProblemObject, DatasetReport

MAX_PROBLEMS_KEPT = 200

__all__ = ["MIN_TRAINING_EXAMPLES", "inspect_dataset"]


def inspect_dataset(path: Path, *, display_name: str) -> DatasetReport:
    """Validate every record of an uploaded file (streaming, bounded memory); problems name display_name,
    never the server path. The example count is checked at job creation (a validation file may be small)."""
    report = validate_file(path, min_examples=1, samples_per_kind=MAX_PROBLEMS_KEPT)
    shown = sorted((replace(p, file=display_name) for ps in report.samples.values() for p in ps),
                   key=lambda p: (p.line, p.field))
    summary = report.render().replace(str(path), display_name)
    if report.valid:
        summary = f"{display_name}: {report.examples} {report.format} examples" + (
            f" ({report.warnings} warnings)" if report.warnings else "")
    return DatasetReport(
        valid=report.valid, format=report.format if report.examples else None, examples=report.examples,
        problems=[_problem(p) for p in shown[:MAX_PROBLEMS_KEPT]], problems_total=report.errors + report.warnings,
        stats=report.stats, summary=summary,
    )
def _problem(problem: DataProblem) -> DataProblemObject:
    return DataProblemObject(line=problem.line, kind=problem.kind, field=problem.field, expected=problem.expected, found=problem.found)
