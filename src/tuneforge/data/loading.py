"""Turn a data file into validated examples, streaming, or fail with every problem it has.

Nothing downstream sees a record that has not passed `validate_and_normalize`; the whole file is checked
before training starts, so a bad line 90,000 is found in seconds, not hours into a run.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

from tuneforge.data.formats import FORMAT_FIELDS, IMAGE_FORMATS, Example, Format, detect_format, validate_and_normalize
from tuneforge.data.images import image_problems
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.data.reader import InputLimits, UnusableInput, check_readable, iter_records

MIN_TRAINING_EXAMPLES = 10  # as the OpenAI fine-tuning API requires


def iter_examples(path: str | Path, fmt: Format | str = "auto", *, byte_range: tuple[int, int, int] | None = None,
                  limits: InputLimits | None = None) -> tuple[Format, Iterator[Example | DataProblem]]:
    """(the format, a stream of examples and problems). The format is detected from the first record.
    With limits, InputTooLarge may come from this call or, past max_records, from the stream."""
    path = check_readable(path)
    records = iter_records(path, byte_range=byte_range, limits=limits)
    pending: list = []
    chosen: Format | None = None if fmt == "auto" else fmt  # type: ignore[assignment]
    if chosen is None:
        for line, item in records:
            pending.append((line, item))
            if isinstance(item, dict):
                chosen = detect_format(item)
                if chosen is None:
                    expected = " or ".join(FORMAT_FIELDS.values())
                    raise UnusableInput(
                        [DataProblem(str(path), line, "unknown_format", "", f"a record with {expected}", f"fields {sorted(item)}")],
                        headline=f"{path}: cannot tell the dataset format from line {line}",
                    )
                break
    fmt_final: Format = chosen or "chat"

    # Images: paths relative to the dataset file for the user's own files; data: URLs only in uploads.
    image_dir = None if limits is not None else path.parent

    def stream() -> Iterator[Example | DataProblem]:
        name = str(path)
        for line, item in _chain(pending, records):
            if isinstance(item, DataProblem):
                yield item
                continue
            normalized, problems = validate_and_normalize(item, fmt_final, file=name, line=line)
            if not problems and fmt_final in IMAGE_FORMATS:
                problems = image_problems(normalized, fmt_final, file=name, line=line, base_dir=image_dir)
            if problems:
                yield from problems
            else:
                yield Example(line, fmt_final, normalized)

    return fmt_final, stream()


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def load_examples(path: str | Path, fmt: Format | str = "auto", *, min_examples: int = 1) -> tuple[list[Example], Format]:
    """Read and validate every record; return the examples and the (detected) format."""
    detected, stream = iter_examples(path, fmt)
    examples: list[Example] = []
    problems: list[DataProblem] = []
    for item in stream:
        (problems if isinstance(item, DataProblem) else examples).append(item)
    if problems:
        raise DataError(problems, headline=f"{path}: {len(problems)} problem(s); nothing was trained")
    if len(examples) < min_examples:
        raise DataError([DataProblem(str(path), 0, "too_few_examples", "", f"at least {min_examples} examples",
                                     f"{len(examples)}")])
    return examples, detected


def file_sha256(path: str | Path) -> str:
    """Content hash of a data file: the identity of a dataset for caches and exact resume."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_indices(count: int, train_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded, reproducible train/validation split of positions; at least one on each side."""
    if train_fraction >= 1.0 or count < 2:
        return list(range(count)), []
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_val = min(count - 1, max(1, round(count * (1 - train_fraction))))
    val = set(order[:n_val])
    return [i for i in range(count) if i not in val], sorted(val)


def split_examples(examples: list[Example], train_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    train, val = split_indices(len(examples), train_fraction, seed)
    return [examples[i] for i in train], [examples[i] for i in val]
