"""Validate a dataset file in one streaming pass: every problem with its line and field, and statistics.

Memory stays bounded whatever the file size: records are checked one at a time, only the first few
problems of each kind are kept (with a count of the rest), each example leaves 12 bytes (an 8-byte hash
and a 4-byte line, sorted at the end to find duplicates), and with InputLimits an untrusted file is
refused before it can inflate past them or hold more lines or records than they allow. With a tokenizer, examples are tokenized in batches through the same chat
template and masks as training, for token statistics, too-long examples and padding waste. Preference
files also get pair statistics: reply lengths (characters; tokens with a tokenizer), how often the chosen
reply is the longer one (a length bias a reward model learns first), ties (chosen and rejected equal up to
case and spacing; exactly equal ones are identical_pair errors), contradictions (the same two replies
preferred both ways) and distinct prompts.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tuneforge.data.formats import IMAGE_FORMATS, Example
from tuneforge.data.images import image_references
from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, iter_examples
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.data.reader import InputLimits, file_type

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
    out = ["statistics:", f"  examples {stats['examples']}, turns {stats['turns']}"
           + (f", images {stats['images']} (at most {stats['images_per_example_max']} per example)"
              if "images" in stats else "")]
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
    pairs = stats.get("pairs")
    if pairs:
        def spread(name):
            d = pairs[name]
            return f"{name.split('_')[0]} min {d['min']}, p50 {d['p50']}, mean {d['mean']:.1f}, max {d['max']}"

        out.append(f"  pairs {pairs['pairs']} ({pairs['distinct_prompts']} distinct prompts): chosen longer in "
                   f"{pairs['chosen_longer']:.1%}, identical {pairs['identical']}, ties {pairs['ties']}, "
                   f"contradictory {pairs['contradictory']}")
        out.append(f"  reply characters: {spread('chosen_chars')}; {spread('rejected_chars')}")
        if "chosen_tokens" in pairs:
            out.append(f"  reply tokens (trained): {spread('chosen_tokens')}; {spread('rejected_tokens')}")
    return out


def _spread(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "p50": int(np.percentile(values, 50)), "mean": float(values.mean()),
            "max": int(values.max())}


def _reply_text(value) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def _text_hash(*parts) -> int:
    text = json.dumps(parts, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


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
    limits: InputLimits | None = None,
) -> ValidationReport:
    """Check every record of a file; with a PromptRenderer (tokenizer + template), also token statistics.

    With limits (an untrusted upload), a file that would cost more to read is reported unusable with
    one too_large problem, before or instead of the rest of its records."""
    report = ValidationReport(file=str(path), min_examples=min_examples, samples_per_kind=samples_per_kind)
    try:
        report.file_type = file_type(path) if Path(path).is_file() else None
        report.format, stream = iter_examples(path, fmt, limits=limits)
        if report.format in IMAGE_FORMATS:
            renderer = None  # image tokens depend on the model's processor: the vlm recipe counts them
        tally = _Tally(report, str(path), renderer, max_seq_length, too_long)
        tally.consume(stream)
    except DataError as exc:  # UnusableInput and InputTooLarge among them
        report.unusable = True
        for problem in exc.problems:
            report.add(problem)
        return report
    report.records = report.examples + tally.bad_records

    _report_duplicates(report, str(path), np.frombuffer(tally.hashes, dtype=np.int64),
                       np.frombuffer(tally.lines, dtype=np.uint32))
    if report.examples < min_examples:
        report.add(DataProblem(str(path), 0, "too_few_examples", "", f"at least {min_examples} examples",
                               str(report.examples)))
    report.stats = tally.stats()
    if report.format == "preference" and report.examples:
        report.stats["pairs"] = tally.pair_stats(report, str(path))
    if report.format in IMAGE_FORMATS:
        report.stats["note"] = ("token statistics of image data come from the model's processor when it trains "
                                "(image tokens depend on it)")
    elif renderer is None:
        report.stats["note"] = "token statistics need a tokenizer: pass --model"
    elif len(tally.lengths):
        sizes = np.frombuffer(tally.lengths, dtype=np.uint32).astype(np.int64)
        report.stats.update({
            "tokens": {"min": int(sizes.min()), "p50": int(np.percentile(sizes, 50)), "p95": int(np.percentile(sizes, 95)),
                       "max": int(sizes.max()), "mean": float(sizes.mean())},
            "total_tokens": int(sizes.sum()),
            "trainable_tokens": tally.trainable,
            "max_seq_length": max_seq_length,
            "over_max_seq_length": int((sizes > max_seq_length).sum()),
            "padding": padding_fractions(sizes, max_seq_length, batch_size),
        })
    return report


class _Tally:
    """What validate_file keeps while it streams: per example only an 8-byte hash and a 4-byte line (for
    duplicates) and, with a tokenizer, a 4-byte token count; everything else is a running sum. (A Python
    set or list per example would cost 50-100 bytes each: hundreds of MiB for a file of tiny records.)"""

    def __init__(self, report: ValidationReport, name: str, renderer, max_seq_length: int, too_long: str):
        self.report, self.name, self.renderer = report, name, renderer
        self.max_seq_length, self.too_long = max_seq_length, too_long
        self.hashes, self.lines, self.lengths = array("q"), array("I"), array("I")
        self.trainable = self.turns = self.assistant_messages = self.with_system = self.characters = 0
        self.turns_min: int | None = None
        self.turns_max = 0
        self.bad_records, self._last_bad_line = 0, None
        self._pending: list[Example] = []
        # Preference pairs: reply lengths and hashes of (prompt, chosen, rejected) both ways round.
        self.chosen_chars, self.rejected_chars = array("I"), array("I")
        self.chosen_tokens, self.rejected_tokens = array("I"), array("I")
        self.prompt_hashes, self.forward, self.backward = array("q"), array("q"), array("q")
        self.ties = 0
        self.images, self.images_max = 0, 0

    def consume(self, stream) -> None:
        for item in stream:
            if isinstance(item, DataProblem):
                self.report.add(item)
                # A record's problems come together, so counting line changes counts bad records.
                if item.line != self._last_bad_line:
                    self.bad_records, self._last_bad_line = self.bad_records + 1, item.line
                continue
            self._example(item)
        if self._pending:
            self._tokenize_pending()

    def _example(self, item: Example) -> None:
        self.report.examples += 1
        self.hashes.append(_record_hash(item))
        self.lines.append(item.line)
        messages = item.as_messages() if item.format != "text" else [{"role": "text", "content": item.record["text"]}]
        self.turns += len(messages)
        self.turns_min = len(messages) if self.turns_min is None else min(self.turns_min, len(messages))
        self.turns_max = max(self.turns_max, len(messages))
        self.assistant_messages += sum(1 for m in messages if m["role"] == "assistant")
        self.with_system += messages[0]["role"] == "system"
        self.characters += sum(len(m["content"]) for m in messages)
        if item.format == "preference":
            self._pair(item)
        if item.format in IMAGE_FORMATS:
            count = len(image_references(item.record, item.format))
            self.images, self.images_max = self.images + count, max(self.images_max, count)
        if self.renderer is not None:
            self._pending.append(item)
            if len(self._pending) >= TOKENIZE_BATCH:
                self._tokenize_pending()

    def _pair(self, item: Example) -> None:
        record = item.record
        chosen, rejected = _reply_text(record["chosen"]), _reply_text(record["rejected"])
        self.chosen_chars.append(len(chosen))
        self.rejected_chars.append(len(rejected))
        prompt = json.dumps(record["prompt"], sort_keys=True, ensure_ascii=False)
        self.prompt_hashes.append(_text_hash(prompt))
        self.forward.append(_text_hash(prompt, chosen, rejected))
        self.backward.append(_text_hash(prompt, rejected, chosen))
        if " ".join(chosen.casefold().split()) == " ".join(rejected.casefold().split()):
            self.ties += 1
            self.report.add(DataProblem(self.name, item.line, "tied_pair", "rejected", "a rejected reply that differs "
                                        "from the chosen one in more than case and spacing", "the same words"),
                            warning=True)

    def _tokenize_pending(self) -> None:
        if self._pending[0].format == "preference":
            self._tokenize_pairs()
            return
        for item in self.renderer.tokenize_stream(self._pending):
            self.lengths.append(len(item.input_ids))
            self.trainable += item.num_label_tokens
            if len(item.input_ids) > self.max_seq_length:
                self.report.add(DataProblem(self.name, item.line, "too_long", "", f"at most {self.max_seq_length} "
                                            f"tokens once templated (policy: {self.too_long})",
                                            f"{len(item.input_ids)} tokens"), warning=self.too_long != "error")
        self._pending.clear()

    def _tokenize_pairs(self) -> None:
        from tuneforge.data.preference import tokenize_pairs

        for pair in tokenize_pairs(self._pending, self.renderer):
            longest = max(len(pair.chosen), len(pair.rejected))
            self.lengths.append(longest)
            self.trainable += pair.chosen.num_label_tokens + pair.rejected.num_label_tokens
            self.chosen_tokens.append(pair.chosen.num_label_tokens)
            self.rejected_tokens.append(pair.rejected.num_label_tokens)
            if longest > self.max_seq_length:
                self.report.add(DataProblem(self.name, pair.line, "too_long", "", f"both sequences at most "
                                            f"{self.max_seq_length} tokens once templated (policy: {self.too_long})",
                                            f"{longest} tokens"), warning=self.too_long != "error")
        self._pending.clear()

    def pair_stats(self, report: ValidationReport, name: str) -> dict:
        """Pair statistics; adds a contradictory_pair warning for each pair whose reverse is also in the file."""
        chosen = np.frombuffer(self.chosen_chars, dtype=np.uint32).astype(np.int64)
        rejected = np.frombuffer(self.rejected_chars, dtype=np.uint32).astype(np.int64)
        forward, backward = (np.frombuffer(a, dtype=np.int64) for a in (self.forward, self.backward))
        reversed_too = np.isin(backward, forward)
        lines = np.frombuffer(self.lines, dtype=np.uint32)
        for line in lines[reversed_too][: report.samples_per_kind].tolist():
            report.add(DataProblem(name, line, "contradictory_pair", "", "one preference between two replies",
                                   "the same replies preferred the other way round on another line"), warning=True)
        contradictory = int(reversed_too.sum())
        report.counts["contradictory_pair"] += max(0, contradictory - report.samples_per_kind)
        if not report.counts["contradictory_pair"]:
            del report.counts["contradictory_pair"]
        stats = {
            "pairs": len(chosen), "distinct_prompts": int(len(np.unique(np.frombuffer(self.prompt_hashes, np.int64)))),
            "chosen_chars": _spread(chosen), "rejected_chars": _spread(rejected),
            "chosen_longer": float((chosen > rejected).mean()), "identical": report.counts.get("identical_pair", 0),
            "ties": self.ties, "contradictory": contradictory,
        }
        if len(self.chosen_tokens):
            stats["chosen_tokens"] = _spread(np.frombuffer(self.chosen_tokens, dtype=np.uint32).astype(np.int64))
            stats["rejected_tokens"] = _spread(np.frombuffer(self.rejected_tokens, dtype=np.uint32).astype(np.int64))
        return stats

    def stats(self) -> dict:
        examples = self.report.examples
        return {
            "examples": examples,
            "turns": self.turns,
            "turns_per_example": {"min": self.turns_min or 0, "mean": round(self.turns / max(examples, 1), 2),
                                  "max": self.turns_max},
            "assistant_messages": self.assistant_messages,
            "with_system_prompt": self.with_system,
            "characters": self.characters,
            **({"images": self.images, "images_per_example_max": self.images_max}
               if self.report.format in IMAGE_FORMATS else {}),
        }


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
