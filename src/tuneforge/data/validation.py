"""Validate a dataset file in one streaming pass: every problem with its line and field, and statistics.

Memory stays bounded whatever the file size: records are checked one at a time, only the first few
problems of each kind are kept (with a count of the rest), and duplicates are found from 8-byte
hashes sorted at the end. With a tokenizer, examples are tokenized in batches through the same chat
template and masks as training, for token statistics, too-long examples and padding waste.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tuneforge.data.formats import Example
from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, iter_examples
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.data.reader import UnusableInput, file_type

EXIT_VALID, EXIT_INVALID, EXIT_UNUSABLE = 0, 1, 2
TOKENIZE_BATCH = 512


@dataclass
class ValidationReport:
    file: str
    file_type: str | None = None
    format: str | None = None
    records: int = 0
    examples: int = 0
    min_examples: int = MIN_TRAINING_EXAMPLES
    counts: Counter = field(default_factory=Counter)
    warnings_kinds: set[str] = field(default_factory=set)
    samples: dict[str, list[DataProblem]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    unusable: bool = False
    samples_per_kind: int = 5

    def add(self, problem: DataProblem, *, warning: bool = False) -> None:
        self.counts[problem.kind] += 1
        if warning:
            self.warnings_kinds.add(problem.kind)
        shown = self.samples.setdefault(problem.kind, [])
        if len(shown) < self.samples_per_kind:
            shown.append(problem)

    @property
    def errors(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind not in self.warnings_kinds)

    @property
    def warnings(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind in self.warnings_kinds)

    @property
    def valid(self) -> bool:
        return not self.unusable and self.errors == 0

    @property
    def exit_code(self) -> int:
        return EXIT_UNUSABLE if self.unusable else (EXIT_VALID if self.valid else EXIT_INVALID)

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "file_type": self.file_type,
            "format": self.format,
            "valid": self.valid,
            "unusable": self.unusable,
            "records": self.records,
            "examples": self.examples,
            "errors": self.errors,
            "warnings": self.warnings,
            "problems": {
                kind: {"count": count, "severity": "warning" if kind in self.warnings_kinds else "error",
                       "first": [p.to_dict() for p in self.samples.get(kind, [])]}
                for kind, count in self.counts.most_common()
            },
            "stats": self.stats,
        }

    def render(self) -> str:
        verdict = "unusable" if self.unusable else ("valid" if self.valid else "invalid")
        lines = [f"{self.file}: {verdict} ({self.format or 'unknown'} format, {self.file_type or '?'} file): "
                 f"{self.examples} usable examples of {self.records} records, {self.errors} errors, "
                 f"{self.warnings} warnings"]
        for kind, count in self.counts.most_common():
            severity = "warning" if kind in self.warnings_kinds else "error"
            lines.append(f"  {kind} ({count} {severity}{'s' if count > 1 else ''}):")
            lines.extend(f"    {p}" for p in self.samples.get(kind, []))
            if count > len(self.samples.get(kind, [])):
                lines.append(f"    ... and {count - len(self.samples[kind])} more")
        lines.extend(_render_stats(self.stats))
        return "\n".join(lines)


def _render_stats(stats: dict) -> list[str]:
    if not stats:
        return []
    out = ["statistics:", f"  examples {stats['examples']}, turns {stats['turns']}"]
    tokens = stats.get("tokens")
    if tokens:
        out.append(f"  tokens per example: min {tokens['min']}, p50 {tokens['p50']}, p95 {tokens['p95']}, "
                   f"max {tokens['max']}; {stats['total_tokens']:,} in all, {stats['trainable_tokens']:,} trained on")
        out.append(f"  over max_seq_length {stats['max_seq_length']}: {stats['over_max_seq_length']}")
        padding = stats["padding"]
        out.append(f"  real tokens per batch of {padding['batch_size']}: {padding['padded_real_fraction']:.1%} padded, "
                   f"{padding['packed_real_fraction']:.1%} packed into {padding['packed_rows']} rows "
                   f"(padding waste {1 - padding['padded_real_fraction']:.1%} -> {1 - padding['packed_real_fraction']:.1%})")
    elif "note" in stats:
        out.append(f"  {stats['note']}")
    return out


def _record_hash(example: Example) -> int:
    text = json.dumps(example.record, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def padding_fractions(lengths: np.ndarray, max_seq_length: int, batch_size: int, seed: int = 0) -> dict:
    """Real-token fraction of shuffled padded batches vs of packed rows (both batched by batch_size)."""
    from tuneforge.data.packing import best_fit_decreasing, real_token_fraction

    fitted = [int(n) for n in np.minimum(lengths, max_seq_length)]
    order = np.random.default_rng(seed).permutation(len(fitted))
    padded = real_token_fraction([fitted[i] for i in order], batch_size)
    rows = best_fit_decreasing(fitted, max_seq_length)
    row_lengths = [sum(fitted[i] for i in row) for row in rows]
    row_order = np.random.default_rng(seed).permutation(len(rows))
    packed = real_token_fraction([row_lengths[i] for i in row_order], batch_size)
    return {"batch_size": batch_size, "padded_real_fraction": padded, "packed_real_fraction": packed,
            "packed_rows": len(rows)}


def validate_file(
    path: str | Path,
    *,
    fmt: str = "auto",
    renderer=None,
    max_seq_length: int = 2048,
    too_long: str = "drop",
    batch_size: int = 8,
    min_examples: int = MIN_TRAINING_EXAMPLES,
    samples_per_kind: int = 5,
) -> ValidationReport:
    """Check every record of a file; with a PromptRenderer (tokenizer + template), also token statistics."""
    report = ValidationReport(file=str(path), min_examples=min_examples, samples_per_kind=samples_per_kind)
    try:
        report.file_type = file_type(path) if Path(path).is_file() else None
        report.format, stream = iter_examples(path, fmt)
    except UnusableInput as exc:
        report.unusable = True
        for problem in exc.problems:
            report.add(problem)
        return report
    except DataError as exc:
        report.unusable = True
        for problem in exc.problems:
            report.add(problem)
        return report

    hashes, lines = array("q"), array("q")
    lengths, trainable = array("l"), 0
    turns = assistant_messages = with_system = characters = 0
    turns_min, turns_max = None, 0
    bad_lines: set[int] = set()
    pending: list[Example] = []

    def tokenize_pending() -> None:
        nonlocal trainable
        for item in renderer.tokenize_stream(pending):
            lengths.append(len(item.input_ids))
            trainable += item.num_label_tokens
            if len(item.input_ids) > max_seq_length:
                report.add(DataProblem(str(path), item.line, "too_long", "", f"at most {max_seq_length} tokens once "
                                       f"templated (policy: {too_long})", f"{len(item.input_ids)} tokens"),
                           warning=too_long != "error")
        pending.clear()

    for item in stream:
        if isinstance(item, DataProblem):
            report.add(item)
            bad_lines.add(item.line)
            continue
        report.examples += 1
        hashes.append(_record_hash(item))
        lines.append(item.line)
        messages = item.as_messages() if item.format != "text" else [{"role": "text", "content": item.record["text"]}]
        turns += len(messages)
        turns_min = len(messages) if turns_min is None else min(turns_min, len(messages))
        turns_max = max(turns_max, len(messages))
        assistant_messages += sum(1 for m in messages if m["role"] == "assistant")
        with_system += messages[0]["role"] == "system"
        characters += sum(len(m["content"]) for m in messages)
        if renderer is not None:
            pending.append(item)
            if len(pending) >= TOKENIZE_BATCH:
                tokenize_pending()
    if renderer is not None and pending:
        tokenize_pending()
    report.records = report.examples + len(bad_lines)

    _report_duplicates(report, str(path), np.frombuffer(hashes, dtype=np.int64), np.frombuffer(lines, dtype=np.int64))
    if report.examples < min_examples:
        report.add(DataProblem(str(path), 0, "too_few_examples", "", f"at least {min_examples} examples",
                               str(report.examples)))
    report.stats = {
        "examples": report.examples,
        "turns": turns,
        "turns_per_example": {"min": turns_min or 0, "mean": round(turns / max(report.examples, 1), 2),
                              "max": turns_max},
        "assistant_messages": assistant_messages,
        "with_system_prompt": with_system,
        "characters": characters,
    }
    if renderer is None:
        report.stats["note"] = "token statistics need a tokenizer: pass --model"
    elif len(lengths):
        sizes = np.frombuffer(lengths, dtype=np.int64) if lengths.itemsize == 8 else np.asarray(lengths)
        report.stats.update({
            "tokens": {"min": int(sizes.min()), "p50": int(np.percentile(sizes, 50)), "p95": int(np.percentile(sizes, 95)),
                       "max": int(sizes.max()), "mean": float(sizes.mean())},
            "total_tokens": int(sizes.sum()),
            "trainable_tokens": trainable,
            "max_seq_length": max_seq_length,
            "over_max_seq_length": int((sizes > max_seq_length).sum()),
            "padding": padding_fractions(sizes, max_seq_length, batch_size),
        })
    return report


def _report_duplicates(report: ValidationReport, name: str, hashes: np.ndarray, lines: np.ndarray) -> None:
    """Count repeated records; describe only the first few (memory stays flat with a million repeats)."""
    if len(hashes) < 2:
        return
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    repeat = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]) + 1
    if not len(repeat):
        return
    repeat_lines = lines[order[repeat]]
    shown = np.argsort(repeat_lines, kind="stable")[: report.samples_per_kind]
    # For each shown repeat, the first line the record appeared on.
    group_start = np.searchsorted(sorted_hashes, sorted_hashes[repeat[shown]], side="left")
    for line, first in zip(repeat_lines[shown].tolist(), lines[order[group_start]].tolist()):
        report.add(DataProblem(name, line, "duplicate", "", "each example once", f"the same example as line {first}"),
                   warning=True)
    report.counts["duplicate"] += len(repeat) - len(shown)
