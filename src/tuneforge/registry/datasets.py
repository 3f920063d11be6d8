"""Dataset reports: validate an uploaded file once, line by line, and keep what was found with the file.

The report (format, example count, statistics, every problem with its line) is what job creation checks,
so a job with a bad file fails at once with the line-level report, and no worker ever reads the file first.
The scheduler runs `python -m tuneforge.registry.datasets` on each upload in a child process it can bound
(wall time, memory) and kill; the child itself reads under InputLimits (inflated bytes, ratio, lines).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from tuneforge.data.loading import MIN_TRAINING_EXAMPLES
from tuneforge.data.problems import DataProblem
from tuneforge.data.reader import InputLimits
from tuneforge.data.validation import validate_file
from tuneforge.spec.api import DataProblemObject, DatasetReport

MAX_PROBLEMS_KEPT = 200

__all__ = ["MIN_TRAINING_EXAMPLES", "InputLimits", "inspect_dataset", "refused_report"]


def inspect_dataset(path: Path, *, display_name: str, limits: InputLimits | None = None) -> DatasetReport:
    """Validate every record of an uploaded file (streaming, bounded memory); problems name display_name,
    never the server path. The example count is checked at job creation (a validation file may be small)."""
    report = validate_file(path, min_examples=1, samples_per_kind=MAX_PROBLEMS_KEPT, limits=limits)
    if "too_large" in report.samples:
        refused = report.samples["too_large"][0]
        return refused_report(display_name, kind="too_large", expected=refused.expected, found=refused.found)
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


def inspect_eval_items(path: Path, *, display_name: str, limits: InputLimits | None = None) -> DatasetReport:
    """Validate an eval data file (purpose evals): every record an item, or OpenAI's {"item", "sample"}.
    Items are checked against an eval's item_schema when a run uses the file (they need the eval)."""
    from tuneforge.data.eval_items import iter_eval_rows
    from tuneforge.data.reader import InputTooLarge, UnusableInput

    rows = with_sample = 0
    problems: list[DataProblem] = []
    try:
        for row in iter_eval_rows(path, display_name=display_name, limits=limits):
            if isinstance(row, DataProblem):
                problems.append(row)
            else:
                rows += 1
                with_sample += row.sample is not None
    except InputTooLarge as exc:
        refused = exc.problems[0]
        return refused_report(display_name, kind="too_large", expected=refused.expected, found=refused.found)
    except UnusableInput as exc:
        problems.extend(replace(p, file=display_name) for p in exc.problems)
    if not rows and not problems:
        problems.append(DataProblem(display_name, 0, "too_few_examples", "", "at least 1 item", "0"))
    valid = not problems
    summary = (f"{display_name}: {rows} eval items ({with_sample} with samples)" if valid else
               f"{display_name}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems[:20]))
    return DatasetReport(valid=valid, examples=rows, problems=[_problem(p) for p in problems[:MAX_PROBLEMS_KEPT]],
                         problems_total=len(problems), stats={"items": rows, "items_with_sample": with_sample},
                         summary=summary)


def refused_report(display_name: str, *, kind: str, expected: str, found: str) -> DatasetReport:
    """The report of a file that passed a validation bound: one whole-file problem that names the file and
    the bound, e.g. "big.jsonl.gz inflates past 4 GiB (expected at most 4 GiB decompressed)"."""
    return DatasetReport(
        valid=False, problems=[DataProblemObject(line=0, kind=kind, field="", expected=expected, found=found)],
        problems_total=1, summary=f"{display_name} {found} (expected {expected}); it was not validated",
    )


def _problem(problem: DataProblem) -> DataProblemObject:
    return DataProblemObject(line=problem.line, kind=problem.kind, field=problem.field, expected=problem.expected, found=problem.found)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), so a killed scheduler leaves no validation behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        sys.exit(1)  # the parent died before the line above


def main(argv: list[str] | None = None) -> int:
    """The validation child: inspect one file under InputLimits and write the report as JSON to --output
    (written whole or not at all: the scheduler treats a missing report as a failed validation)."""
    parser = argparse.ArgumentParser(prog="python -m tuneforge.registry.datasets", description=main.__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--display-name", required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--max-inflated-bytes", type=int)
    parser.add_argument("--max-ratio", type=float)
    parser.add_argument("--ratio-floor-bytes", type=int, default=InputLimits.ratio_floor_bytes)
    parser.add_argument("--max-lines", type=int)
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the scheduler) dies")
    parser.add_argument("--purpose", default="fine-tune", choices=("fine-tune", "evals"),
                        help="fine-tune: training data; evals: eval items")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    limits = InputLimits(max_inflated_bytes=args.max_inflated_bytes, max_ratio=args.max_ratio,
                         ratio_floor_bytes=args.ratio_floor_bytes, max_lines=args.max_lines, max_records=args.max_lines)
    inspect = inspect_eval_items if args.purpose == "evals" else inspect_dataset
    report = inspect(args.file, display_name=args.display_name, limits=limits)
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_text(report.model_dump_json())
    os.replace(partial, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
